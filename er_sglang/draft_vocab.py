"""A reduced draft vocabulary (`spec.draft_vocab` = K; issue 9): the draft head scores only K token ids.

The draft's logits are x @ W[ids]^T over K gathered rows of the lm_head (kept with the draft in the
target's dtype or quantized, re-gathered in place when the weights or the subset change); q = softmax over those K
logits, and q = 0 on every other id. Chain rejection sampling stays exact for any proposal q: a draft
token (always inside the subset) is accepted w.p. min(1, p(x)/q(x)), and on rejection the residual
normalize(max(p - q, 0)) equals p outside the subset, so a target token outside it is still emitted with
exactly its probability (by the residual or the bonus). K only costs acceptance: the expected acceptance
of a position, sum_x min(p(x), q(x)), drops by at most the target's mass outside the subset.

Subset: the `always` ids (stop and special tokens, whatever their counts) plus the K - |always| other ids
with the largest counts, ties to the lower id; returned sorted ascending. Same counts, same ids, on any
machine (`torch.sort(stable=True)` of the CPU counts, int64 or float64).

Counts (`DraftVocab`, since the engine started; `spec.draft_vocab_counts`):
  soft    (default) 1 per prompt token + the target's sampling distribution p [V] summed over every
          position the verify emits (float64): the expected counts of the rollouts, which also rank the
          tokens the target gives mass to but did not happen to sample. On a 16-prompt warmup it keeps
          the target's mass off the subset 2-20x lower than `tokens` (docs/benchmarks.md §9).
  tokens  1 per prompt token and per emitted token (int64).
Refresh: the subset is rebuilt at the first generate() (cold start: that call's prompts only) and at the
first generate() after each weight update, from all counts so far including that call's prompts; the
head's rows are re-gathered from the new lm_head then. Between refreshes it is fixed, so one rollout's
draft head never changes mid-rollout.

Head quantization (`spec.draft_head`, composable with K): "shared" (default) = the rows as the target holds
them (K = 0: the target's own head, nothing copied); "int8" = per-output-row symmetric int8 weight-only;
"int4" = RTN g128 asymmetric, the draft linears' quantization. Only q changes (the verify stays exact);
the rows are re-quantized whenever they are re-gathered (Drafter.requantize after a weight update, a new
subset). Bytes at Qwen2.5-7B shapes: docs/benchmarks.md §9.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KEY = "spec.draft_vocab"
COUNT_MODES = ("soft", "tokens")


def check_draft_vocab(k: int, vocab_size: int) -> None:
    """Raise ValueError (one line naming spec.draft_vocab) unless 0 <= k <= vocab_size."""
    if not 0 <= k <= vocab_size:
        raise ValueError(f"{KEY}: expected an int in [0, {vocab_size}] (0 = the full vocabulary; the model "
                         f"has {vocab_size} token ids), got {k}")


def select_draft_vocab(counts: torch.Tensor, k: int, always=()) -> torch.Tensor:
    """counts [V] (int64, or float soft counts) -> ids int64 [k] ascending: `always` + the top k - |always|
    others by (-count, id)."""
    vocab = counts.numel()
    check_draft_vocab(k, vocab)
    forced = sorted({int(t) for t in always if 0 <= int(t) < vocab})
    if k < len(forced):
        raise ValueError(f"{KEY}: expected 0 or an int >= {len(forced)} (the stop and special tokens are "
                         f"always drafted), got {k}")
    order = torch.sort(-counts.to(torch.float64), stable=True).indices  # stable: equal counts keep id order
    is_forced = torch.zeros(vocab, dtype=torch.bool)
    is_forced[forced] = True
    rest = order[~is_forced[order]][: k - len(forced)]
    return torch.cat([torch.tensor(forced, dtype=torch.int64), rest]).sort().values


class DraftVocab:
    """Token counts + the current draft subset of one engine (module docstring: when it refreshes)."""

    def __init__(self, vocab_size: int, k: int, always=(), soft: bool = True):
        check_draft_vocab(k, vocab_size)
        if k == 0:
            raise ValueError(f"{KEY}: 0 means the full vocabulary; build no DraftVocab for it")
        self.vocab_size, self.k, self.always = vocab_size, k, sorted({int(t) for t in always})
        select_draft_vocab(torch.zeros(vocab_size, dtype=torch.int64), k, self.always)  # K >= |always|
        self.soft = soft  # outputs counted as target probabilities (observe_probs), not as tokens
        self.counts = torch.zeros(vocab_size, dtype=torch.float64 if soft else torch.int64)
        self.ids: torch.Tensor | None = None  # [K] ascending, None before the first refresh
        self.is_stale = True
        self.num_refresh = 0

    def observe(self, sequences) -> None:
        """Add the tokens of `sequences` (lists of token ids) to the counts; ids outside [0, V) are left out."""
        flat = torch.tensor([t for seq in sequences for t in seq], dtype=torch.int64)
        flat = flat[(flat >= 0) & (flat < self.vocab_size)]
        self.counts += torch.bincount(flat, minlength=self.vocab_size)

    def observe_probs(self, probs: torch.Tensor) -> None:
        """Add distributions probs [N, V] (the target's p at N emitted positions) to the soft counts."""
        self.counts += probs.detach().sum(0).to(device=self.counts.device, dtype=self.counts.dtype)

    def mark_stale(self) -> None:
        """The weights changed: rebuild the subset at the next refresh point."""
        self.is_stale = True

    def refresh(self) -> torch.Tensor:
        """Rebuild the subset from the counts so far; returns ids [K]."""
        with torch.inference_mode(False):  # called inside generate(); ids index Parameters later
            self.ids = select_draft_vocab(self.counts, self.k, self.always)
        self.is_stale = False
        self.num_refresh += 1
        return self.ids

    def coverage(self, sequences) -> float:
        """Fraction of the tokens of `sequences` inside the current subset (1.0 when there are none)."""
        flat = torch.tensor([t for seq in sequences for t in seq], dtype=torch.int64)
        if self.ids is None or flat.numel() == 0:
            return 1.0
        return float(torch.isin(flat, self.ids).float().mean())

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone(), "is_stale": self.is_stale}

    def load_state_dict(self, state: dict) -> None:
        self.counts = state["counts"].to(self.counts.dtype).clone()
        self.is_stale = bool(state["is_stale"]) or self.ids is None


class SubsetHead(nn.Module):
    """The draft's lm_head over rows `ids` of the full head: hidden [..., H] -> logits [..., K] = hidden @ W[ids]^T (+ b[ids]).

    quant (spec.draft_head): "shared" keeps `weight` [K, H], a gathered copy in the full head's dtype (the rows
    are the target's values); "int8" / "int4" keep `linear`, those rows quantized (int4_linear.quantize_head:
    per-row symmetric int8, or the draft linears' int4 RTN g`group_size`). `ids` may be every id (a quantized
    full head, `is_subset` False). `full` is the full head (not a submodule: its weight is the target's and
    stays counted there). `regather` writes into the existing buffers, so storages (and CUDA graphs on them)
    stay valid.
    """

    def __init__(self, full: nn.Linear, ids: torch.Tensor, quant: str = "shared", group_size: int = 128,
                 backend: str = "rtn"):
        super().__init__()
        self.__dict__["full"] = full
        self.quant, self.group_size, self.backend = quant, group_size, backend
        ids = ids.to(device=full.weight.device, dtype=torch.int64)
        bias = getattr(full, "bias", None)
        with torch.inference_mode(False):  # built inside generate(): normal tensors, so regather can copy_ later
            self.register_buffer("ids", ids.clone())
            rows = full.weight.detach().index_select(0, self.ids)
            self.register_buffer("weight", rows.clone() if quant == "shared" else None)
            self.register_buffer("bias", None if bias is None else bias.detach().index_select(0, self.ids).clone())
            if quant == "shared":
                self.linear = None
            else:
                from er_sglang.int4_linear import quantize_head

                self.linear = quantize_head(rows, quant, group_size, backend)

    @property
    def is_subset(self) -> bool:
        return self.ids.numel() < self.full.weight.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.linear is None:
            return F.linear(hidden, self.weight, self.bias)
        logits = self.linear(hidden)
        return logits if self.bias is None else logits + self.bias

    def nbytes(self) -> int:
        """Bytes the head reads per step as stored (codes + scales/zeros; not rtn's dequantized cache)."""
        if self.linear is None:
            return self.weight.nbytes
        return sum(t.nbytes for t in self.linear.packed_tensors())

    @torch.no_grad()
    def regather(self, ids: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> None:
        """Copy rows `ids` (default: the current ones) of `weight` (default: the full head's) in place,
        re-quantizing them for a quantized head."""
        if ids is not None:
            if ids.numel() != self.ids.numel():
                raise ValueError(f"{KEY}: subset of {ids.numel()} ids for a head of {self.ids.numel()} rows")
            self.ids.copy_(ids)
        source = self.full.weight if weight is None else weight
        rows = source.detach().to(self.ids.device).index_select(0, self.ids)
        if self.linear is None:
            self.weight.copy_(rows)
        else:
            self.linear.refresh(rows)
        if self.bias is not None:
            self.bias.copy_(self.full.bias.detach().index_select(0, self.ids))


def install_subset_head(model: nn.Module, ids: torch.Tensor) -> SubsetHead:
    """Make `model`'s output head score only `ids` (an HF causal LM: get/set_output_embeddings).

    A head of the same K is re-gathered in place; a different K replaces it (built from the full head,
    quantized as the head it replaces: spec.draft_head, installed by build_drafter).
    """
    head = model.get_output_embeddings()
    if isinstance(head, SubsetHead) and head.ids.numel() == ids.numel():
        head.regather(ids)
        return head
    if isinstance(head, SubsetHead):
        sub = SubsetHead(head.full, ids, head.quant, head.group_size, head.backend)
    else:
        sub = SubsetHead(head, ids)
    model.set_output_embeddings(sub)
    return sub


def subset_ids(model: nn.Module) -> torch.Tensor | None:
    """ids [K] of `model`'s subset head, or None when it scores the full vocabulary."""
    head = model.get_output_embeddings()
    return head.ids if isinstance(head, SubsetHead) and head.is_subset else None
