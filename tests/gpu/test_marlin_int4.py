"""int4 RTN + Marlin kernel pieces of the self-drafter (device only; the first run JIT-compiles Marlin)."""
from __future__ import annotations

import json
import os
import time

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("sglang")

from er_sglang.sglang import marlin_int4 as mi

pytestmark = pytest.mark.gpu
RESULTS = os.environ.get("ER_GPU_RESULTS", "/tmp/er_gpu_results")
# Qwen2.5-7B decoder linears as [N, K]: qkv, o, gate_up, down
Q7_SHAPES = [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)]


class _Dense:
    def apply(self, layer, x, bias=None):
        return x @ layer.weight.t()


class _Layer(torch.nn.Module):
    pass


def _layer(w):
    """A stand-in target linear (bf16 weight + plain method) with its int4 draft twin attached."""
    lay = _Layer()
    lay.weight = torch.nn.Parameter(w, requires_grad=False)
    lay.quant_method = _Dense()
    mi.attach_draft_int4(lay)
    return lay


def test_zero_points_match_sglang():
    from sglang.srt.layers.quantization.marlin_utils import marlin_zero_points

    w = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16)
    _, _, zero = mi.quantize_rtn(w)
    ref = marlin_zero_points(zero.t().contiguous().to(torch.int32), 512 // 128, 1024, 4)
    assert torch.equal(mi.marlin_zero_points(zero, 1024), ref.to("cuda"))


@pytest.mark.parametrize("m", [1, 16, 64])
def test_marlin_gemm_matches_dequantized_rtn(m):
    torch.manual_seed(0)
    errs = {}
    for n, k in [(1024, 512), (4608, 3584), (3584, 18944)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        lay = _layer(w)
        with mi.draft_mode():
            y = lay.quant_method.apply(lay, x)
        y_target = lay.quant_method.apply(lay, x)  # outside draft_mode: the target's own bf16 weight
        ref = x.float() @ mi.dequantize_rtn(*mi.quantize_rtn(w)).float().t()
        errs[(n, k)] = float((y.float() - ref).norm() / ref.norm())
        assert torch.equal(y_target, x @ w.t())
    assert max(errs.values()) < 1e-2, errs


def test_requant_in_place_equals_fresh_quantization():
    w0 = torch.randn(4608, 3584, device="cuda", dtype=torch.bfloat16) * 0.02
    w1 = torch.randn_like(w0) * 0.02
    lay = _layer(w0)
    ptrs = {k: lay.er_int4[k].data_ptr() for k in ("qweight", "scales", "zeros")}
    mi.requant_int4_(lay, w1)
    fresh = mi.marlin_pack(w1)
    for k, ptr in ptrs.items():
        assert lay.er_int4[k].data_ptr() == ptr
        assert torch.equal(lay.er_int4[k], fresh[k])


def test_requant_time_and_bytes_qwen7b_shapes():
    """Re-quantizing all 28 x 4 Qwen2.5-7B linears (timed on one layer's weights, 28 times)."""
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in Q7_SHAPES]
    lays = [_layer(w) for w in ws]
    int4_bytes = sum(sum(t.numel() * t.element_size() for t in lay.er_int4.values()
                         if isinstance(t, torch.Tensor)) for lay in lays) * 28
    bf16_bytes = sum(n * k * 2 for n, k in Q7_SHAPES) * 28
    for lay, w in zip(lays, ws):
        mi.requant_int4_(lay, w)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(28):
        for lay, w in zip(lays, ws):
            mi.requant_int4_(lay, w)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "marlin_requant.json"), "w") as f:
        json.dump({"requant_all_linears_s": dt, "int4_bytes": int4_bytes, "bf16_linear_bytes": bf16_bytes,
                   "ratio_linears": int4_bytes / bf16_bytes}, f)
    assert int4_bytes / bf16_bytes < 0.3
