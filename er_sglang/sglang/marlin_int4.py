"""Int4 RTN (g=128, asymmetric, integer zero points) draft linears executed by SGLang's JIT Marlin kernel.

Quantization: torchao's ASYMMETRIC affine primitives (uint4, integer zero points, per output row and
group of `group_size` input columns, bf16 arithmetic):

    lo = min(min(w_g), 0)   hi = max(max(w_g), 0)
    s  = max((hi - lo) / 15, eps)
    z  = clamp(-round(lo / s), 0, 15)
    q  = clamp(round(w * (1/s)) + z, 0, 15)      w_hat = (q - z) * s

Execution: Marlin `scalar_types.uint4` with zero points (the AWQ-Marlin path of SGLang), one
`gptq_marlin_gemm` per linear, CUDA-graph safe. The draft is not a second model: each target linear keeps
its bf16 weight and gains `er_int4` buffers; inside `draft_mode()` it runs those instead (SelfDraftMethod),
so embeddings, norms, rotary tables, lm_head and the attention layers (hence the KV pool) are shared. Re-quantization after a weight update writes the new
packed weight / scales / zeros into the existing buffers with `copy_` (captured graphs keep pointers).
Marlin is spec.draft_kernel's default; int4_kernels.py runs the twins with tinygemm or gemlite instead.

Helpers quantize_rtn (torchao), dequantize_rtn, pack_* import no SGLang; the kernel side does, lazily.
"""
from __future__ import annotations

import torch

from er_sglang.int4_linear import SCALE_EPS  # the scale floor of both int4 grids

GROUP_SIZE = 128
_SCALE_PERM = [i + 8 * j for i in range(8) for j in range(8)]  # marlin_utils.get_scale_perms()[0]
_ZP_INTERLEAVE = [0, 2, 4, 6, 1, 3, 5, 7]


def quantize_rtn(w: torch.Tensor, group_size: int = GROUP_SIZE):
    """w [N, K] -> (q [N, K] uint8 in 0..15, scale [N, K/g] bf16, zero [N, K/g] uint8), torchao's RTN.

    torchao.quantization.quant_primitives (ASYMMETRIC, int zero point, zero preserved), computed in bf16
    exactly as torchao's Int4 affine workflows do, with the scale floor at SCALE_EPS: left unset, torchao
    floors s at torch.finfo(bfloat16).eps = 2^-7, which coarsens every group whose range is below 15 * 2^-7
    (84% of Qwen2.5-Coder-0.5B's groups; paired alpha -0.0198 vs the float-zero grid, -0.0024 with
    SCALE_EPS: docs/benchmarks.md §9b).
    """
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features={k} is not a multiple of group_size={group_size}")
    w = w.to(torch.bfloat16)
    block = (1, group_size)
    scale, zero = choose_qparams_affine(w, MappingType.ASYMMETRIC, block, torch.uint8, 0, 15, eps=SCALE_EPS,
                                        scale_dtype=torch.bfloat16, zero_point_dtype=torch.int32)
    q = quantize_affine(w, block, scale, zero, torch.uint8, 0, 15)
    return q, scale.reshape(n, k // group_size), zero.reshape(n, k // group_size).to(torch.uint8)


def dequantize_rtn(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int = GROUP_SIZE):
    """Inverse of quantize_rtn: [N, K] bf16 w_hat = (q - z) * s."""
    n, k = q.shape
    qg = q.float().reshape(n, k // group_size, group_size)
    w = (qg - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return w.reshape(n, k).to(torch.bfloat16)


def _to_int32(x64: torch.Tensor) -> torch.Tensor:
    """int64 holding 32 packed bits -> int32 with the same bits (two's complement)."""
    return torch.where(x64 >= 2**31, x64 - 2**32, x64).to(torch.int32)


def pack_gptq(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] (0..15) -> GPTQ layout [K/8, N] int32, 8 values along K per int32 (low bits first)."""
    n, k = q.shape
    qt = q.t().to(torch.int64).reshape(k // 8, 8, n)
    shifts = (4 * torch.arange(8, device=q.device, dtype=torch.int64)).view(1, 8, 1)
    return _to_int32((qt << shifts).sum(dim=1)).contiguous()


def marlin_zero_points(zero: torch.Tensor, n: int) -> torch.Tensor:
    """zero [N, G] (0..15) -> Marlin zero points [G, N/8] int32 (GPU version of marlin_utils.marlin_zero_points)."""
    zp = zero.t().to(torch.int64).contiguous()  # [G, N]
    g = zp.shape[0]
    perm = torch.tensor(_SCALE_PERM, device=zp.device)
    inter = torch.tensor(_ZP_INTERLEAVE, device=zp.device)
    zp = zp.reshape(-1, 64)[:, perm].reshape(-1, 8)[:, inter].reshape(g, n)
    shifts = (4 * torch.arange(8, device=zp.device, dtype=torch.int64)).view(1, 1, 8)
    return _to_int32((zp.reshape(g, n // 8, 8) << shifts).sum(dim=-1)).contiguous()


def marlin_pack(w: torch.Tensor, group_size: int = GROUP_SIZE) -> dict[str, torch.Tensor]:
    """w [N, K] bf16 (CUDA) -> {"qweight", "scales", "zeros"} in Marlin's layout (new tensors)."""
    from sglang.kernels.ops.quantization.gptq_marlin_repack import gptq_marlin_repack
    from sglang.srt.layers.quantization.marlin_utils import marlin_permute_scales

    n, k = w.shape
    q, scale, zero = quantize_rtn(w, group_size)
    empty = torch.empty(0, dtype=torch.int32, device=w.device)
    qweight = gptq_marlin_repack(pack_gptq(q), empty, k, n, 4)
    scales = marlin_permute_scales(scale.t().contiguous(), k, n, group_size)
    return {"qweight": qweight, "scales": scales, "zeros": marlin_zero_points(zero, n)}


_DRAFT = {"on": False}  # set by draft_mode(); read by SelfDraftMethod at trace/capture time


class draft_mode:
    """Context manager: every self-draft linear runs its int4 twin (spec.draft_kernel) instead of the target's.

    The flag is read in Python, so a CUDA graph captured inside the context holds the int4 kernels and one
    captured outside holds the target's: the graph, not the flag, decides at replay.
    """

    def __enter__(self):
        self._prev = _DRAFT["on"]
        _DRAFT["on"] = True
        return self

    def __exit__(self, *exc):
        _DRAFT["on"] = self._prev
        return False


def is_draft_mode() -> bool:
    return _DRAFT["on"]


def _marlin_apply(b: dict, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from sgl_kernel.scalar_type import scalar_types
    from sglang.srt.layers.quantization.marlin_utils import apply_awq_marlin_linear

    return apply_awq_marlin_linear(
        input=x, weight=b["qweight"], weight_scale=b["scales"], weight_zp=b["zeros"],
        g_idx=b["empty"], g_idx_sort_indices=b["empty"], workspace=b["workspace"],
        quant_type=scalar_types.uint4, output_size_per_partition=b["n"],
        input_size_per_partition=b["k"], bias=bias)


class SelfDraftMethod:
    """quant_method of a TARGET linear that also holds its int4 draft: the target's own method outside
    draft_mode(), the int4 GEMM `int4_apply(layer.er_int4, x, bias)` inside it (one module, two weights).
    int4_apply is Marlin's here; int4_kernels.py gives the other spec.draft_kernel choices."""

    def __init__(self, target_method, int4_apply=None):
        self.target_method = target_method
        self.int4_apply = int4_apply or _marlin_apply

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if _DRAFT["on"]:
            return self.int4_apply(layer.er_int4, x, bias)
        return self.target_method.apply(layer, x, bias)

    def __getattr__(self, name):  # everything else (process_weights_after_loading, ...) is the target's
        return getattr(self.target_method, name)


def _int4_buffers(w: torch.Tensor, group_size: int) -> dict:
    from sglang.srt.layers.quantization.marlin_utils import marlin_make_workspace

    n, k = w.shape
    bufs = marlin_pack(w, group_size)
    bufs["workspace"] = marlin_make_workspace(w.device)
    bufs["empty"] = torch.empty(0, dtype=torch.int32, device=w.device)
    return dict(bufs, n=n, k=k)


def _num_bytes(bufs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in bufs.values() if isinstance(t, torch.Tensor))


def attach_draft_int4(layer, group_size: int = GROUP_SIZE) -> int:
    """Give a target linear its int4 draft twin (quantized from layer.weight); returns bytes added.

    The target weight and method stay; `layer.quant_method` becomes a SelfDraftMethod around them."""
    layer.er_int4 = _int4_buffers(layer.weight.data, group_size)
    install_draft_method(layer, _marlin_apply)
    return _num_bytes(layer.er_int4)


def install_draft_method(layer, int4_apply) -> None:
    """layer.quant_method becomes (or stays, with its int4 GEMM replaced) a SelfDraftMethod around the target's."""
    if isinstance(layer.quant_method, SelfDraftMethod):
        layer.quant_method.int4_apply = int4_apply
    else:
        layer.quant_method = SelfDraftMethod(layer.quant_method, int4_apply)


@torch.no_grad()
def requant_int4_(layer, w: torch.Tensor, group_size: int = GROUP_SIZE) -> None:
    """Re-quantize the target weight w into the layer's existing Marlin buffers (in place)."""
    new = marlin_pack(w, group_size)
    for name in ("qweight", "scales", "zeros"):
        layer.er_int4[name].copy_(new[name])
