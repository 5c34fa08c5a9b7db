"""er-rollout: bad input gets one line naming the key or file, exit 2, no traceback."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("args, named", [
    (["spec.bogus=1"], "spec.bogus"),
    (["spec.mode=fast"], "spec.mode"),
    (["spec.gamma_ladder=[7,5]"], "spec.gamma_ladder"),
    (["sampling.temperature=hot"], "sampling.temperature"),
    (["model.path=/nonexistent/model"], "model.path"),
    (["data.template=alpaca"], "data.template"),
    (["missing.yaml"], "missing.yaml"),
    (["--bogus"], "--bogus"),
    (["--out"], "--out"),
])
def test_er_rollout_bad_input_one_line_exit_2(args, named):
    out = subprocess.run([sys.executable, "-m", "er_sglang.cli", *args], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and lines[0].startswith("error: ")
    assert "Traceback" not in out.stderr and out.stdout == ""
