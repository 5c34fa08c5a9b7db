"""The variants scripts/bench_int4_gemv.py times: one RTN int4 (or row-wise int8) weight, repacked per kernel.

Layer = a random bf16 weight w [N, K] and its quantization (q, s, z, w_hat = (q - z) * s, group 128);
builder(Layer) -> Built = the packed weights, make(weights) -> fn(x) computing x @ w_ref^T for x [M, K], and
the reference w_ref the error is measured against. VARIANTS maps a name to (kind, builder) in run order.
Byte counts (int4_bytes, tensor_bytes) and the packings (AWQ / GPTQ nibble order, tinygemm's float zero,
int8 per-row absmax) live here with the kernels that read them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from er_sglang.sglang import int4_kernels as ik
from er_sglang.sglang import marlin_int4 as mi

GROUP = mi.GROUP_SIZE
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ int32 holds column AWQ_ORDER[i] of its 8
SEQ_ORDER = list(range(8))


def int4_bytes(n: int, k: int, group: int = GROUP, scale_bytes: int = 2, zero_bits: int = 4) -> int:
    """Bytes of one int4 g-group weight: N*K/2 codes + N*K/g scales and zeros (Marlin, AWQ, GPTQ: 4-bit zeros;
    tinygemm and gemlite keep a bf16 zero, zero_bits=16)."""
    g = n * (k // group)
    return n * k // 2 + g * scale_bytes + g * zero_bits // 8


def tensor_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values() if isinstance(t, torch.Tensor))


def pack_cols(v: torch.Tensor, order: list[int]) -> torch.Tensor:
    """v [R, C] (0..15) -> [R, C/8] int32; nibble i (bits 4i..4i+3) of word j holds column 8j + order[i]."""
    r, c = v.shape
    v = v.to(torch.int64).reshape(r, c // 8, 8)[..., order]
    shifts = 4 * torch.arange(8, device=v.device, dtype=torch.int64)
    return mi._to_int32((v << shifts).sum(-1)).contiguous()


def tinygemm_scales_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Integer zero z -> tinygemm's float zero: (q - z) * s = (q - 8) * s + (8 - z) * s. -> [K/g, N, 2] bf16."""
    return ik.tinygemm_qparams(scale, ((8 - zero.float()) * scale.float()).to(torch.bfloat16))


def tinygemm_dequant(q: torch.Tensor, sz: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """What tinygemm computes from q [N, K] and sz [K/g, N, 2]: (q - 8) * s + zf, float32 [N, K]."""
    n, k = q.shape
    s, zf = sz[..., 0].t().float().unsqueeze(-1), sz[..., 1].t().float().unsqueeze(-1)
    return ((q.float().reshape(n, k // group, group) - 8) * s + zf).reshape(n, k)


def int8_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: s = absmax / 127 (bf16), w8 = round(w / s) -> (w8 [N, K] int8, s [N] bf16)."""
    s = (w.float().abs().amax(1) / 127).clamp(min=1e-8).to(torch.bfloat16)
    return (w.float() / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8), s


@dataclass
class Layer:
    """One random bf16 weight [N, K] and its RTN int4 quantization (shared by every variant)."""
    name: str
    w: torch.Tensor
    q: torch.Tensor
    s: torch.Tensor
    z: torch.Tensor
    w_hat: torch.Tensor


def make_layer(name: str, n: int, k: int, device: str, seed: int = 0) -> Layer:
    gen = torch.Generator(device=device).manual_seed(seed)
    w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(torch.bfloat16)
    q, s, z = mi.quantize_rtn(w, GROUP)
    return Layer(name, w, q, s, z, mi.dequantize_rtn(q, s, z, GROUP))


@dataclass
class Built:
    """A variant on one layer: weights (cloned per rotation copy, counted in bytes), make(weights) -> fn(x)."""
    weights: dict
    make: Callable
    w_ref: torch.Tensor
    x_dtype: torch.dtype = torch.bfloat16
    info: dict = field(default_factory=dict)


def build_bf16(L: Layer) -> Built:
    return Built({"w": L.w}, lambda t: lambda x: torch.nn.functional.linear(x, t["w"]), L.w)


def build_marlin(L: Layer) -> Built:
    b = mi._int4_buffers(L.w, GROUP)  # exactly the drafter's buffers and call

    def make(t):
        bufs = dict(b, **t)
        return lambda x: mi._marlin_apply(bufs, x, None)
    return Built({k: b[k] for k in ("qweight", "scales", "zeros")}, make, L.w_hat)


def build_tinygemm(L: Layer) -> Built:
    sz = tinygemm_scales_zeros(L.s, L.z)
    dev = (tinygemm_dequant(L.q, sz) - L.w_hat.float()).abs()  # the bf16 rounding of (8 - z) * s
    info = {"max_abs_dev_vs_rtn": float(dev.max()),
            "max_dev_over_scale": float((dev.reshape(L.q.shape[0], -1, GROUP) / L.s.float().unsqueeze(-1)).max())}
    n, k = L.q.shape

    def make(t):
        b = dict(t, n=n, k=k, group_size=GROUP)
        return lambda x: ik.tinygemm_apply(b, x, None)
    return Built({"qweight": ik.tinygemm_pack_codes(L.q), "scales_zeros": sz}, make, L.w_hat, info=info)


def _gemlite_built(lin, w_ref: torch.Tensor) -> Built:
    from gemlite.core import forward_functional

    meta, ms = lin.get_meta_args(), lin.meta_scale
    return Built({k: getattr(lin, k).data for k in ("W_q", "scales", "zeros")},
                 lambda t: lambda x: forward_functional(x, None, [t["W_q"], t["scales"], t["zeros"], ms], meta),
                 w_ref, info={"meta_args": meta})


def build_gemlite(L: Layer) -> Built:
    b = ik.gemlite_buffers(L.w, GROUP)  # exactly the drafter's buffers and call: fma_mode=False, (q - z) * s

    def make(t):
        bufs = dict(b, **t)
        return lambda x: ik.gemlite_apply(bufs, x, None)
    return Built({k: b[k] for k in ik.GEMLITE_PACKED}, make, L.w_hat, info={"meta_args": b["meta"]})


def build_gemlite_fma(L: Layer) -> Built:
    g = ik.gemlite_setup()
    n, k = L.q.shape
    lin = g.GemLiteLinear(4, group_size=GROUP, in_features=k, out_features=n,
                          input_dtype=g.DType.BF16, output_dtype=g.DType.BF16)
    lin.pack(L.q, L.s, L.z.to(torch.bfloat16), bias=None, fma_mode=True)  # q * s + (-z * s)
    return _gemlite_built(lin, L.w_hat)


def build_int8_torch(L: Layer) -> Built:
    w8, s = int8_rowwise(L.w)
    return Built({"w8": w8, "s": s}, lambda t: lambda x: torch._weight_int8pack_mm(x, t["w8"], t["s"]),
                 w8.float() * s.float()[:, None])


def build_gemlite_w8(L: Layer) -> Built:
    from gemlite.helper import A16W8_INT8

    ik.gemlite_setup()
    w8, s = int8_rowwise(L.w)
    lin = A16W8_INT8(device=str(L.w.device), dtype=torch.bfloat16).from_weights(w8, scales=s.view(-1, 1))
    return _gemlite_built(lin, w8.float() * s.float()[:, None])


def build_exllama(L: Layer) -> Built:
    from sgl_kernel import gptq_gemm, gptq_shuffle

    empty = torch.empty(0, dtype=torch.int32, device=L.w.device)
    qweight = mi.pack_gptq(L.q)
    gptq_shuffle(qweight, empty, 4)
    qzeros = pack_cols(((L.z.to(torch.int32) - 1) & 0xF).t().contiguous(), SEQ_ORDER)  # GPTQ v1: z - 1
    w = {"qweight": qweight, "qzeros": qzeros, "scales": L.s.t().contiguous().half()}
    return Built(w, lambda t: lambda x: gptq_gemm(x, t["qweight"], t["qzeros"], t["scales"], empty, True, 4),
                 L.w_hat, torch.float16, {"zp0_groups_frac": float((L.z == 0).float().mean())})


def build_awq_triton(L: Layer) -> Built:
    from sglang.kernels.ops.quantization.awq_triton import awq_gemm_triton

    # fp16: its tl.dot accumulates in the scales' dtype, and Triton refuses out_dtype=bfloat16
    w = {"qweight": pack_cols(L.q.t().contiguous(), AWQ_ORDER), "scales": L.s.t().contiguous().half(),
         "qzeros": pack_cols(L.z.t().contiguous(), AWQ_ORDER)}
    return Built(w, lambda t: lambda x: awq_gemm_triton(x, t["qweight"], t["scales"], t["qzeros"], 8),
                 L.w_hat, torch.float16)


# name -> (kind, builder), in run order (the budget is shared in this order; the least proven kernels last)
VARIANTS = {
    "bf16": ("bf16", build_bf16), "marlin": ("int4", build_marlin), "tinygemm": ("int4", build_tinygemm),
    "gemlite": ("int4", build_gemlite), "int8_torch": ("int8", build_int8_torch),
    "gemlite_w8": ("int8", build_gemlite_w8), "gemlite_fma": ("int4", build_gemlite_fma),
    "exllama": ("int4", build_exllama), "awq_triton": ("int4", build_awq_triton),
}
