"""Replayed acceptance: a benchmark-only switch that makes the GPU worker accept, at each verify step, a
number of draft tokens drawn from a distribution measured earlier on a real model (per gamma).

It exists for one job: timing rollouts of a large model with random weights (scripts/bench_rollout.py part
`replay_7b`), whose own acceptance is meaningless, at the acceptance a real model showed. The emitted tokens
are placeholders, so nothing it produces is a rollout of any policy. It is switched on only by the
environment variable ER_BENCH_REPLAY_ACCEPT (a JSON file written by `build_replay`); no config key reaches
it, and `er-train` refuses to start while the variable is set (`refuse_in_training`).

The draw is per batch step (SGLang's simulated-acceptance hook sets one accept length for the whole batch),
which keeps the expected tokens per step, hence the expected throughput, of the measured distribution.
A gamma that was never measured uses the i.i.d. per-token acceptance fitted to the measured gammas.
"""
from __future__ import annotations

import json
import os
import random

ENV = "ER_BENCH_REPLAY_ACCEPT"


class ReplayRefused(ValueError):
    pass


def refuse_in_training() -> None:
    """Raise (one line) if the replay switch is on: training must never run on replayed acceptance."""
    if os.environ.get(ENV):
        raise ReplayRefused(f"{ENV} is set ({os.environ[ENV]}): replayed acceptance is a benchmark-only switch "
                            f"that emits placeholder tokens; unset it to train")


def build_replay(hists: list[dict], source: str) -> dict:
    """Merge per-gamma accept histograms ({gamma: {accepted drafts: count}}, keys may be strings)."""
    merged: dict[int, dict[int, int]] = {}
    for hist in hists:
        for g, counts in (hist or {}).items():
            slot = merged.setdefault(int(g), {})
            for k, n in counts.items():
                slot[int(k)] = slot.get(int(k), 0) + int(n)
    merged = {g: c for g, c in merged.items() if g > 0 and sum(c.values()) > 0}
    if not merged:
        raise ValueError(f"replay: no accept histogram with gamma > 0 in {source}")
    return {"source": source, "accept_hist_by_gamma": {str(g): {str(k): n for k, n in sorted(c.items())}
                                                       for g, c in sorted(merged.items())},
            "alpha_iid": round(fit_alpha(merged), 6)}


def fit_alpha(hists: dict[int, dict[int, int]]) -> float:
    """Per-token acceptance alpha of the i.i.d. chain model: accepted / (accepted + first rejections)."""
    accepted = sum(k * n for c in hists.values() for k, n in c.items())
    rejections = sum(n for g, c in hists.items() for k, n in c.items() if k < g)
    return accepted / (accepted + rejections) if accepted + rejections else 0.0


class ReplayAccept:
    """Draws accepted-draft counts in [0, gamma] from the measured distribution of that gamma."""

    def __init__(self, spec: dict, seed: int = 0):
        self.hists = {int(g): {int(k): int(n) for k, n in c.items()}
                      for g, c in spec["accept_hist_by_gamma"].items()}
        self.alpha = float(spec.get("alpha_iid", fit_alpha(self.hists)))
        self.source = spec.get("source", "?")
        self.rng = random.Random(seed)

    @classmethod
    def from_env(cls) -> ReplayAccept | None:
        path = os.environ.get(ENV)
        if not path:
            return None
        with open(path) as f:
            return cls(json.load(f))

    def draw(self, gamma: int) -> int:
        if gamma <= 0:
            return 0
        hist = self.hists.get(gamma)
        if hist:
            ks, ns = zip(*sorted(hist.items()))
            return min(self.rng.choices(ks, weights=ns)[0], gamma)
        k = 0  # i.i.d. chain: each next draft accepted with probability alpha
        while k < gamma and self.rng.random() < self.alpha:
            k += 1
        return k
