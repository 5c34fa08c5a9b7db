"""The self-drafter: the policy itself with int4 weight-only RTN decoder linears (DESIGN.md §3).

`build_drafter(target)` returns a `Drafter` whose `.model` is a real HF model object of the target's
class (so it takes the target's `DynamicCache` and the same forward kwargs). Every `nn.Linear` under
`model.layers` (q/k/v/o, gate/up/down) is replaced by an int4 module; everything else (embeddings,
lm_head, norms, biases, rotary buffers) IS the target's tensor: the copy is made with a deepcopy memo
that maps each target parameter/buffer to itself, so no storage is duplicated.

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
engine=sglang "auto" is marlin (SGLangEngine.from_config).

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

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from er_sglang.draft_vocab import SubsetHead

BACKENDS = ("auto", "torchao", "rtn")
KERNELS = ("auto", "marlin", "tinygemm", "gemlite")  # spec.draft_kernel: which grid the CPU drafter quantizes to
INT_ZERO_KERNELS = ("marlin", "gemlite")  # the GPU kernels on Marlin's integer-zero codes (int4_kernels.py)
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


# ---------------------------------------------------------------------------------------------------
# The drafter
# ---------------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    name: str  # module path in the HF model, e.g. "model.layers.0.self_attn.q_proj"
    target: nn.Linear
    draft: RtnInt4Linear | TorchaoInt4Linear


class Drafter:
    """The int4 copy of a target HF causal LM; call `drafter.model(...)` exactly like the target.

    Attributes: model (HF model of the target's class), target, backend ("torchao" | "rtn" | "rtn_int_zero"),
    group_sizes {linear name: g}, num_quantized (decoder linears replaced).
    """

    def __init__(self, target: nn.Module, model: nn.Module, entries: list[_Entry], backend: str):
        self.target, self.model, self.backend = target, model, backend
        self._entries = entries
        self.group_sizes = {e.name: e.draft.group_size for e in entries}
        self.num_quantized = len(entries)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def quantized_linears(self) -> dict[str, nn.Module]:
        return {e.name: e.draft for e in self._entries}

    def requantize(self, state_dict: dict[str, torch.Tensor] | None = None) -> float:
        """Refresh the int4 linears in place; returns wall seconds.

        state_dict None: every linear from the target's current weights (the caller loaded them).
        state_dict given (HF names, e.g. one weight-update bucket): only the linears whose
        "<name>.weight" is in it, from those tensors. Storages never change, so CUDA graphs captured
        on them stay valid; biases are the target's own Parameters and need no refresh. A draft head
        (spec.draft_vocab / spec.draft_head: draft_vocab.SubsetHead) re-gathers and re-quantizes its rows too.
        """
        start = time.perf_counter()
        for e in self._entries:
            if state_dict is None:
                e.draft.refresh(e.target.weight)
            elif f"{e.name}.weight" in state_dict:
                e.draft.refresh(state_dict[f"{e.name}.weight"])
        self._regather_head(state_dict)
        if any(p.is_cuda for p in self.target.parameters()):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def _regather_head(self, state_dict: dict | None) -> None:
        head = self.model.get_output_embeddings()
        if not isinstance(head, SubsetHead):
            return
        if state_dict is None:
            head.regather()
            return
        # a tied head is lm_head.weight and model.embed_tokens.weight at once: a bucket may hold either name
        names = [n for n, t in self.target.state_dict(keep_vars=True).items() if t is head.full.weight]
        sent = [n for n in names if n in state_dict]
        if sent:
            head.regather(weight=state_dict[sent[0]])

    @torch.no_grad()
    def check(self) -> dict:
        """Does every int4 linear equal a fresh quantization of its target's current weight (bitwise)?

        Catches a draft left stale by a weight sync or corrupted in memory; costs one quantization.
        The rtn backend's dequantized cache is compared too: it is what its forward reads.
        """
        num_equal = 0
        for e in self._entries:
            fresh = type(e.draft)(e.target.weight, None, e.draft.group_size)
            num_equal += all(torch.equal(a, b) for a, b in zip(_live_tensors(e.draft), _live_tensors(fresh)))
        head = self.model.get_output_embeddings()
        head_equal = not isinstance(head, SubsetHead) or _head_equal(head)  # spec.draft_head / draft_vocab
        return {"num_linears": len(self._entries), "num_equal": num_equal, "head_equal": head_equal,
                "all_equal": num_equal == len(self._entries) and head_equal}

    def weight_bytes(self) -> dict:
        """Bytes of the decoder linears (target at its own dtype vs int4 packed) and of shared tensors.

        ratio = draft_linear_bytes / target_linear_bytes (target dtype, named in target_dtype);
        ratio_vs_bf16 = the same against the target's linears stored in bf16. draft_cache_bytes is
        the rtn backend's dequantized-weight cache (0 for torchao), left out of the ratios.
        """
        target_bytes = sum(e.target.weight.nbytes for e in self._entries)
        target_numel = sum(e.target.weight.numel() for e in self._entries)
        draft_bytes = sum(t.nbytes for e in self._entries for t in e.draft.packed_tensors())
        cache_bytes = sum(e.draft.w_hat.nbytes for e in self._entries if isinstance(e.draft, RtnInt4Linear))
        head = self.model.get_output_embeddings()
        target_ptrs = {t.untyped_storage().data_ptr() for t in _tensors(self.target)}
        shared = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors(self.model)
                  if t.untyped_storage().data_ptr() in target_ptrs}
        return {
            "target_dtype": str(self._entries[0].target.weight.dtype).removeprefix("torch."),
            "target_linear_bytes": target_bytes,
            "draft_linear_bytes": draft_bytes,
            "draft_cache_bytes": cache_bytes,
            "shared_bytes": sum(shared.values()),
            "draft_head_bytes": head.nbytes() if isinstance(head, SubsetHead) else 0,  # K rows, as stored
            "ratio": draft_bytes / target_bytes,
            "ratio_vs_bf16": draft_bytes / (2 * target_numel),
        }


def _live_tensors(draft: nn.Module) -> list[torch.Tensor]:
    """The tensors a quantized linear's forward depends on (packed codes, scales, and rtn's/int8's cache)."""
    return draft.packed_tensors() + ([draft.w_hat] if isinstance(draft, (RtnInt4Linear, Int8Linear)) else [])


def _head_equal(head: SubsetHead) -> bool:
    """Does the draft head hold the full head's current rows `ids` (shared) or their fresh quantization?"""
    rows = head.full.weight.detach().index_select(0, head.ids)
    if head.linear is None:
        return torch.equal(head.weight, rows)
    fresh = type(head.linear)(rows, None, head.linear.group_size)
    return all(torch.equal(a, b) for a, b in zip(_live_tensors(head.linear), _live_tensors(fresh)))


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Plain tensors of a module's parameters and buffers (torchao subclasses excluded)."""
    return [t for t in list(module.parameters()) + list(module.buffers())
            if type(t) in (torch.Tensor, nn.Parameter)]


def _decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear inside the decoder layers ("...layers.<i>....")."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{name}"]


def _resolve_backend(backend: str, linears: list[tuple[str, nn.Linear]], group_sizes: dict, kernel: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: allowed values are {', '.join(BACKENDS)}")
    if kernel not in KERNELS:
        raise ValueError(f"spec.draft_kernel: expected one of {KERNELS}, got {kernel!r}")
    if kernel in INT_ZERO_KERNELS:  # Marlin's integer-zero grid: plain PyTorch only on CPU
        if backend == "torchao":
            raise ValueError(f"backend='torchao' has no CPU kernel for spec.draft_kernel={kernel!r}'s integer-zero "
                             "grid; use spec.drafter_backend='rtn' or 'auto'")
        return "rtn_int_zero"
    if backend == "rtn":
        return "rtn"
    misfits = [name for name, m in linears if not torchao_fits(m.weight, group_sizes[name])]
    if not misfits:
        return "torchao"
    if backend == "torchao":
        raise ValueError(f"backend='torchao' cannot quantize {misfits[:3]} (torchao int4 kernel missing "
                         f"for this device, or shape/group size unsupported); use backend='rtn' or 'auto'")
    return "rtn"


def build_drafter(target: nn.Module, group_size: int = 128, backend: str = "auto", head: str = "shared",
                  kernel: str = "auto") -> Drafter:
    """Int4 self-drafter of an HF causal LM (Llama/Qwen2 layout: model.layers[i].{self_attn,mlp}.*_proj).

    The copy shares every target parameter and buffer (deepcopy memo maps them to themselves), then
    each decoder nn.Linear is swapped for an int4 module quantized from the target's weight.
    head (spec.draft_head): "shared" = the target's lm_head; "int8" / "int4" = a quantized copy of all its
    rows (a SubsetHead over every id; spec.draft_vocab later narrows it to K rows, quantized the same way).
    kernel (spec.draft_kernel): "auto" / "tinygemm" = the float-zero grid (backend torchao or rtn); "marlin" /
    "gemlite" = the GPU's integer-zero grid (backend rtn_int_zero: IntZeroInt4Linear).
    """
    linears = _decoder_linears(target)
    if not linears:
        raise ValueError("no nn.Linear found under the target's decoder layers")
    group_sizes = {name: choose_group_size(m.in_features, group_size) for name, m in linears}
    backend = _resolve_backend(backend, linears, group_sizes, kernel)
    memo = {id(t): t for t in list(target.parameters()) + list(target.buffers())}
    model = copy.deepcopy(target, memo)
    model.eval()
    module_cls = {"torchao": TorchaoInt4Linear, "rtn": RtnInt4Linear, "rtn_int_zero": IntZeroInt4Linear}[backend]
    entries = []
    for name, lin in linears:
        draft = module_cls(lin.weight, lin.bias, group_sizes[name])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, draft)
        entries.append(_Entry(name, lin, draft))
    if head != "shared":
        full = model.get_output_embeddings()
        all_ids = torch.arange(full.weight.shape[0])
        model.set_output_embeddings(SubsetHead(full, all_ids, quant=head, group_size=group_size, backend=backend))
    return Drafter(target, model, entries, backend)
