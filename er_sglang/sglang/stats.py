"""Spec statistics and CUDA-event step timing kept by the self-draft worker (scheduler process).

WorkerStats counts per decode step (a batch forward of the target) with the gamma that step used, so
accept_rate = num_accepted / num_drafted has the right denominator when gamma varies (drafted = sum over
sequences of gamma on gamma > 0 steps). Field names match er_sglang.engine.SpecStats.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch

from er_sglang.engine import SpecStats


class WorkerStats(SpecStats):
    """The engine's SpecStats, kept in the scheduler process; as_dict crosses the control RPC."""

    def __init__(self):
        super().__init__(trace=SpecStats.fresh().trace)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class StepTimer:
    """CUDA events around draft / draft-extend / verify / whole step, summed per (kind, gamma, batch)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._open: list = []
        self._acc: dict[tuple[str, int, int], list[float]] = defaultdict(lambda: [0.0, 0, 0, 0])  # ms, n, n_flag, n_graph

    def start(self):
        if not self.enabled:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(self, start, kind: str, gamma: int, bs: int, graph: bool | None = None) -> None:
        """graph: whether the timed forward replayed a CUDA graph (None: not a single forward); the summary's
        graph_frac shows a silent eager fallback, which would only read as a slow step."""
        if start is None:
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._open.append((kind, gamma, bs, start, end, graph))
        if len(self._open) >= 4096:
            self._resolve()

    def _resolve(self) -> None:
        if not self._open:
            return
        torch.cuda.synchronize()
        for kind, gamma, bs, start, end, graph in self._open:
            slot = self._acc[(kind, gamma, bs)]
            slot[0] += start.elapsed_time(end)
            slot[1] += 1
            if graph is not None:
                slot[2] += 1
                slot[3] += int(graph)
        self._open.clear()

    def summary(self) -> list[dict]:
        """[{kind, gamma, batch, ms (mean), n, graph_frac}] over everything timed since the last reset
        (graph_frac: None where the kind's forwards did not report it)."""
        self._resolve()
        return [{"kind": k, "gamma": g, "batch": b, "ms": v[0] / v[1], "n": v[1],
                 "graph_frac": v[3] / v[2] if v[2] else None}
                for (k, g, b), v in sorted(self._acc.items()) if v[1]]

    def reset(self) -> None:
        self._resolve()
        self._acc.clear()


class HostProfiler:
    """Host-side profile of the scheduler process over decode steps (ER_PROFILE_STEPS="skip,count[,path]").

    cProfile runs from decode step `skip` for `count` steps, then writes pstats (sorted by cumulative time)
    to `path` (default /tmp/er_host_profile.txt). For finding where a step's host time goes on the device.
    """

    def __init__(self, skip: int, count: int, path: str):
        import cProfile

        self.skip, self.count, self.path = skip, count, path
        self.num_steps = 0
        self.profile = cProfile.Profile()

    @classmethod
    def from_env(cls):
        import os

        raw = os.environ.get("ER_PROFILE_STEPS")
        if not raw:
            return None
        parts = raw.split(",")
        path = parts[2] if len(parts) > 2 else "/tmp/er_host_profile.txt"
        return cls(int(parts[0]), int(parts[1]), path)

    def tick(self) -> None:
        """Call once per decode step (from the worker, all of the scheduler loop in between is profiled)."""
        if self.num_steps == self.skip:
            self.profile.enable()
        elif self.num_steps == self.skip + self.count:
            self.profile.disable()
            import io
            import pstats

            out = io.StringIO()
            pstats.Stats(self.profile, stream=out).sort_stats("cumulative").print_stats(60)
            with open(self.path, "w") as f:
                f.write(out.getvalue())
        self.num_steps += 1
