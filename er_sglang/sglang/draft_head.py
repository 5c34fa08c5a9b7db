"""The draft head inside SGLang (spec.draft_vocab = K, spec.draft_head; issue 9): what the draft's logits come from.

Inside draft_mode() the LogitsProcessor's lm_head matmul (`_compute_lm_head`, replaced on this model's processor
instance only; outside draft_mode it calls SGLang's own) runs `DraftHead.logits` instead:

    K > 0   logits [B, V] = -inf everywhere, then the K columns `ids` <- hidden @ W_hat[ids]^T
    K = 0   logits [B, V] = hidden @ W_hat^T
    W_hat   "shared": a bf16 copy of the rows; "int4": RTN g128 through the draft linears' Marlin path (marlin_int4);
            "int8": the CPU head's per-row symmetric int8 codes (int4_linear.quantize_int8; scale rounded to bf16) through
            Marlin's GPTQ 8-bit channelwise GEMM (uint8b128). Quantized rows are zero-padded to a multiple of 64
            (Marlin's N tile); the padding's logits are dropped.

SGLang's draft sampler then computes q = softmax(logits / T), exactly 0 off the subset (exp(-inf) = 0), and draws
x ~ q over the whole vocabulary (Gumbel-max: a zero-probability id never wins), so x is already a vocabulary id
and q [B, V] is what the verify needs: the K-space sample + id map + scatter of the CPU engine in one step.
Every buffer has its final shape from attach() on (ids [K], rows [K, H] or Marlin's) and is refreshed with copy_,
so the draft graphs captured at startup keep reading the current subset and weights.

Counts: spec.draft_vocab_counts=tokens only (1 per prompt token and per output token of every finished request,
er_sglang.draft_vocab.DraftVocab); requests are noted at their prefill (`observe`) and counted at the next sweep.
`soft` needs the target's p at every emitted position, which SGLang's verify keeps inside its kernel: refused at
config validation. Subset refresh: at the first decode step (cold start: the prompts prefilled so far) and at the
first decode step after each weight update (or wake), with the linears' re-quantization. Not here: tensor
parallelism, soft-capped logits (both refused when the head is built).
"""
from __future__ import annotations

import time

import torch

from er_sglang.draft_vocab import DraftVocab
from er_sglang.sglang.marlin_int4 import (
    GROUP_SIZE,
    _int4_buffers,
    _marlin_apply,
    draft_mode,
    is_draft_mode,
    marlin_pack,
)

MARLIN_N = 64  # Marlin's N tile: a quantized head's row count is padded to a multiple of it
MAX_PENDING = 4096  # requests noted before a sweep counts the finished ones (bounds the references held)
PACKED = {"int4": ("qweight", "scales", "zeros"), "int8": ("qweight", "scales")}  # what a refresh rewrites


class DraftHead:
    """The draft's lm_head over K rows (all rows when K = 0) of `model.lm_head`: bf16 copy, int8 or int4 (Marlin)."""

    def __init__(self, model, k: int, quant: str, always=()):
        if quant not in ("shared", *PACKED):
            raise ValueError(f"spec.draft_head: expected one of ('shared', 'int8', 'int4'), got {quant!r}")
        self.lm_head, self.processor = model.lm_head, model.logits_processor
        if getattr(self.processor, "do_tensor_parallel_all_gather", False) or self.processor.final_logit_softcapping:
            raise ValueError("spec.draft_head / spec.draft_vocab: no GPU path with tensor parallelism or soft-capped "
                             "logits; use spec.draft_vocab=0 and spec.draft_head=shared")
        weight = self.lm_head.weight
        self.quant, self.is_subset = quant, k > 0
        self.vocab_rows = weight.shape[0]  # V padded by SGLang; the logits processor trims to config.vocab_size
        self.k = k if k else self.vocab_rows
        self.vocab = DraftVocab(self.processor.vocab_size, k, always, soft=False) if k else None
        self._pending: dict[int, list] = {}  # id(req) -> [req, prompt counted]
        self.ids = torch.arange(self.k, dtype=torch.int64, device=weight.device)  # placeholder until the first refresh
        self.weight = weight.data.index_select(0, self.ids).clone() if quant == "shared" else None  # [K, H]
        self.packed = None  # Marlin buffers of the quantized rows
        if quant != "shared":
            if weight.shape[1] % GROUP_SIZE:
                raise ValueError(f"spec.draft_head: {quant} needs hidden % {GROUP_SIZE} == 0, got {weight.shape[1]}")
            self.packed = _marlin_buffers(quant, self._rows(weight.data))
        self.num_refresh = 0
        self._install()

    def _install(self) -> None:
        """Route the processor's lm_head matmul to `logits` inside draft_mode (read at trace and capture time)."""
        target = self.processor._compute_lm_head

        def compute_lm_head(hidden_states, lm_head, embedding_bias=None):
            if is_draft_mode():
                return self.logits(hidden_states)
            return target(hidden_states, lm_head, embedding_bias)

        self.processor._compute_lm_head = compute_lm_head

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """weight[ids] [K, H], zero-padded to a multiple of MARLIN_N rows for a quantized head."""
        rows = weight.index_select(0, self.ids)
        pad = -self.k % MARLIN_N if self.quant != "shared" else 0
        return torch.cat([rows, rows.new_zeros(pad, rows.shape[1])]) if pad else rows

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] -> logits [B, V_padded], -inf off the subset."""
        h = hidden.to(self.lm_head.weight.dtype)
        if self.quant == "shared":
            sub = torch.matmul(h, self.weight.T)  # [B, K]
        elif self.quant == "int4":
            sub = _marlin_apply(self.packed, h, None)[:, : self.k]
        else:
            sub = _int8_apply(self.packed, h)[:, : self.k]
        if not self.is_subset:
            return sub
        out = torch.full((h.shape[0], self.vocab_rows), float("-inf"), dtype=sub.dtype, device=sub.device)
        return out.index_copy_(1, self.ids, sub)

    # ---- counts and refresh -------------------------------------------------------------------------------
    def observe(self, reqs) -> None:
        """Note the requests of a prefill batch; their tokens are counted at the next sweep."""
        if self.vocab is None:
            return
        for req in reqs:
            self._pending.setdefault(id(req), [req, False])
        if len(self._pending) > MAX_PENDING:
            self.sweep()

    def sweep(self) -> None:
        """Count the prompts of noted requests (once) and the outputs of the finished ones (then forget them)."""
        seqs = []
        for key, entry in list(self._pending.items()):
            req, counted = entry
            if not counted:
                seqs.append(req.origin_input_ids)
                entry[1] = True
            if req.finished():
                seqs.append(req.output_ids)
                del self._pending[key]
        if seqs:
            self.vocab.observe(seqs)

    @torch.no_grad()
    def refresh(self) -> float:
        """New subset from all counts so far (K > 0), then the rows re-gathered / re-quantized in place; seconds."""
        t0 = time.perf_counter()
        if self.vocab is not None:
            self.sweep()
            self.ids.copy_(self.vocab.refresh().to(self.ids.device))
        weight = self.lm_head.weight.data
        if self.packed is None:
            self.weight.copy_(weight.index_select(0, self.ids))
        else:
            fresh = _marlin_pack(self.quant, self._rows(weight))
            for name in PACKED[self.quant]:
                self.packed[name].copy_(fresh[name])
        if weight.is_cuda:
            torch.cuda.synchronize()
        self.num_refresh += 1
        return time.perf_counter() - t0

    @torch.no_grad()
    def check(self) -> dict:
        """Rows equal the lm_head's current rows (shared) or their fresh Marlin quantization, bitwise; and a
        probe through the installed path: q = softmax(draft logits) of random hidden states, its largest value off
        the subset (0.0 exactly) and the subset logits' error against hidden @ W_hat[ids]^T."""
        weight = self.lm_head.weight.data
        if self.packed is None:
            equal, w_hat = torch.equal(self.weight, weight.index_select(0, self.ids)), self.weight.float()
        else:
            fresh = _marlin_pack(self.quant, self._rows(weight))
            equal = all(torch.equal(self.packed[n], fresh[n]) for n in PACKED[self.quant])
            w_hat = _dequantized_rows(self.quant, self._rows(weight))[: self.k]
        gen = torch.Generator(device=weight.device).manual_seed(0)
        hidden = torch.randn(4, weight.shape[1], device=weight.device, generator=gen).to(weight.dtype)
        with draft_mode():
            logits = self.processor._compute_lm_head(hidden, self.lm_head).float()  # [4, V_padded]
        q = torch.softmax(logits, -1)
        off = torch.ones(self.vocab_rows, dtype=torch.bool, device=q.device)
        off[self.ids] = False
        want = hidden.float() @ w_hat.T  # [4, K]
        return {"head_equal": equal, "head_quant": self.quant, "head_k": self.k, "head_is_subset": self.is_subset,
                "head_num_refresh": self.num_refresh,
                "head_ids": self.ids.tolist() if self.is_subset and self.k <= 4096 else None,
                "head_q_off_max": float(q[:, off].max()) if bool(off.any()) else 0.0,
                "head_logits_rel_err": float((logits[:, self.ids] - want).abs().max() / want.abs().max())}


# ---- the quantized rows in Marlin's layouts ------------------------------------------------------------------
def _int8_rtn(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [N, H] -> (codes int8 [N, H], scales [N] in the rows' dtype): the CPU head's per-row symmetric int8
    (int4_linear.quantize_int8, s = max|w| / 127.5), its scale rounded to bf16 for Marlin's bf16 scale operand."""
    from er_sglang.int4_linear import quantize_int8

    codes, scales = quantize_int8(rows)
    return codes, scales.to(rows.dtype)


def _pack_int8_gptq(codes: torch.Tensor) -> torch.Tensor:
    """codes int8 [N, K] -> GPTQ 8-bit layout [K/4, N] int32 of (q + 128) (Marlin's uint8b128), 4 values along K
    per int32, low bits first."""
    n, k = codes.shape
    qt = (codes.to(torch.int64) + 128).t().reshape(k // 4, 4, n)
    shifts = (8 * torch.arange(4, device=codes.device, dtype=torch.int64)).view(1, 4, 1)
    packed = (qt << shifts).sum(dim=1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).contiguous()


def _marlin_pack(quant: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """rows [N, H] bf16 (CUDA, N % 64 == 0) -> the packed tensors a refresh rewrites (PACKED[quant])."""
    if quant == "int4":
        return marlin_pack(rows, GROUP_SIZE)
    from sglang.kernels.ops.quantization.gptq_marlin_repack import gptq_marlin_repack
    from sglang.srt.layers.quantization.marlin_utils import marlin_permute_scales

    n, k = rows.shape
    codes, scales = _int8_rtn(rows)
    empty = torch.empty(0, dtype=torch.int32, device=rows.device)
    return {"qweight": gptq_marlin_repack(_pack_int8_gptq(codes), empty, k, n, 8),
            "scales": marlin_permute_scales(scales.reshape(1, n).contiguous(), k, n, -1)}  # channelwise


def _marlin_buffers(quant: str, rows: torch.Tensor) -> dict:
    if quant == "int4":
        return _int4_buffers(rows, GROUP_SIZE)
    from sglang.srt.layers.quantization.marlin_utils import marlin_make_workspace

    n, k = rows.shape
    return dict(_marlin_pack(quant, rows), workspace=marlin_make_workspace(rows.device),
                empty=torch.empty(0, dtype=torch.int32, device=rows.device), n=n, k=k)


def _int8_apply(b: dict, x: torch.Tensor) -> torch.Tensor:
    """x [B, H] -> [B, N] = x @ (codes * s)^T: Marlin's GPTQ 8-bit GEMM (uint8b128, per-channel scale)."""
    from sgl_kernel.scalar_type import scalar_types
    from sglang.srt.layers.quantization.marlin_utils import apply_gptq_marlin_linear

    return apply_gptq_marlin_linear(
        input=x, weight=b["qweight"], weight_scale=b["scales"], weight_zp=b["empty"], g_idx=b["empty"],
        g_idx_sort_indices=b["empty"], workspace=b["workspace"], wtype=scalar_types.uint8b128,
        output_size_per_partition=b["n"], input_size_per_partition=b["k"], is_k_full=True, bias=None)


def _dequantized_rows(quant: str, rows: torch.Tensor) -> torch.Tensor:
    """w_hat [N, H] fp32 of the quantized rows, from the plain-torch quantizers (not from the packed buffers)."""
    if quant == "int8":
        codes, scales = _int8_rtn(rows)
        return codes.float() * scales.float()[:, None]
    from er_sglang.sglang.marlin_int4 import dequantize_rtn, quantize_rtn

    return dequantize_rtn(*quantize_rtn(rows, GROUP_SIZE), GROUP_SIZE).float()


class HeadedDrafter:
    """The worker's `drafter`: SelfDrafter (the int4 linears) + the DraftHead when spec.draft_vocab or
    spec.draft_head asks for one; every other attribute is SelfDrafter's. The head is refreshed with the linears."""

    def __init__(self, inner, spec: dict, model_config=None):
        self.inner = inner
        self.k, self.quant = int(spec.get("draft_vocab") or 0), spec.get("draft_head") or "shared"
        eos = getattr(model_config, "hf_eos_token_id", None) or ()
        self.always = sorted({int(t) for t in (spec.get("draft_vocab_always") or ())} | {int(t) for t in eos})
        self.head: DraftHead | None = None

    def __getattr__(self, name):  # int4_bytes, linears, requant_s, num_requant, is_stale, model
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def attach(self) -> None:
        self.inner.attach()
        if self.k or self.quant != "shared":  # before graph capture: the draft graphs read its buffers
            self.head = DraftHead(self.inner.model, self.k, self.quant, self.always)

    def observe(self, reqs) -> None:
        if self.head is not None:
            self.head.observe(reqs)

    def mark_stale(self) -> None:
        self.inner.mark_stale()

    def refresh_if_stale(self) -> None:
        if self.inner.is_stale:
            self.requantize()
        elif self.head is not None and self.head.num_refresh == 0:
            self.head.refresh()  # cold start: the first subset, from the prompts prefilled so far

    def requantize(self) -> float:
        dt = self.inner.requantize()
        return dt + (self.head.refresh() if self.head is not None else 0.0)

    def check(self) -> dict:
        out = self.inner.check()
        if self.head is not None:
            out.update(self.head.check())
            out["all_equal"] = bool(out["all_equal"] and out["head_equal"])
        return out
