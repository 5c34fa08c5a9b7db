"""Trainer -> engines weight sync: full state dict from the FSDP ranks, into every engine, drafter refreshed.

Lifecycle (as TRL's weight transfer): gather (all ranks join the collective; rank 0 gets the dict) ->
send (one object-store copy, every engine's `update_weights`, which re-quantizes its drafter) ->
verify (on a schedule: what the engine holds under every sent name, read back in its own dtype, against the
sent tensor cast to that dtype, exactly (er_sglang/weight_probe.py); and its drafter against a fresh
quantization of those weights). An engine that fails keeps its previous weights (engines validate before
copying) and the sync raises a WeightSyncError naming it; an engine that dies raises Ray's RayActorError,
which the train loop answers by restarting it (orchestrator/train.py).
"""
from __future__ import annotations

import time

import ray
from ray.exceptions import RayActorError

from er_sglang.weight_probe import PROBE_NUM_VALUES, probe_mismatch


class WeightSyncError(RuntimeError):
    pass


class DraftError(WeightSyncError):
    """A drafter still differs from its target's quantization after being re-quantized."""


class WeightSync:
    def __init__(self, trainers: list, engines: list, verify_every: int = 1):
        self.trainers, self.engines, self.verify_every = trainers, engines, verify_every
        self.num_syncs = 0

    def gather(self):
        """Full (unsharded) policy state dict: every rank's dim-0 shards, concatenated in rank order."""
        from orchestrator.trainer import assemble_shards

        return assemble_shards(ray.get([t.local_state_dict.remote() for t in self.trainers]))

    def sync(self) -> dict[str, float]:
        """Push the trainers' weights into every engine; returns timing/sync metrics."""
        t0 = time.perf_counter()
        state_dict = self.gather()
        gather_s = time.perf_counter() - t0
        ref = ray.put(state_dict)
        calls = [e.update_weights.remote(ref) for e in self.engines]
        timings = []
        for i, call in enumerate(calls):
            try:
                timings.append(ray.get(call))
            except RayActorError:
                raise  # the engine died: the train loop restarts it and syncs again
            except Exception as exc:  # noqa: BLE001 - the engine raised: it kept its previous weights
                raise WeightSyncError(f"weight sync failed on engine {i}: {_first_line(exc)}") from None
        self.num_syncs += 1
        out = {"timing/sync_s": time.perf_counter() - t0, "timing/sync_gather_s": gather_s,
               "timing/sync_load_s": max(t["load_s"] for t in timings),
               "spec/requant_s": max(t["requant_s"] for t in timings)}
        if self.verify_every and self.num_syncs % self.verify_every == 0:
            self.verify(state_dict)
            out["sync/verified"] = 1.0
            out["spec/draft_ok"] = check_drafts(self.engines)
        return out

    def verify(self, state_dict) -> None:
        """Every engine holds the sent weights: PROBE_NUM_VALUES values of every tensor, under the trainer's
        names, bit-equal to the sent ones cast to the engine's dtype."""
        shapes = {name: list(t.shape) for name, t in state_dict.items()}
        probes = ray.get([e.weights_probe.remote(shapes, PROBE_NUM_VALUES) for e in self.engines])
        for i, probe in enumerate(probes):
            reason = probe_mismatch(state_dict, probe, PROBE_NUM_VALUES)
            if reason:
                raise WeightSyncError(f"weight sync check failed on engine {i}: {reason}")


def check_drafts(engines: list) -> float:
    """1.0 if every drafter equals a fresh quantization of its target; else re-quantize the ones that
    don't and return 0.0. Raises DraftError if one still differs (the fault is not a missed refresh).

    A stale or corrupted draft never changes what is sampled (verification is lossless); it only drops
    acceptance, so the rollout it produced stands and the next one runs with the repaired draft.
    """
    checks = ray.get([e.draft_check.remote() for e in engines])
    bad = [i for i, c in enumerate(checks) if not c["ok"]]
    if not bad:
        return 1.0
    ray.get([engines[i].requantize.remote() for i in bad])
    again = ray.get([engines[i].draft_check.remote() for i in bad])
    still = [i for i, c in zip(bad, again) if not c["ok"]]
    if still:
        raise DraftError(f"drafter of engine(s) {still} differs from a fresh int4 quantization of its target "
                         f"even after re-quantizing ({again[bad.index(still[0])]}); stopping")
    return 0.0


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    tail = [line for line in text if "Error" in line]
    return (tail[-1] if tail else (text[-1] if text else type(exc).__name__))[:300]
