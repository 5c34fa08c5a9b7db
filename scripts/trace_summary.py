"""Where a decode step's time goes, from a PyTorch profiler chrome trace (SGLang's start_profile output).

    python scripts/trace_summary.py TRACE.json.gz [--steps N] [--json OUT]

GPU side: the span from the first to the last kernel, the time some kernel runs (busy, the union of kernel
intervals), the idle gaps between kernels (>= --gap-us), the kernels that take the most time. Host side:
the CUDA runtime calls that block (synchronize, blocking copies) and, when the trace has Python stacks,
the Python functions that were running while the GPU sat idle (inclusive time clipped to the gaps), which
names the host work a step exposes. Divide by --steps (the scheduler steps profiled) for per-step figures.
"""
from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
BLOCKING = ("Synchronize", "cudaMemcpy", "cudaStreamWaitEvent")


def load(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def _union(intervals: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """(busy time, gaps between merged intervals) of [(start, end)] sorted by start."""
    busy, gaps, cur_s, cur_e = 0.0, [], None, None
    for s, e in intervals:
        if cur_e is None:
            cur_s, cur_e = s, e
        elif s > cur_e:
            busy += cur_e - cur_s
            gaps.append((cur_e, s))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return busy, gaps


def _overlap(s: float, e: float, gaps: list[tuple[float, float]], starts: list[float]) -> float:
    """Length of [s, e] inside the (sorted, disjoint) gaps."""
    import bisect

    total, i = 0.0, max(bisect.bisect_right(starts, s) - 1, 0)
    while i < len(gaps) and gaps[i][0] < e:
        lo, hi = max(s, gaps[i][0]), min(e, gaps[i][1])
        if hi > lo:
            total += hi - lo
        i += 1
    return total


def summarize(trace: dict, steps: int = 1, gap_us: float = 20.0, top: int = 15) -> dict:
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    kernels = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in events
                     if e.get("cat") in GPU_CATS)
    if not kernels:
        return {"error": "no GPU kernels in the trace"}
    span = kernels[-1][1] - kernels[0][0]
    busy, all_gaps = _union([(s, e) for s, e, _ in kernels])
    gaps = [(s, e) for s, e in all_gaps if e - s >= gap_us]
    per_kernel = defaultdict(lambda: [0.0, 0])
    for s, e, name in kernels:
        per_kernel[name][0] += e - s
        per_kernel[name][1] += 1
    blocking = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") == "cuda_runtime" and any(b in e["name"] for b in BLOCKING):
            blocking[e["name"]][0] += float(e["dur"])
            blocking[e["name"]][1] += 1
    starts = [g[0] for g in gaps]
    in_gaps = defaultdict(float)
    for e in events:
        if e.get("cat") in ("python_function", "user_annotation", "cpu_op"):
            t = _overlap(float(e["ts"]), float(e["ts"]) + float(e["dur"]), gaps, starts)
            if t > 0:
                in_gaps[f"{e['cat'][:3]}:{e['name'][:120]}"] += t
    n = max(steps, 1)
    return {
        "steps": steps,
        "span_ms_per_step": span / n / 1e3,
        "gpu_busy_ms_per_step": busy / n / 1e3,
        "gpu_idle_ms_per_step": (span - busy) / n / 1e3,
        "gaps_ge_us": gap_us,
        "num_gaps_per_step": len(gaps) / n,
        "gap_ms_per_step": sum(e - s for s, e in gaps) / n / 1e3,
        "largest_gaps_us": sorted((round(e - s, 1) for s, e in gaps), reverse=True)[:top],
        "top_kernels": [{"name": k[:100], "us_per_step": v[0] / n, "calls_per_step": v[1] / n}
                        for k, v in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]],
        "blocking_runtime": [{"name": k, "us_per_step": v[0] / n, "calls_per_step": v[1] / n}
                             for k, v in sorted(blocking.items(), key=lambda kv: -kv[1][0])],
        "host_in_gaps": [{"name": k, "us_per_step": v / n}
                         for k, v in sorted(in_gaps.items(), key=lambda kv: -kv[1])[:3 * top]],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--gap-us", type=float, default=20.0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    out = summarize(load(args.trace), args.steps, args.gap_us)
    text = json.dumps(out, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
