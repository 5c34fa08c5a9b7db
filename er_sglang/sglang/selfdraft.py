"""The int4 self-drafter inside SGLang: int4 RTN twins of the target's decoder linears, kept fresh.

attach()      quantize every eligible decoder linear of the target model (torchao RTN, g=128, asymmetric,
              Marlin layout) into buffers on that same module; embeddings, lm_head, norms stay shared.
mark_stale()  after any weight update path; the next decode step re-quantizes first (lazily, once per sync,
              however many buckets the update came in).
requantize()  writes into the existing buffers (copy_), so captured CUDA graphs stay valid.
"""
from __future__ import annotations

import logging
import time

import torch

from er_sglang.sglang.marlin_int4 import GROUP_SIZE, attach_draft_int4, marlin_pack, requant_int4_

logger = logging.getLogger(__name__)


def eligible(module) -> bool:
    """A decoder linear Marlin can take: 2-D weight, K % 128 == 0, N % 64 == 0; not the lm_head/embeddings."""
    from sglang.srt.layers.linear import LinearBase

    w = getattr(module, "weight", None)
    return (isinstance(module, LinearBase) and isinstance(w, torch.Tensor) and w.dim() == 2
            and w.shape[1] % GROUP_SIZE == 0 and w.shape[0] % 64 == 0)


class SelfDrafter:
    def __init__(self, model):
        self.model = model
        self.linears: list[tuple[str, torch.nn.Module]] = []
        self.int4_bytes = 0
        self.requant_s = 0.0
        self.num_requant = 0
        self.is_stale = False

    @torch.no_grad()
    def attach(self) -> None:
        t0 = time.perf_counter()
        for name, mod in self.model.named_modules():
            if eligible(mod):
                self.int4_bytes += attach_draft_int4(mod)
                self.linears.append((name, mod))
        torch.cuda.synchronize()
        logger.info("self-draft: %d linears with int4 twins (%.3f GB), %.2f s", len(self.linears),
                    self.int4_bytes / 1e9, time.perf_counter() - t0)

    def mark_stale(self) -> None:
        self.is_stale = True

    def refresh_if_stale(self) -> None:
        if self.is_stale:
            self.requantize()

    @torch.no_grad()
    def requantize(self) -> float:
        """Re-quantize every twin from its linear's current weight, in place; returns seconds."""
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _, mod in self.linears:
            requant_int4_(mod, mod.weight.data)
        torch.cuda.synchronize()
        self.requant_s = time.perf_counter() - t0
        self.num_requant += 1
        self.is_stale = False
        return self.requant_s

    @torch.no_grad()
    def check(self) -> dict:
        """Do the twins equal a fresh quantization of the current weights (bitwise)?"""
        num_equal = 0
        for _, mod in self.linears:
            fresh = marlin_pack(mod.weight.data)
            num_equal += all(torch.equal(mod.er_int4[k], fresh[k]) for k in ("qweight", "scales", "zeros"))
        return {"num_linears": len(self.linears), "num_equal": num_equal,
                "all_equal": num_equal == len(self.linears), "is_stale": self.is_stale}
