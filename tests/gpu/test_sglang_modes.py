"""Every spec mode starts an SGLangEngine and generates; spec counts have the right denominator."""
from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("sglang")

from er_sglang.engine import SamplingParams
from er_sglang.sglang.engine import SGLangEngine

from .conftest import small_engine_args
from .test_sglang_engine import RESULTS, ROOFLINE

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", ["rtn", "toggle", "adaptive", "no-sd"])
def test_engine_starts_with_mode(tiny_path, mode):
    spec = {"mode": mode, "gamma": 5, "gamma_ladder": [3, 5, 7], "roofline": ROOFLINE,
            "policy": {"rampup_batch": 0} if mode in ("toggle", "adaptive") else {}}
    eng = SGLangEngine(tiny_path, spec, small_engine_args(cuda_graph_max_bs_decode=8))
    try:
        outs = eng.generate([[1, 2, 3, 4 + i] for i in range(8)], SamplingParams(max_new_tokens=20),
                            ignore_eos=True)
        st = eng.stats(reset=True)
        eng.end_rollout()
    finally:
        eng.shutdown()
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"mode_{mode}.json"), "w") as f:
        json.dump({"stats": st.__dict__, "rollouts": [(r.num_drafted, r.num_accepted, r.num_verify_steps)
                                                       for r in outs]}, f, default=str)
    assert all(len(r.output_ids) == 20 and len(r.logprobs) == 20 for r in outs)
    if mode == "no-sd":
        assert st.num_drafted == 0
        return
    assert sum(r.num_drafted for r in outs) == st.num_drafted
    assert sum(r.num_accepted for r in outs) == st.num_accepted
    if mode == "rtn":
        assert set(st.gamma_hist) == {5}
        assert all(r.num_drafted == 5 * r.num_verify_steps for r in outs)
