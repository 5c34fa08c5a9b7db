"""The self-drafter: the policy itself with int4 weight-only RTN decoder linears (DESIGN.md §3).

`build_drafter(target)` returns a `Drafter` whose `.model` is a real HF model object of the target's
class (so it takes the target's `DynamicCache` and the same forward kwargs). Every `nn.Linear` under
`model.layers` (q/k/v/o, gate/up/down) is replaced by an int4 module; everything else (embeddings,
lm_head, norms, biases, rotary buffers) IS the target's tensor: the copy is made with a deepcopy memo
that maps each target parameter/buffer to itself, so no storage is duplicated.

The int4 grids (float-zero tinygemm, integer-zero marlin / gemlite), group sizes and backends, and the
quantized linear modules themselves: er_sglang/int4_linear.py.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from er_sglang.draft_vocab import SubsetHead
from er_sglang.int4_linear import (
    BACKENDS,
    INT_ZERO_KERNELS,
    KERNELS,
    Int8Linear,
    IntZeroInt4Linear,
    RtnInt4Linear,
    TorchaoInt4Linear,
    choose_group_size,
    resolve_kernel,
    torchao_fits,
)

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
    if resolve_kernel(kernel, "reference") in INT_ZERO_KERNELS:  # Marlin's integer-zero grid: plain PyTorch on CPU
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