"""Trainer -> engines weight sync: the policy's weights into every engine, bucketed, drafters following.

Lifecycle (as TRL's / verl's weight transfer): check (trainer weights finite, every engine knows every
name and shape: a refused update leaves all engines as they were) -> buckets (orchestrator/weight_transfer.py:
each bucket packed by the trainer ranks in the engines' dtype and loaded by every engine, the next one
packed while the current one loads; the KV cache flushed and the drafter made to follow after the last)
-> verify (on a schedule: what the engine holds under every sent name, read back in its own dtype, against
the sent values cast to that dtype, exactly (er_sglang/weight_probe.py), probed on the ranks' shards without
gathering; and its drafter against a fresh quantization of those weights). A failure inside the buckets
raises a WeightSyncError naming the engine and the bucket (its weights are then partly new); an engine that
dies raises Ray's RayActorError, which the train loop answers by restarting it (orchestrator/train.py).
"""
from __future__ import annotations

import time

import ray
from ray.exceptions import RayActorError

from er_sglang.weight_probe import PROBE_NUM_VALUES, merge_shard_probes, sent_probe_mismatch
from orchestrator.weight_transfer import dtype_of, plan_buckets


class WeightSyncError(RuntimeError):
    pass


class DraftError(WeightSyncError):
    """A drafter still differs from its target's quantization after being re-quantized."""


class WeightSync:
    def __init__(self, trainers: list, engines: list, verify_every: int = 1, transport: str = "object_store",
                 bucket_mb: float = 512.0):
        self.trainers, self.engines, self.verify_every = trainers, engines, verify_every
        self.transport, self.bucket_bytes = transport, int(bucket_mb * 2**20)
        self.num_syncs = 0
        self._plan: tuple | None = None  # (dtype, shapes, buckets, copies): fixed for a run

    def plan(self) -> tuple:
        """(dtype, shapes, buckets, copies per engine), asked once: the engines' weight dtype (they must
        agree), the trainer's names and full shapes, the buckets, each engine's TP size (cuda_ipc payloads)."""
        if self._plan is None:
            dtypes = ray.get([e.weights_dtype.remote() for e in self.engines])
            if len(set(dtypes)) > 1:
                raise WeightSyncError(f"engines hold their weights in different dtypes {dtypes}; "
                                      "one sync can't serve them")
            shapes = ray.get(self.trainers[0].weight_shapes.remote())
            ipc = self.transport == "cuda_ipc"
            copies = ray.get([e.tp_size.remote() for e in self.engines]) if ipc else []
            buckets = plan_buckets(shapes, dtype_of(dtypes[0]), self.bucket_bytes)
            self._plan = (dtypes[0], shapes, buckets, copies)
        return self._plan

    def sync(self) -> dict[str, float]:
        """Push the trainers' weights into every engine; returns timing/sync metrics."""
        t0 = time.perf_counter()
        dtype, shapes, buckets, copies = self.plan()
        if not all(ray.get([t.weights_finite.remote() for t in self.trainers])):
            raise WeightSyncError("the trainer's weights hold NaN/inf; engines keep their previous weights")
        self._call_engines([e.begin_weight_update.remote(dict(shapes)) for e in self.engines],
                           "refused the update")
        load_s, requant_s, pending = 0.0, 0.0, self._pack(0, buckets[0], dtype, copies)
        for i, names in enumerate(buckets):
            last = i == len(buckets) - 1
            parts, pending = pending, (None if last else self._pack(i + 1, buckets[i + 1], dtype, copies))
            if self.transport == "cuda_ipc":
                calls = [e.load_weight_bucket.remote("cuda_ipc", [parts[k]], last)
                         for k, e in enumerate(self.engines)]
            else:
                calls = [e.load_weight_bucket.remote("object_store", parts, last) for e in self.engines]
            timings = self._call_engines(calls, f"failed at bucket {i + 1}/{len(buckets)} "
                                                "(its weights are partly new)")
            if self.transport == "cuda_ipc":
                ray.get([t.release_bucket.remote(i) for t in self.trainers])
            load_s += max(t["load_s"] for t in timings)
            requant_s = max(t["requant_s"] for t in timings)
        self.num_syncs += 1
        out = {"timing/sync_s": time.perf_counter() - t0, "timing/sync_load_s": load_s,
               "spec/requant_s": requant_s, "sync/num_buckets": float(len(buckets))}
        if self.verify_every and self.num_syncs % self.verify_every == 0:
            self.verify(dtype, shapes)
            out["sync/verified"] = 1.0
            out["spec/draft_ok"] = check_drafts(self.engines)
        return out

    def _pack(self, index: int, names: list[str], dtype: str, copies: list[int]) -> list:
        """Every rank packs bucket `index` (refs; cuda_ipc: rank k serves engine k, others only gather)."""
        return [t.pack_bucket.remote(index, names, dtype, self.transport, copies[k] if k < len(copies) else 0)
                for k, t in enumerate(self.trainers)]

    def _call_engines(self, calls: list, what: str) -> list:
        out = []
        for i, call in enumerate(calls):
            try:
                out.append(ray.get(call))
            except RayActorError:
                raise  # the engine died: the train loop restarts it and syncs again
            except Exception as exc:  # noqa: BLE001 - the engine raised
                raise WeightSyncError(f"weight sync {what} on engine {i}: {_first_line(exc)}") from None
        return out

    def verify(self, dtype: str, shapes: list) -> None:
        """Every engine holds the sent weights: PROBE_NUM_VALUES values of every tensor, under the trainer's
        names, bit-equal to the sent ones cast to the engine's dtype (probed on the ranks' shards)."""
        parts = ray.get([t.sent_probes.remote(dtype, PROBE_NUM_VALUES) for t in self.trainers])
        sent = {name: merge_shard_probes([p[name] for p in parts], shape, dtype_of(dtype))
                for name, shape in shapes}
        want = {name: list(shape) for name, shape in shapes}
        check_engines(self.engines, sent, want)


def check_engines(engines: list, sent: dict, shapes: dict) -> None:
    """Raise WeightSyncError naming the first engine whose probe differs from the sent probes."""
    probes = ray.get([e.weights_probe.remote(shapes, PROBE_NUM_VALUES) for e in engines])
    for i, probe in enumerate(probes):
        reason = sent_probe_mismatch(sent, probe, PROBE_NUM_VALUES)
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
