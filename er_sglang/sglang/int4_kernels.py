"""The kernel that runs the int4 draft linears (`spec.draft_kernel`): one contract, three library kernels.

Each kernel is an Int4Kernel; SelfDrafter uses it for every twin, exactly as it used Marlin alone before:
    pack(w, g)         -> {name: tensor}  the packed twin of a target weight w [N, K] (new tensors)
    buffers(w, g)      -> layer.er_int4: pack(w, g) + what apply needs (workspace, shapes, gemlite's meta)
    apply(b, x, bias)  -> y [..., N]      CUDA-graph capturable; SelfDraftMethod calls it inside draft_mode()
    packed             the tensors requant_ overwrites with copy_ (captured graphs keep their pointers) and
                       is_fresh compares bitwise with a fresh pack
    dequant(w, g)      -> w_hat [N, K] fp32, the weight the kernel multiplies by (up to its bf16 arithmetic)

marlin    SGLang's JIT Marlin, uint4 + integer zero points (marlin_int4.py): w_hat = (q - z)·s.
gemlite   gemlite's A16W4 Triton GEMV/GEMM (W_group_mode 3) on the SAME codes, scales and integer zeros as
          Marlin (zeros stored as bf16, exact for 0..15): w_hat = (q - z)·s. Layout: W_q [K/8, N] int32 (8 codes
          along K per word, low nibble first = marlin_int4.pack_gptq), scales and zeros [K/g, N].
tinygemm  torch's aten._weight_int4pack_mm (torchao's int4 tinygemm kernel) with torchao's tinygemm RTN, which
          is the CPU reference drafter's own quantization (er_sglang/int4_linear.quantize_rtn):
              s = (max - min) / 15, zero = min + 8·s (bf16), q = round((w - (zero - 8·s)) / s), w_hat = (q - 8)·s + zero
          a float zero point and a grid anchored at the group's min, where Marlin's is anchored at 0 (integer z):
          both round to a grid of step s, so their w_hat differ by less than s (some weights by one grid point).
          The reference engine runs this grid for spec.draft_kernel auto / tinygemm and Marlin's integer-zero grid
          for marlin / gemlite (er_sglang/int4_linear.IntZeroInt4Linear), so every GPU kernel has its CPU twin.
          (scripts/bench_int4_gemv.py times the same kernel on Marlin's codes instead, with zero = bf16((8 - z)·s):
          same bytes, same time.)
Numerics beyond the weights: each kernel sums in its own order (fp32 accumulators; gemlite's split-K, and Marlin's
atomic-add reduce where SGLang picks it, add bf16 partials in arrival order: the last bit may vary run to run).
Draft weights and rounding move only acceptance, never the output distribution: verification is exact.

gemlite compiles and autotunes its Triton kernels on the first call per (M, N, K); gemlite_apply refuses a shape
never run eagerly while a CUDA graph is being captured (SGLang's graph runner runs two eager forwards per batch
size before capturing it; `warmup` does it for graphs captured elsewhere). The H200 has no gemlite config file:
gemlite_setup loads the H100's (same SM 9.0): the (M, N, K) it lists (Qwen2.5 among them) skip autotuning.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from er_sglang.sglang import marlin_int4 as mi
from er_sglang.sglang.gamma import SPEC_ENV

KERNELS = ("marlin", "tinygemm", "gemlite")  # spec.draft_kernel (er_sglang/config.py)
INNER_K_TILES = 8  # tinygemm's tile: K % (8 * 16) == 0


@dataclass(frozen=True)
class Int4Kernel:
    name: str
    packed: tuple[str, ...]
    pack: Callable
    buffers: Callable
    apply: Callable
    dequant: Callable


def get_kernel(name: str) -> Int4Kernel:
    if name not in _REGISTRY:
        raise ValueError(f"spec.draft_kernel: expected one of {KERNELS}, got {name!r}")
    return _REGISTRY[name]


def kernel_from_env() -> str:
    """spec.draft_kernel of the spec SGLangEngine hands the scheduler process; marlin if none is set."""
    raw = os.environ.get(SPEC_ENV)
    return (json.loads(raw).get("draft_kernel") or "marlin") if raw else "marlin"


# ---- the lifecycle SelfDrafter runs per linear ------------------------------------------------------------

def attach(layer, kernel: Int4Kernel, group_size: int = mi.GROUP_SIZE) -> int:
    """Give a target linear its int4 twin (from layer.weight) run by `kernel` in draft_mode; returns bytes added."""
    layer.er_int4 = kernel.buffers(layer.weight.data, group_size)
    mi.install_draft_method(layer, kernel.apply)
    return mi._num_bytes(layer.er_int4)


@torch.no_grad()
def requant_(layer, w: torch.Tensor, kernel: Int4Kernel, group_size: int = mi.GROUP_SIZE) -> None:
    """Re-quantize w into the twin's existing tensors (copy_: a captured graph reads the new weights)."""
    new = kernel.pack(w, group_size)
    for name in kernel.packed:
        layer.er_int4[name].copy_(new[name])


@torch.no_grad()
def is_fresh(layer, kernel: Int4Kernel, group_size: int = mi.GROUP_SIZE) -> bool:
    """Does the twin equal a fresh pack of the layer's current weight, bit for bit?"""
    fresh = kernel.pack(layer.weight.data, group_size)
    return all(torch.equal(layer.er_int4[name], fresh[name]) for name in kernel.packed)


@torch.no_grad()
def warmup(kernel: Int4Kernel, twins: list[dict], batch_sizes) -> int:
    """One eager apply per distinct (N, K) twin and batch size (compiles / autotunes outside any capture);
    returns the number of calls."""
    shapes = {(b["n"], b["k"]): b for b in twins}
    for b in shapes.values():
        w = b[kernel.packed[0]]
        for m in batch_sizes:
            kernel.apply(b, torch.zeros(m, b["k"], dtype=torch.bfloat16, device=w.device), None)
    return len(shapes) * len(batch_sizes)


# ---- marlin (marlin_int4.py) ------------------------------------------------------------------------------

def _rtn_dequant(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return mi.dequantize_rtn(*mi.quantize_rtn(w, group_size), group_size).float()


# ---- tinygemm ---------------------------------------------------------------------------------------------

def tinygemm_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] uint8 (0..15) -> [N, K/2] uint8, two per byte, the even column in the HIGH nibble: the input of
    CUDA's _convert_weight_to_int4pack (torchao's TensorCoreTiledLayout packs it so)."""
    return (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()


def tinygemm_pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] uint8 (0..15) -> tinygemm's tiled int32 weight (the CPU op takes the codes as int32)."""
    if codes.is_cuda:
        return torch.ops.aten._convert_weight_to_int4pack(tinygemm_nibbles(codes), INNER_K_TILES)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), INNER_K_TILES)


def tinygemm_qparams(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale, float zero [N, K/g] -> tinygemm's qScaleAndZeros [K/g, N, 2] bf16 (w = (q - 8)·s + zero)."""
    return torch.stack([scale.to(torch.bfloat16), zero.to(torch.bfloat16)], -1).transpose(0, 1).contiguous()


def tinygemm_pack(w: torch.Tensor, group_size: int = mi.GROUP_SIZE) -> dict[str, torch.Tensor]:
    from er_sglang.int4_linear import quantize_rtn as quantize_tinygemm

    codes, scales, zeros = quantize_tinygemm(w, group_size)
    return {"qweight": tinygemm_pack_codes(codes), "scales_zeros": tinygemm_qparams(scales, zeros)}


def tinygemm_buffers(w: torch.Tensor, group_size: int = mi.GROUP_SIZE) -> dict:
    n, k = w.shape
    return dict(tinygemm_pack(w, group_size), n=n, k=k, group_size=group_size)


def tinygemm_apply(b: dict, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ w_hat^T (+ bias); x bf16 [..., K] (the CUDA kernel takes bf16 only)."""
    mm = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
    y = mm(x.reshape(-1, b["k"]).contiguous(), b["qweight"], b["group_size"], b["scales_zeros"])
    y = y.reshape(*x.shape[:-1], b["n"])
    return y if bias is None else y + bias


def _tinygemm_dequant(w: torch.Tensor, group_size: int) -> torch.Tensor:
    from er_sglang.int4_linear import dequantize_rtn, quantize_rtn

    return dequantize_rtn(*quantize_rtn(w, group_size))


# ---- gemlite ----------------------------------------------------------------------------------------------

GEMLITE_PACKED = ("W_q", "scales", "zeros")
_GEMLITE_EAGER: set[tuple[int, int, int]] = set()  # (M, N, K) already run outside a capture


def gemlite_setup():
    """import gemlite; where it ships no autotune cache for this GPU (H200), load the H100's (same SM 9.0)."""
    import gemlite
    from gemlite.core import get_default_cache_config

    if not gemlite_setup.done:
        if get_default_cache_config() is None:
            gemlite.load_config(os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json"))
        gemlite_setup.done = True
    return gemlite


gemlite_setup.done = False


def gemlite_tensors(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
    """RTN q [N, K] (0..15), scale and integer zero [N, K/g] -> gemlite's W_q [K/8, N] int32, scales and zeros
    [K/g, N] bf16 (what GemLiteLinear.pack(q, s, z, fma_mode=False) stores, 32-bit packing, contiguous)."""
    return {"W_q": mi.pack_gptq(q), "scales": scale.to(torch.bfloat16).t().contiguous(),
            "zeros": zero.to(torch.bfloat16).t().contiguous()}


def gemlite_pack(w: torch.Tensor, group_size: int = mi.GROUP_SIZE) -> dict[str, torch.Tensor]:
    return gemlite_tensors(*mi.quantize_rtn(w, group_size))


def gemlite_buffers(w: torch.Tensor, group_size: int = mi.GROUP_SIZE) -> dict:
    """gemlite_pack + the meta args of a GemLiteLinear packed from the same codes; its tensors must equal ours
    (else requant_ would write another layout than the kernel reads)."""
    gl = gemlite_setup()
    n, k = w.shape
    q, s, z = mi.quantize_rtn(w, group_size)
    lin = gl.GemLiteLinear(4, group_size=group_size, in_features=k, out_features=n,
                           input_dtype=gl.DType.BF16, output_dtype=gl.DType.BF16)
    lin.pack(q, s, z.to(torch.bfloat16), bias=None, fma_mode=False)  # W_group_mode 3: (q - z) * s
    ours = gemlite_tensors(q, s, z)
    differ = [name for name in GEMLITE_PACKED if not torch.equal(getattr(lin, name).data, ours[name])]
    if differ:
        raise RuntimeError(f"gemlite {gl.__version__}: GemLiteLinear.pack's {differ} differ from gemlite_tensors'")
    return dict(ours, meta_scale=lin.meta_scale.data, meta=lin.get_meta_args(), n=n, k=k)


def gemlite_apply(b: dict, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m = x.numel() // x.shape[-1]
    key = (m, b["n"], b["k"])
    if key not in _GEMLITE_EAGER and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"gemlite: M={m}, N={b['n']}, K={b['k']} never ran eagerly; its Triton kernel would "
                           "compile / autotune inside CUDA-graph capture (run int4_kernels.warmup first)")
    from gemlite.core import forward_functional

    y = forward_functional(x, bias, [b["W_q"], b["scales"], b["zeros"], b["meta_scale"]], b["meta"])
    _GEMLITE_EAGER.add(key)
    return y


_REGISTRY = {
    "marlin": Int4Kernel("marlin", ("qweight", "scales", "zeros"), mi.marlin_pack, mi._int4_buffers,
                         mi._marlin_apply, _rtn_dequant),
    "tinygemm": Int4Kernel("tinygemm", ("qweight", "scales_zeros"), tinygemm_pack, tinygemm_buffers,
                           tinygemm_apply, _tinygemm_dequant),
    "gemlite": Int4Kernel("gemlite", GEMLITE_PACKED, gemlite_pack, gemlite_buffers, gemlite_apply, _rtn_dequant),
}
