"""The RolloutEngine interface shared by the CPU reference engine and the SGLang backend.

The backends import this module, never the reverse: `make_engine` (which picks a backend) is in
er_sglang/rollout.py.

An engine turns prompts into completed rollouts with the policy's exact sampling distribution,
accepts new target weights (re-quantizing its self-drafter from them), can release memory while a
colocated trainer runs, and reports speculative-decoding statistics.
"""
from __future__ import annotations

import hashlib
import os
import time
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
    seed: int | None = None  # one seed for the call: request i gets request_seed(seed, 0, i, 0)
    seeds: list[int] | None = None  # one seed per prompt (overrides `seed`): request_seed(run, step, p, k)


def request_seed(run_seed: int, step: int, prompt_index: int, sample_index: int) -> int:
    """The sampling seed of one request: the first 8 bytes of sha256("run/step/prompt/sample"), >> 1.

    Unique per (run seed, RL step, prompt in the step's batch, sample in its group) and blind to which
    engine serves the request, so a rerun with another engine count hands every request the same seed.
    63 bits: SGLang keeps sampling_seed in an int64 tensor and hashes all 64 bits with the token position
    (sglang/srt/layers/sampler.py multinomial_with_seed).
    """
    key = f"{int(run_seed)}/{int(step)}/{int(prompt_index)}/{int(sample_index)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def request_seeds(run_seed: int, step: int, num_prompts: int, group: int) -> list[int]:
    """Seeds of a step's flat batch (prompt p's G samples adjacent): entry p * group + k."""
    return [request_seed(run_seed, step, i // group, i % group) for i in range(num_prompts * group)]


def call_seed(params: SamplingParams, fallback: int) -> int:
    """One seed for a whole call (engines with one generator per call, e.g. the reference engine):
    a hash of the per-request seeds, else params.seed, else `fallback`."""
    if params.seeds is not None:
        key = ",".join(str(int(s)) for s in params.seeds).encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1
    return int(params.seed) if params.seed is not None else int(fallback)


def per_request_seeds(params: SamplingParams, num_requests: int) -> list[int] | None:
    """One seed per request (engines that seed each request, e.g. SGLang): params.seeds, else derived
    from params.seed; None when neither is set."""
    if params.seeds is not None:
        if len(params.seeds) != num_requests:
            raise ValueError(f"SamplingParams.seeds: {len(params.seeds)} seeds for {num_requests} prompts")
        return [int(s) for s in params.seeds]
    if params.seed is None:
        return None
    return [request_seed(params.seed, 0, i, 0) for i in range(num_requests)]


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
    # seconds from the generate call's submission to this request's finish (None: the engine does not say);
    # a timing, not content, so equal rollouts stay equal across runs
    latency_s: float | None = field(default=None, compare=False)


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
    accept_hist_by_gamma: dict[int, dict[int, int]] = field(default_factory=dict)  # gamma -> accept_len_hist
    trace: list | None = None  # [t_s, active sequences, gamma, tokens emitted] per step (ER_TRACE_STEPS=1)

    @classmethod
    def fresh(cls) -> SpecStats:
        """Empty stats, with a step trace when ER_TRACE_STEPS is set."""
        return cls(trace=[] if tracing_steps() else None)

    def observe(self, gamma: int, accepted, t: float | None = None) -> None:
        """One decode step: `accepted[i]` drafts of sequence i were accepted (clamped to gamma). A step that served
        no sequence is not counted: SGLang's overlap scheduler launches one step past the last token, for
        requests already finished, whose results it drops (counted, it would shorten every ms-per-step)."""
        acc = [min(int(a), gamma) for a in accepted]
        rows, total = len(acc), sum(acc)
        if not rows:
            return
        self.num_steps += 1
        self.num_seq_steps += rows
        self.num_emitted += total + rows
        self.gamma_hist[gamma] = self.gamma_hist.get(gamma, 0) + 1
        if gamma > 0:
            self.num_spec_steps += 1
            self.num_drafted += gamma * rows
            self.num_accepted += total
            by_gamma = self.accept_hist_by_gamma.setdefault(gamma, {})
            for a in acc:
                self.accept_len_hist[a] = self.accept_len_hist.get(a, 0) + 1
                by_gamma[a] = by_gamma.get(a, 0) + 1
        if self.trace is not None:
            self.trace.append([round(time.perf_counter() if t is None else t, 5), rows, gamma, total + rows])

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
            setattr(out, name, _add_counts(getattr(self, name), getattr(other, name)))
        out.accept_hist_by_gamma = {g: _add_counts(self.accept_hist_by_gamma.get(g, {}),
                                                   other.accept_hist_by_gamma.get(g, {}))
                                    for g in set(self.accept_hist_by_gamma) | set(other.accept_hist_by_gamma)}
        if self.trace is not None or other.trace is not None:
            out.trace = (self.trace or []) + (other.trace or [])
        return out

    def as_metrics(self) -> dict:
        return {"spec/accept_rate": self.accept_rate, "spec/mean_accept_len": self.mean_accept_len,
                "spec/on_frac": self.spec_on_frac, "spec/num_drafted": self.num_drafted,
                "spec/num_accepted": self.num_accepted, "spec/requant_s": self.requant_s}


def _add_counts(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def tracing_steps() -> bool:
    """ER_TRACE_STEPS=1: engines keep a per-step trace in SpecStats.trace (benchmarks plot the active batch)."""
    return os.environ.get("ER_TRACE_STEPS", "") not in ("", "0")


@runtime_checkable
class RolloutEngine(Protocol):
    """What the orchestrator needs from a rollout engine (reference or SGLang)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """Generate one rollout per prompt (repeat a prompt G times for G samples)."""

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        """Load new target weights, then re-quantize the drafter; returns {"load_s", "requant_s"}."""

    def weights_dtype(self) -> str:
        """The dtype the target holds its weights in ("bfloat16", "float32"): what a sync sends."""

    def begin_weight_update(self, shapes: dict[str, list[int]]) -> None:
        """Check a coming bucketed update names known parameters of these shapes (raise ValueError naming the
        first that does not) before any bucket is copied."""

    def load_weights(self, named: list[tuple[str, torch.Tensor]], last: bool) -> dict[str, float]:
        """One bucket of a bucketed update, copied in place; the last one makes the drafter follow (at once
        or before the next draft); returns {"load_s", "requant_s"}."""

    def weights_checksum(self) -> str:
        """Fingerprint of the target's weights (before/after an update; engine-specific, not the trainer's)."""

    def weights_probe(self, shapes: dict[str, list[int]], num_values: int) -> dict:
        """{HF name: {"dtype", "shape", "values"}}: up to `num_values` values the target holds for each sent
        tensor (er_sglang/weight_probe.py), so the trainer can check a sync exactly; unknown names left out."""

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

    def policy_state(self) -> dict | None:
        """The spec policy's cross-rollout state, JSON-safe (checkpoints, engine restarts); None if none."""

    def load_policy_state(self, state: dict | None) -> None:
        """Restore `policy_state()`'s output (None: keep the current state)."""


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
