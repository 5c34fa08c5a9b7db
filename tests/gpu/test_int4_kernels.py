"""spec.draft_kernel's int4 kernels on the GPU (device only): each against the matmul with its dequantized weight,
in-place requant under a captured CUDA graph (the draft graphs are captured once and replayed after every weight
sync), the bitwise check, and one engine per non-default kernel: graphs captured, the draft accepted, the twins
requantized by a weight update. gemlite compiles / autotunes (Triton) on the first call of each M: a cold cache
costs seconds per shape."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from er_sglang.sglang import int4_kernels as ik
from er_sglang.sglang import marlin_int4 as mi

pytestmark = pytest.mark.gpu
RESULTS = os.environ.get("ER_GPU_RESULTS", "/tmp/er_gpu_results")
Q7_SHAPES = [(4608, 3584), (3584, 18944)]  # Qwen2.5-7B qkv and down [N, K]: listed in gemlite's H100 cache
HAS = {"marlin": importlib.util.find_spec("sglang") is not None,
       "tinygemm": hasattr(torch.ops.aten, "_weight_int4pack_mm"),
       "gemlite": importlib.util.find_spec("gemlite") is not None}
KERNELS = [pytest.param(k, marks=pytest.mark.skipif(not HAS[k], reason=f"{k}: library missing"))
           for k in ik.KERNELS]


class _Dense:
    def apply(self, layer, x, bias=None):
        return x @ layer.weight.t()


class _Layer(torch.nn.Module):
    pass


def _layer(w, kernel):
    """A stand-in target linear (bf16 weight + plain method) with its int4 twin run by `kernel`."""
    lay = _Layer()
    lay.weight = torch.nn.Parameter(w, requires_grad=False)
    lay.quant_method = _Dense()
    ik.attach(lay, kernel)
    return lay


def _w(n, k, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)


def _rel(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def _draft(lay, x, bias=None):
    with mi.draft_mode():
        return lay.quant_method.apply(lay, x, bias)


@pytest.mark.parametrize("name", KERNELS)
def test_int4_kernel_matches_its_dequantized_weight(name):
    """M = 1 / 3 / 16 / 64 take gemlite's GEMV, split-K GEMV, split-K GEMM and GEMM kernels."""
    kern = ik.get_kernel(name)
    errs = {}
    for i, (n, k) in enumerate(Q7_SHAPES):
        w = _w(n, k, i)
        lay = _layer(w, kern)
        ref_w = kern.dequant(w, mi.GROUP_SIZE)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        for m in (1, 3, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ ref_w.t()
            errs[f"{n}x{k}_m{m}"] = _rel(_draft(lay, x), ref)
            errs[f"{n}x{k}_m{m}_bias"] = _rel(_draft(lay, x, bias), ref + bias.float())
            assert torch.equal(lay.quant_method.apply(lay, x), x @ w.t())  # outside draft_mode: the target
        x3 = torch.randn(2, 3, k, device="cuda", dtype=torch.bfloat16)  # leading dims kept
        assert _draft(lay, x3).shape == (2, 3, n)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"int4_kernel_{name}.json"), "w") as f:
        json.dump({"rel_err": errs}, f, indent=1)
    assert max(errs.values()) < 1e-2, errs


@pytest.mark.parametrize("name", KERNELS)
def test_requant_in_place_keeps_a_captured_graph_valid(name):
    kern = ik.get_kernel(name)
    n, k = Q7_SHAPES[0]
    w0, w1 = _w(n, k, 0), _w(n, k, 1)
    lay = _layer(w0, kern)
    x = torch.randn(4, k, device="cuda", dtype=torch.bfloat16)  # the graph's static input
    assert ik.warmup(kern, [lay.er_int4], [4]) == 1  # compile / autotune now, as SGLang's eager warm-up forwards do
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _draft(lay, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with mi.draft_mode(), torch.cuda.graph(graph):
        y = lay.quant_method.apply(lay, x, None)
    graph.replay()
    y0 = y.clone()
    assert _rel(y0, _draft(lay, x)) < 1e-3
    ptrs = {t: lay.er_int4[t].data_ptr() for t in kern.packed}
    lay.weight.data.copy_(w1)  # a weight sync: the twin is stale until requantized
    assert not ik.is_fresh(lay, kern)
    ik.requant_(lay, lay.weight.data, kern)
    assert ik.is_fresh(lay, kern)  # bitwise equal to a fresh pack
    assert {t: lay.er_int4[t].data_ptr() for t in kern.packed} == ptrs
    graph.replay()
    torch.cuda.synchronize()
    assert _rel(y, y0) > 0.5  # the replay reads the new twin...
    assert _rel(y, _draft(lay, x)) < 1e-3  # ...exactly as an eager call does
    assert _rel(y, x.float() @ kern.dequant(w1, mi.GROUP_SIZE).t()) < 1e-2


def _perturbed_state_dict(path: str, scale: float) -> dict:
    from safetensors.torch import load_file

    sd = load_file(os.path.join(path, "model.safetensors"), device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    return {k: (v.float() + scale * v.float().std() * torch.randn(v.shape, device="cuda", generator=gen)
                ).to(v.dtype) for k, v in sd.items()}


@pytest.mark.parametrize("name", [p for p in KERNELS if p.values[0] != "marlin"])  # marlin: test_sglang_engine
def test_engine_drafts_with_kernel_and_requantizes_on_update(tiny_path, name):
    pytest.importorskip("sglang")
    from er_sglang.engine import SamplingParams
    from er_sglang.sglang.engine import SGLangEngine

    from .conftest import small_engine_args

    prompts = [[11, 22, 33, 44, 55, 66, 77, 88], [5, 7, 9, 11, 13]]
    greedy = SamplingParams(max_new_tokens=32, temperature=0.0)
    spec = {"mode": "rtn", "gamma": 3, "gamma_ladder": [3], "bs_max": 4, "draft_kernel": name}
    eng = SGLangEngine(tiny_path, spec, small_engine_args(cuda_graph_max_bs_decode=8))
    try:
        eng.stats(reset=True)
        ids0 = [r.output_ids for r in eng.generate(prompts, greedy, ignore_eos=True)]
        st0, check0 = eng.stats(reset=True), eng.rpc("draft_check")
        times = eng.update_weights(_perturbed_state_dict(tiny_path, 0.5))
        check1 = eng.rpc("draft_check")
        ids1 = [r.output_ids for r in eng.generate(prompts, greedy, ignore_eos=True)]
        st1 = eng.stats(reset=True)
    finally:
        eng.shutdown()
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"engine_draft_kernel_{name}.json"), "w") as f:
        json.dump({"accept_rate": [st0.accept_rate, st1.accept_rate], "gamma_hist": [st0.gamma_hist, st1.gamma_hist],
                   "draft_check": [check0, check1], "times": times}, f, indent=1, default=str)
    assert check0["all_equal"] and check0["num_linears"] == 16 and check1["all_equal"]
    assert times["requant_s"] > 0 and ids1 != ids0
    # greedy drafts are accepted when the draft's argmax is the target's: a replayed draft graph reading stale
    # (pre-update) twins would agree with the perturbed target about as rarely as two random models
    assert st0.accept_rate > 0.3 and st1.accept_rate > 0.3, (st0.accept_rate, st1.accept_rate)
