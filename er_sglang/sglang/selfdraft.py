"""The int4 self-drafter inside SGLang: int4 RTN twins of the target's decoder linears, kept fresh.

attach()      quantize every eligible decoder linear of the target model (RTN, g=128, asymmetric, packed for
              spec.draft_kernel: marlin | tinygemm | gemlite, int4_kernels.py) into buffers on that same module;
              embeddings, lm_head, norms stay shared.
mark_stale()  after any weight update path; the next decode step re-quantizes first (lazily, once per sync,
              however many buckets the update came in).
requantize()  writes into the existing buffers (copy_), so captured CUDA graphs stay valid.
"""
from __future__ import annotations

import logging
import time

import torch

from er_sglang.sglang import int4_kernels as ik
from er_sglang.sglang.marlin_int4 import GROUP_SIZE

logger = logging.getLogger(__name__)


def eligible(module) -> bool:
    """A decoder linear Marlin can take (tinygemm and gemlite too): 2-D weight, K % 128 == 0, N % 64 == 0; not the
    lm_head/embeddings."""
    from sglang.srt.layers.linear import LinearBase

    w = getattr(module, "weight", None)
    return (isinstance(module, LinearBase) and isinstance(w, torch.Tensor) and w.dim() == 2
            and w.shape[1] % GROUP_SIZE == 0 and w.shape[0] % 64 == 0)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class SelfDrafter:
    def __init__(self, model, kernel: str | None = None):
        self.model = model
        self.kernel = ik.get_kernel(kernel or ik.kernel_from_env())  # spec.draft_kernel
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
                self.int4_bytes += ik.attach(mod, self.kernel)
                self.linears.append((name, mod))
        _sync()
        logger.info("self-draft: %d linears with int4 twins (%s, %.3f GB), %.2f s", len(self.linears),
                    self.kernel.name, self.int4_bytes / 1e9, time.perf_counter() - t0)

    def warmup(self, batch_sizes) -> int:
        """One eager int4 call per linear shape and batch size (gemlite compiles / autotunes there). SGLang's graph
        runner already runs eager forwards before each capture; this is for graphs captured elsewhere."""
        return ik.warmup(self.kernel, [mod.er_int4 for _, mod in self.linears], batch_sizes)

    def mark_stale(self) -> None:
        self.is_stale = True

    def refresh_if_stale(self) -> None:
        if self.is_stale:
            self.requantize()

    @torch.no_grad()
    def requantize(self) -> float:
        """Re-quantize every twin from its linear's current weight, in place; returns seconds."""
        _sync()
        t0 = time.perf_counter()
        for _, mod in self.linears:
            ik.requant_(mod, mod.weight.data, self.kernel)
        _sync()
        self.requant_s = time.perf_counter() - t0
        self.num_requant += 1
        self.is_stale = False
        return self.requant_s

    @torch.no_grad()
    def check(self) -> dict:
        """Do the twins equal a fresh quantization of the current weights (bitwise)?"""
        num_equal = sum(ik.is_fresh(mod, self.kernel) for _, mod in self.linears)
        return {"num_linears": len(self.linears), "num_equal": num_equal,
                "all_equal": num_equal == len(self.linears), "is_stale": self.is_stale}
