"""Int4 / int8 weight-only primitives and the quantized linears the self-drafter swaps in (drafter.py).

Quantization (both backends, bit-identical codes and scales): torchao's tinygemm RTN formula, computed
on the bf16 cast of the weight, per group of g input features of a row w[g]:
    s = max((max(w) - min(w)) / 15, 1e-6)          zero = min(w) + 8·s       (s, zero in bf16)
    q = clamp(round((w - (zero - 8·s)) / s), 0, 15)   w_hat = (q - 8)·s + zero
i.e. asymmetric 4-bit with a float zero point whose grid spans [min, max] (up to bf16 rounding).

Scheme (`spec.draft_kernel`, build_drafter's `kernel`): "auto" and "tinygemm" = the float-zero grid above (the CPU
default); "marlin" and "gemlite" = the GPU drafter's integer-zero grid (er_sglang/sglang/marlin_int4.quantize_rtn:
lo = min(w, 0), hi = max(w, 0), s = max((hi - lo) / 15, 1e-6), z = clamp(-round(lo / s), 0, 15), w_hat =
bf16((q - z)·s); the floor is marlin_int4.SCALE_EPS: torchao's default for a bf16 weight, 2^-7, floored 84% of
Qwen2.5-0.5B's groups and cost 0.02 of paired acceptance there, docs/benchmarks.md §9b), run by
`IntZeroInt4Linear` (backend "rtn_int_zero": plain
PyTorch, torchao has no CPU kernel for it) with w_hat = marlin_int4.dequantize_rtn(marlin_int4.quantize_rtn(w)) bit
for bit. Same scheme, same draft on both engines. A spec.draft_head=int4 head follows it (quantize_head). On
engine=sglang "auto" is marlin (resolve_kernel, AUTO_KERNEL).

Group size: a linear whose in_features is not a multiple of `group_size` uses the largest of
(group_size, 128, 64, 32) (those below group_size) that divides it, recorded per layer in
`Drafter.group_sizes` (SmolLM2-135M: hidden 576 = 9·64, so q/k/v/o/gate/up use g = 64 and down_proj,
in 1536, uses 128). No padding: a padded group would skew its min/max and the CPU kernel wants K % g = 0.

Backends: "torchao" = torchao's int4 tensor subclass (CPU: prototype `Int4OpaqueTensor`, tinygemm
`aten._weight_int4pack_mm_for_cpu`; CUDA: `Int4TilePackedTo4dTensor`), bf16 activations;
"rtn" = plain PyTorch, packed uint8 codes + bf16 scales/zeros, plus a cached dequantized weight in
the target's dtype (so its forward costs a dense linear: a correctness fallback, not a speedup);
"auto" = torchao where every layer fits its kernel, else rtn. `from_hp` is called directly because
the config class is named differently in torchao 0.17 and 0.18. On CUDA (H100, torch 2.11, torchao
0.17) the tile-packed tensor builds, requantizes in place bit-exactly and shares the cache, but its
kernel's weights are NOT the codes above (~26% of elements > s/2 apart, linear error 0.116 vs 0.099 on
Gaussian weights) and it pads K to 1024: use it only as a check; the GPU drafter is Marlin's job.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "torchao", "rtn")
KERNELS = ("auto", "marlin", "tinygemm", "gemlite")  # spec.draft_kernel: which grid the CPU drafter quantizes to
INT_ZERO_KERNELS = ("marlin", "gemlite")  # the GPU kernels on Marlin's integer-zero codes (int4_kernels.py)
# "auto" per engine: on the GPU Marlin (the fastest int4 GEMM at decode sizes measured on the H100,
# docs/benchmarks.md); on the CPU the float-zero grid, which torchao's CPU int4 kernel runs
AUTO_KERNEL = {"sglang": "marlin", "reference": "tinygemm"}
QMAX = 15  # 4-bit codes 0..15
MID = 8  # tinygemm's zero point sits at code 8: w_hat = (q - 8)·s + zero
SCALE_EPS = 1e-6  # torchao's eps for int4 scales
QPARAM_DTYPE = torch.bfloat16  # torchao quantizes the bf16 weight; rtn does the same to match it


def choose_group_size(in_features: int, group_size: int) -> int:
    """Largest of (group_size, 128, 64, 32) not above group_size that divides in_features."""
    for g in [group_size] + [c for c in (128, 64, 32) if c < group_size]:
        if in_features % g == 0:
            return g
    raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}, 64 or 32")


# ---------------------------------------------------------------------------------------------------
# RTN math (plain PyTorch)
# ---------------------------------------------------------------------------------------------------

def quantize_rtn(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes uint8 [N, K] in 0..15, scales [N, K/g], zeros [N, K/g]) in bf16.

    Same op order and dtype as torchao's `_choose_qparams_affine_tinygemm` +
    `_quantize_affine_tinygemm` (what `Int4OpaqueTensor.from_hp` runs), so codes/scales/zeros equal
    torchao's bit for bit.
    """
    n, k = w.shape
    wg = w.to(QPARAM_DTYPE).reshape(n, k // group_size, group_size)  # [N, G, g]
    min_val, max_val = wg.amin(-1), wg.amax(-1)  # [N, G]
    scales = torch.clamp((max_val - min_val) / float(QMAX), min=SCALE_EPS)
    zeros = min_val + scales * MID
    grid_min = (zeros - scales * MID).unsqueeze(-1)  # recomputed from the rounded zero, as torchao does
    codes = torch.clamp(torch.round((wg - grid_min) / scales.unsqueeze(-1)), 0, QMAX)
    return codes.to(torch.uint8).reshape(n, k), scales, zeros


def dequantize_rtn(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [N, K] (0..15), scales/zeros [N, G] -> w_hat [N, K] = (q - 8)·s + zero, computed in fp32."""
    n, k = codes.shape
    q = codes.reshape(n, scales.shape[1], -1).float() - MID  # [N, G, g]
    w = q * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] -> [N, K/2]: even k in the low nibble, odd k in the high nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: [N, K/2] -> uint8 [N, K]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


# ---------------------------------------------------------------------------------------------------
# Quantized linear modules
# ---------------------------------------------------------------------------------------------------

class RtnInt4Linear(nn.Module):
    """y = x @ w_hat^T + b with w_hat dequantized once per (re)quantization and cached.

    Buffers: qweight uint8 [N, K/2], scales/zeros bf16 [N, K/g], w_hat [N, K] in the target's dtype
    (the cache trades memory for speed; `weight_bytes` reports it apart). bias is the target's.
    """

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = weight.shape[1], weight.shape[0], group_size
        codes, scales, zeros = self._quantize(weight.detach())
        self.register_buffer("qweight", pack_int4(codes))
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("w_hat", self._dequantize(codes, scales, zeros, weight.dtype))
        self.bias = bias

    def _quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return quantize_rtn(w, self.group_size)

    def _dequantize(self, codes, scales, zeros, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rtn(codes, scales, zeros, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w_hat.to(x.dtype), self.bias)

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor) -> None:
        """Requantize from a new weight [N, K] in place (storages kept)."""
        codes, scales, zeros = self._quantize(weight.to(self.qweight.device))
        self.qweight.copy_(pack_int4(codes))
        self.scales.copy_(scales)
        self.zeros.copy_(zeros)
        self.w_hat.copy_(self._dequantize(codes, scales, zeros, self.w_hat.dtype))

    def dequantize(self) -> torch.Tensor:
        """w_hat [N, K] fp32, from the stored codes (not the cache)."""
        return self._dequantize(unpack_int4(self.qweight), self.scales, self.zeros)

    def packed_tensors(self) -> list[torch.Tensor]:
        return [self.qweight, self.scales, self.zeros]


class IntZeroInt4Linear(RtnInt4Linear):
    """RtnInt4Linear on the GPU drafter's grid (spec.draft_kernel = marlin / gemlite): integer zero points,
    w_hat = bf16((q - z)·s) = marlin_int4.dequantize_rtn(marlin_int4.quantize_rtn(w, g), g), cached in the
    weight's dtype (exact: bf16 values). Buffers as RtnInt4Linear's, but zeros are uint8 codes 0..15."""

    def _quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from er_sglang.sglang.marlin_int4 import quantize_rtn as quantize_int_zero  # torch + torchao only

        return quantize_int_zero(w, self.group_size)

    def _dequantize(self, codes, scales, zeros, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from er_sglang.sglang.marlin_int4 import dequantize_rtn as dequantize_int_zero

        return dequantize_int_zero(codes, scales, zeros, self.group_size).to(dtype)


def resolve_kernel(kernel: str, engine: str) -> str:
    """spec.draft_kernel as `engine` ("sglang" or "reference") runs it: "auto" -> AUTO_KERNEL[engine]."""
    return AUTO_KERNEL[engine] if kernel == "auto" else kernel


def draft_grid(kernel: str, engine: str) -> str:
    """The int4 grid spec.draft_kernel quantizes to on `engine`: "int_zero" (Marlin's and gemlite's integer
    zero points) or "float_zero" (tinygemm's). Acceptance compares only between runs on the same grid."""
    return "int_zero" if resolve_kernel(kernel, engine) in INT_ZERO_KERNELS else "float_zero"


def _torchao_tensor_cls(device_type: str):
    """torchao's int4 weight tensor class for a device, or None where torchao lacks it."""
    try:
        if device_type == "cpu":
            if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
                return None
            from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
            return Int4OpaqueTensor
        if device_type == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
            from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import (
                Int4TilePackedTo4dTensor,
            )
            return Int4TilePackedTo4dTensor
    except ImportError:
        return None
    return None


def torchao_fits(weight: torch.Tensor, group_size: int) -> bool:
    """Whether torchao's int4 kernel takes this [N, K] weight with this group size."""
    if _torchao_tensor_cls(weight.device.type) is None:
        return False
    n, k = weight.shape
    if weight.device.type == "cpu":  # _convert_weight_to_int4pack_for_cpu: N % 16, g in {32, 64, 128}
        return group_size in (32, 64, 128) and n % 16 == 0 and k % group_size == 0
    return group_size in (32, 64, 128, 256) and k % group_size == 0


class TorchaoInt4Linear(nn.Module):
    """y = tinygemm_int4(x.bf16, W) .to(x.dtype) + b; `weight` is torchao's int4 tensor subclass.

    The bf16 cast is the kernel's requirement; the output goes back to the caller's dtype (fp32 on
    CPU) and the bias (the target's Parameter) is added there.
    """

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = weight.shape[1], weight.shape[0], group_size
        self.weight = nn.Parameter(self._quantize(weight), requires_grad=False)
        self.bias = bias

    def _quantize(self, weight: torch.Tensor):
        cls = _torchao_tensor_cls(weight.device.type)
        return cls.from_hp(weight.detach().to(QPARAM_DTYPE).contiguous(), [1, self.group_size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(QPARAM_DTYPE), self.weight).to(x.dtype)
        return y + self.bias if self.bias is not None else y

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor) -> None:
        """Requantize in place: copy the fresh qdata / scale_and_zero into the existing storages."""
        new = self._quantize(weight.to(self.weight.device))
        self.weight.qdata.copy_(new.qdata)
        self.weight.scale_and_zero.copy_(new.scale_and_zero)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """w_hat [N, K] fp32 as the kernel sees it: linear(I_K, W)^T (bf16 output, exact for bf16 w_hat)."""
        eye = torch.eye(self.in_features, dtype=QPARAM_DTYPE, device=self.weight.device)
        return F.linear(eye, self.weight).T.float()

    def packed_tensors(self) -> list[torch.Tensor]:
        return [self.weight.qdata, self.weight.scale_and_zero]


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes int8 [N, K], scales fp32 [N]): per-output-channel symmetric, torchao's affine
    primitives (what its int8 weight-only config runs): s = max|w_n| / 127.5, q = clamp(round(w / s), -128, 127)."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    w = w.detach().float()
    block = (1, w.shape[1])
    scales, zeros = choose_qparams_affine(w, MappingType.SYMMETRIC, block, torch.int8, -128, 127,
                                          eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32,
                                          zero_point_dtype=torch.int64)
    return quantize_affine(w, block, scales, zeros, torch.int8, -128, 127), scales


class Int8Linear(nn.Module):
    """y = x @ w_hat^T + b, w_hat = q·s (per output row): int8 weight-only, the draft head's spec.draft_head=int8.

    Buffers: qweight int8 [N, K], scales fp32 [N], w_hat [N, K] in the weight's dtype (the cache, as
    RtnInt4Linear's: CPU correctness, not speed). group_size is unused (kept for the int4 modules' interface).
    """

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None, group_size: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.group_size = weight.shape[1], weight.shape[0], group_size
        codes, scales = quantize_int8(weight)
        self.register_buffer("qweight", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("w_hat", (codes.float() * scales[:, None]).to(weight.dtype))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w_hat.to(x.dtype), self.bias)

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor) -> None:
        codes, scales = quantize_int8(weight.to(self.qweight.device))
        self.qweight.copy_(codes)
        self.scales.copy_(scales)
        self.w_hat.copy_(codes.float() * scales[:, None])

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def packed_tensors(self) -> list[torch.Tensor]:
        return [self.qweight, self.scales]


def quantize_head(rows: torch.Tensor, quant: str, group_size: int, backend: str) -> nn.Module:
    """The draft head's rows [K, H] quantized for spec.draft_head: "int8" (Int8Linear) or "int4" (the draft
    linears' RTN: torchao's kernel where the drafter uses it and [K, H] fits it, else rtn; same codes; the
    integer-zero grid where the drafter's backend is rtn_int_zero, as the GPU's int4 head, draft_head.py)."""
    if quant == "int8":
        return Int8Linear(rows, None)
    if quant != "int4":
        raise ValueError(f"spec.draft_head: expected one of ('shared', 'int8', 'int4'), got {quant!r}")
    g = choose_group_size(rows.shape[1], group_size)
    if backend == "rtn_int_zero":
        return IntZeroInt4Linear(rows, None, g)
    cls = TorchaoInt4Linear if backend == "torchao" and torchao_fits(rows, g) else RtnInt4Linear
    return cls(rows, None, g)
