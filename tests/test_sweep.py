import json
import math
import subprocess
import sys

import pytest
import yaml

from orchestrator import sweep as sw

GRID = {
    "method": "grid",
    "parameters": {"spec.mode": {"values": ["rtn", "argmax"]}, "spec.gamma": {"values": [5, 7, 9]},
                   "train.num_steps": {"value": 3}},
    "command": ["${env}", "er-train", "configs/default.yaml", "${args_no_hyphens}"],
}
# Writes two metric lines into the run dir it is given: loss (x - 2)^2 + 1, then (x - 2)^2 - 1 (mean
# (x - 2)^2, std sqrt(2), last (x - 2)^2 - 1); x = 3 fails.
PROGRAM = """
import json, os, pathlib, sys
args = dict(a.split("=", 1) for a in sys.argv[1:])
x = float(args["x"])
run_dir = pathlib.Path(os.environ["ER_RUN_DIR"]); run_dir.mkdir(parents=True)
with open(run_dir / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 1, "loss": (x - 2) ** 2 + 1}) + "\\n")
    f.write(json.dumps({"step": 2, "loss": (x - 2) ** 2 - 1}) + "\\n")
sys.exit(1 if x == 3 else 0)
"""


def _write(tmp_path, sweep: dict, name: str = "sweep.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return str(path)


def test_sweep_grid_expands_cartesian_product_in_yaml_order():
    runs = sw.expand_runs(GRID)
    assert len(runs) == 2 * 3 * 1
    assert runs[0] == {"spec.mode": "rtn", "spec.gamma": 5, "train.num_steps": 3}
    assert runs[5] == {"spec.mode": "argmax", "spec.gamma": 9, "train.num_steps": 3}
    assert len(sw.expand_runs(GRID, max_runs=4)) == 4


def test_sweep_args_no_hyphens_become_key_value_overrides_plus_run_dir():
    cmd = sw.build_command(GRID, {"spec.mode": "rtn", "spec.gamma": 5, "train.lr": 1e-05}, "/s/run-0")
    assert cmd == ["/usr/bin/env", "er-train", "configs/default.yaml", "spec.mode=rtn", "spec.gamma=5",
                   "train.lr=1e-05", "run_dir=/s/run-0"]


def test_sweep_other_macros_match_wandb():
    sweep = {"program": "train.py", "method": "grid", "parameters": {"a": {"value": 1}}}
    # wandb's default command: ${env} ${interpreter} ${program} ${args}; not er-train -> no run_dir
    assert sw.build_command(sweep, {"a": 1, "b": True}, "/s/run-0") == [
        "/usr/bin/env", sys.executable, "train.py", "--a=1", "--b=True"]
    sweep = {**sweep, "program": "er-train", "command": ["${program}", "${args_json}"]}
    assert sw.build_command(sweep, {"a": 1}, "/r") == ["er-train", json.dumps({"a": 1, "run_dir": "/r"})]
    with pytest.raises(sw.SweepError, match="args_dict"):
        sw.build_command({**sweep, "command": ["${args_dict}"]}, {}, None)


def test_sweep_random_draws_are_seeded_and_in_bounds():
    sweep = {"method": "random", "run_cap": 50, "parameters": {
        "train.lr": {"distribution": "log_uniform_values", "min": 1e-6, "max": 1e-4},
        "spec.gamma": {"distribution": "int_uniform", "min": 3, "max": 5},
        "train.clip_low": {"distribution": "uniform", "min": 0.1, "max": 0.3},
        "spec.mode": {"values": ["rtn", "argmax"]}}}
    runs = sw.expand_runs(sweep, seed=1)
    assert len(runs) == 50 and runs == sw.expand_runs(sweep, seed=1) != sw.expand_runs(sweep, seed=2)
    assert all(1e-6 <= r["train.lr"] <= 1e-4 for r in runs)
    assert {r["spec.gamma"] for r in runs} == {3, 4, 5}
    assert all(0.1 <= r["train.clip_low"] <= 0.3 for r in runs)
    # log-uniform: about half the draws below the geometric midpoint 1e-5 (uniform would give ~9%)
    assert 15 <= sum(r["train.lr"] < 1e-5 for r in runs) <= 35
    assert len(sw.expand_runs(sweep, max_runs=3)) == 3


def test_sweep_best_run_follows_goal_and_skips_failed_runs():
    runs = [{"exit_code": 0, "metric": 0.5}, {"exit_code": 0, "metric": 0.9},
            {"exit_code": 1, "metric": 2.0}, {"exit_code": 0, "metric": None},
            {"exit_code": 0, "metric": math.nan}, {"exit_code": 0, "metric": 0.1}]
    assert sw.best_run(runs, "maximize") is runs[1]
    assert sw.best_run(runs, "minimize") is runs[5]
    assert sw.best_run(runs[2:4], "minimize") is None


def test_sweep_mini_sweep_runs_each_command_and_picks_best(tmp_path, capsys):
    sweep = {"method": "grid", "metric": {"name": "loss", "goal": "minimize"},
             "parameters": {"x": {"values": [0, 1, 2, 3]}},
             "command": ["${interpreter}", "-c", PROGRAM, "${args_no_hyphens}"]}
    out = tmp_path / "out"
    rc = sw.main([_write(tmp_path, sweep), "--sweep-dir", str(out)])
    assert rc == 1  # run 3 failed
    result = json.loads((out / "sweep.json").read_text())
    assert [r["exit_code"] for r in result["runs"]] == [0, 0, 0, 1]
    assert [r["metric"] for r in result["runs"]] == [4.0, 1.0, 0.0, 1.0]  # the mean over steps
    assert [r["metric_last"] for r in result["runs"]] == [3.0, 0.0, -1.0, 0.0]
    assert result["runs"][0]["metric_std"] == pytest.approx(2 ** 0.5)
    assert [r["overrides"] for r in result["runs"]] == [["x=0"], ["x=1"], ["x=2"], ["x=3"]]
    assert result["runs"][2]["run_dir"] == str(out / "run-2")
    assert result["best"]["index"] == 2 and result["best"]["metric"] == 0.0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert "4 of 4 runs" in summary and "best: run-2 x=2 (loss = 0 (mean of 2 steps" in summary
    assert summary.endswith("within its std: run-1")  # |1 - 0| <= sqrt(2); run-3 failed

    sweep["metric"]["goal"] = "maximize"
    sw.main([_write(tmp_path, sweep), "--sweep-dir", str(tmp_path / "out2")])
    assert json.loads((tmp_path / "out2" / "sweep.json").read_text())["best"]["index"] == 0


def test_sweep_dry_run_prints_commands_only(tmp_path, capsys):
    out = tmp_path / "out"
    assert sw.main([_write(tmp_path, GRID), "--sweep-dir", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    assert lines[0] == (f"/usr/bin/env er-train configs/default.yaml spec.mode=rtn spec.gamma=5 "
                        f"train.num_steps=3 run_dir={out / 'run-0'}")
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ("method: grid\nparameters: {a: {values: [1, 2]\n", "not valid YAML"),
    ("command: [${env}, er-train]\n", "not valid YAML"),
    ("method: bayes\nparameters: {a: {values: [1]}}\n", "method: expected one of"),
    ("method: grid\nparameters: {a: {distribution: uniform, min: 0, max: 1}}\n", "needs values"),
    ("method: random\nparameters: {a: {distribution: log_uniform_values, min: 1e-6, max: 1.0}}\n",
     "numeric min <= max"),
    ("method: random\nparameters: {a: {values: [1]}}\n", "--max-runs"),
    ("- just\n- a list\n", "mapping"),
])
def test_sweep_bad_file_exits_2_with_one_error_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert sw.main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("error: ")
    assert message in captured.err


def test_sweep_cli_missing_file_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.sweep", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'nope.yaml'}: sweep file not found\n"
