"""A real model on the GPU (device only): Qwen2.5-Coder-0.5B-Instruct staged and converted by
scripts/accept_real.py (`assemble --out /tmp/q05`; ER_REAL_MODEL names the dir).

- acceptance of the int4 self-drafter on MATH prompts at T=1, gamma=3, next to the CPU reference engine's
  on the same prompt ids and the same int4 grid (docs/results/accept_q05_cpu_marlin.json: Marlin's integer
  zero points; accept_q05_cpu.json is the CPU default's float-zero grid);
- lossless with real acceptance: the marginals of emitted tokens 2..4 at gamma=3 equal plain decoding's
  (gamma=0 on the same engine, the target's own decode step), chi-square, with accept rate >= 0.5.

head_dim 64 is not in the prebuilt flashinfer JIT cache: these run with triton attention.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("sglang")

MODEL = os.environ.get("ER_REAL_MODEL", "/tmp/q05")
if not os.path.isfile(os.path.join(MODEL, "config.json")):
    pytest.skip(f"no staged real model at {MODEL} (scripts/accept_real.py stage/assemble)", allow_module_level=True)

from er_sglang.engine import SamplingParams
from scripts import accept_real

from .test_sglang_engine import RESULTS, _contingency_pvalue, record

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = os.path.join(ROOT, "tests", "gpu", "data", "math_prompts_q05.json")
CPU = os.path.join(ROOT, "docs", "results", "accept_q05_cpu_marlin.json")  # the GPU default's grid


def test_acceptance_next_to_the_cpu_reference():
    out = os.path.join(RESULTS, "accept_q05_gpu.json")
    args = argparse.Namespace(model=MODEL, prompts=PROMPTS, gamma=3, temperature=1.0, max_new_tokens=128, seed=0,
                              json=out, backend="triton", draft_kernel="marlin")
    accept_real.cmd_gpu(args)
    with open(out) as f:
        gpu = json.load(f)
    with open(CPU) as f:
        cpu = json.load(f)
    record("accept_q05_compare", {k: {"accept_rate": d["accept_rate"], "mean_accept_len": d["mean_accept_len"],
                                      "num_tokens": d["num_tokens"], "device": d["device"]}
                                  for k, d in (("gpu", gpu), ("cpu", cpu))})
    assert gpu["num_prompts"] == cpu["num_prompts"] and set(gpu["gamma_hist"]) == {"3"}
    assert gpu["draft_grid"] == cpu["draft_grid"] == "int_zero", (gpu["draft_grid"], cpu["draft_grid"])
    # bf16 target and Marlin draft vs fp32 CPU: statistically equal acceptance (s.e. ~0.006 per engine)
    assert abs(gpu["accept_rate"] - cpu["accept_rate"]) <= 0.03, (gpu["accept_rate"], cpu["accept_rate"])


def test_lossless_with_real_acceptance():
    from er_sglang.sglang.engine import SGLangEngine

    data = accept_real.read_prompts(PROMPTS, MODEL)
    prompt = data["prompts"][0]["ids"]
    spec = {"mode": "rtn", "gamma": 3, "gamma_ladder": [3], "bs_max": 64, "timing": False}
    eng = SGLangEngine(MODEL, spec, {"attention_backend": "triton", "mem_fraction_static": 0.5,
                                     "max_running_requests": 64, "cuda_graph_max_bs_decode": 64,
                                     "disable_prefill_cuda_graph": True, "log_level": "warning"})
    n, pos = 1536, 4
    params = SamplingParams(max_new_tokens=pos, temperature=1.0, top_p=1.0, seed=0)
    try:
        eng.rpc("set_gamma", gamma=0)
        eng.stats(reset=True)
        ar = [r.output_ids for r in eng.generate([prompt] * n, params, ignore_eos=True)]
        st_ar = eng.stats(reset=True)
        eng.rpc("set_gamma", gamma=3)
        sd = [r.output_ids for r in eng.generate([prompt] * n, dataclasses.replace(params, seed=10_000),
                                                 ignore_eos=True)]
        st_sd = eng.stats(reset=True)
    finally:
        eng.shutdown()
    pvals = [_contingency_pvalue([o[j] for o in ar], [o[j] for o in sd]) for j in range(1, pos)]
    record("lossless_q05", {"n": n, "pvalues_pos1_3": pvals, "sd_accept_rate": st_sd.accept_rate,
                            "sd_gamma_hist": st_sd.gamma_hist, "ar_gamma_hist": st_ar.gamma_hist})
    assert set(st_ar.gamma_hist) == {0} and set(st_sd.gamma_hist) == {3}
    assert st_sd.accept_rate >= 0.5, st_sd.accept_rate
    assert min(pvals) > 1e-3, pvals
