"""The RolloutEngine interface shared by the CPU reference engine and the SGLang backend.

The backends import this module, never the reverse: `make_engine` (which picks a backend) is in
er_sglang/rollout.py.

An engine turns prompts into completed rollouts with the policy's exact sampling distribution,
accepts new target weights (re-quantizing its self-drafter from them), can release memory while a
colocated trainer runs, and reports speculative-decoding statistics.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class SamplingParams:
    """Per-request sampling settings (RL default: temperature 1, top-p 1)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Rollout:
    """One finished generation: output tokens and the target's log-prob of each of them."""

    prompt_index: int
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]  # target log p(token) at temperature T, one per output token
    finish_reason: str  # "stop" | "length"
    num_drafted: int = 0
    num_accepted: int = 0
    num_verify_steps: int = 0


@dataclass
class SpecStats:
    """Speculation statistics accumulated over decode steps.

    accept_rate = num_accepted / num_drafted counts only steps that drafted (gamma > 0), so the
    denominator stays right when gamma varies per step.
    """

    num_steps: int = 0  # decode steps (batch forward passes of the target)
    num_spec_steps: int = 0  # steps with gamma > 0
    num_drafted: int = 0  # sum over sequences of gamma on spec steps
    num_accepted: int = 0
    num_emitted: int = 0  # tokens emitted by decode steps (accepted + one per sequence-step)
    num_seq_steps: int = 0  # sum over steps of active sequences
    accept_len_hist: dict[int, int] = field(default_factory=dict)  # accepted drafts -> count (spec steps)
    gamma_hist: dict[int, int] = field(default_factory=dict)  # gamma -> steps
    requant_s: float = 0.0

    @property
    def accept_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0

    @property
    def mean_accept_len(self) -> float:
        """Tokens emitted per sequence per verify step (1.0 for plain decoding)."""
        return self.num_emitted / self.num_seq_steps if self.num_seq_steps else 0.0

    @property
    def spec_on_frac(self) -> float:
        return self.num_spec_steps / self.num_steps if self.num_steps else 0.0

    def merge(self, other: SpecStats) -> SpecStats:
        out = SpecStats()
        for name in ("num_steps", "num_spec_steps", "num_drafted", "num_accepted", "num_emitted",
                     "num_seq_steps", "requant_s"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        for name in ("accept_len_hist", "gamma_hist"):
            merged = dict(getattr(self, name))
            for k, v in getattr(other, name).items():
                merged[k] = merged.get(k, 0) + v
            setattr(out, name, merged)
        return out

    def as_metrics(self) -> dict:
        return {"spec/accept_rate": self.accept_rate, "spec/mean_accept_len": self.mean_accept_len,
                "spec/on_frac": self.spec_on_frac, "spec/num_drafted": self.num_drafted,
                "spec/num_accepted": self.num_accepted, "spec/requant_s": self.requant_s}


@runtime_checkable
class RolloutEngine(Protocol):
    """What the orchestrator needs from a rollout engine (reference or SGLang)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """Generate one rollout per prompt (repeat a prompt G times for G samples)."""

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        """Load new target weights, then re-quantize the drafter; returns {"load_s", "requant_s"}."""

    def weights_checksum(self) -> str:
        """Checksum of the target's weights, comparable with `state_dict_checksum` of the trainer's."""

    def draft_check(self) -> dict:
        """{"ok": drafter == a fresh quantization of the target's weights, "num_linears", "num_equal"}."""

    def requantize(self) -> float:
        """Re-quantize the drafter from the target's current weights; returns seconds."""

    def sleep(self) -> None:
        """Release device memory for colocated training (no-op on CPU)."""

    def wake(self) -> None:
        """Restore memory released by sleep(); the drafter is valid afterwards."""

    def stats(self, reset: bool = False) -> SpecStats:
        """Spec statistics since the last reset."""

    def end_rollout(self) -> None:
        """Tell the spec policy a rollout (one RL step's generation) ended (ladder/toggle state)."""


def state_dict_checksum(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> str:
    """sha256 over names and values of every tensor (cast to `dtype` first, then fp32), sorted by name."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu")
        if dtype is not None:
            tensor = tensor.to(dtype)
        h.update(name.encode())
        h.update(tensor.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
