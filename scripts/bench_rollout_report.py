"""bench_rollout.py's `plot`, `table` and `breakdown`: a rollout benchmark's JSON as the markdown table of docs/benchmarks.md
and as a PNG of the active batch and tokens/s over time, one line per mode (the last rollout of one part).

`breakdown` (issue 10: where the long tail's time goes), per (part, mode) over its rollouts and per active-batch
bucket (BUCKET_LOWS): the share of time and tokens and the tokens/s (active_curve, every mode), how often and
with which gamma the policy speculated (trace, SD modes), and the speedup vs no-sd in that bucket:

    python scripts/bench_rollout.py breakdown --json RUNS.json [--out BREAKDOWN.json]
"""
from __future__ import annotations

import bisect
import itertools
import json

BUCKET_LOWS = (1, 2, 5, 17, 65, 257)  # bucket i holds BUCKET_LOWS[i] <= B < BUCKET_LOWS[i + 1]; the last is open


def bucket_labels(lows: tuple = BUCKET_LOWS) -> list[str]:
    """'1', '2-4', '5-16', '17-64', '65-256', '>256' for the default lower edges."""
    ends = [*(lo - 1 for lo in lows[1:]), None]
    return [f">{lo - 1}" if hi is None else str(lo) if hi == lo else f"{lo}-{hi}" for lo, hi in zip(lows, ends)]


LABELS = bucket_labels()


def series(run: dict) -> tuple[list, list, list, str] | None:
    """(t_s, active, tokens_per_s, drawstyle) of one run: its `active_curve` (every mode, one estimator:
    bench_rollout.CURVE_DOC), else its thinned step `trace` (files from before active_curve), whose rate at a
    kept point is the tokens emitted since the previous kept point over the time since it (nan at the first);
    None if the run has neither."""
    curve = run.get("active_curve")
    if curve:
        return [p[0] for p in curve], [p[1] for p in curve], [p[2] for p in curve], "steps-post"
    trace = run.get("trace")
    if not trace:
        return None
    t = [p[0] for p in trace]
    rate = [p[3] / (t[i] - t[i - 1]) if i and t[i] > t[i - 1] else float("nan") for i, p in enumerate(trace)]
    return t, [p[1] for p in trace], rate, "steps-pre"  # a trace point's count covers the window before it


def cmd_plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.json) as f:
        data = json.load(f)
    part = args.part or data["runs"][0]["part"]
    runs = [r for r in data["runs"] if r["part"] == part]
    runs = [r for r in runs if r["rollout"] == max(x["rollout"] for x in runs)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        s = series(r)
        if s is not None:
            t, active, rate, style = s
            ax1.plot(t, active, label=r["mode"], drawstyle=style)
            ax2.plot(t, rate, label=r["mode"], drawstyle=style, alpha=0.7)
    ax1.set(xlabel="s since submission", ylabel="requests still running", title="active batch")
    ax2.set(xlabel="s since submission", ylabel="tokens/s (sum of len / latency over running requests)",
            title="throughput", yscale="log")
    ax1.legend(fontsize=7)
    fig.suptitle(f"{part} on {data['device']}, rollout {runs[0]['rollout'] if runs else '-'}")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    plt.close(fig)


def cmd_table(args) -> None:
    with open(args.json) as f:
        data = json.load(f)
    base = {(r["part"], r["rollout"]): r["wall_s"] for r in data["runs"] if r["mode"] == "no-sd"}
    print("| part | mode | rollout | wall s | vs no-sd | predicted s | tokens | tok/s | accept rate | mean accept len "
          "| SD-on frac | gamma hist |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in data["runs"]:
        b = base.get((r["part"], r["rollout"]))
        ratio = f"{b / r['wall_s']:.3f}x" if b and r["wall_s"] else ""
        print(f"| {r['part']} | {r['mode']} | {r['rollout']} | {r['wall_s']:.2f} | {ratio} | "
              f"{r.get('predicted_wall_s', '')} | {r['num_tokens']} | {r['tokens_per_s']} | {r['accept_rate']} | "
              f"{r['mean_accept_len']} | {r['spec_on_frac']} | {r['gamma_hist']} |")


def bucket_of(active: int) -> str | None:
    """The label of the bucket holding an active batch of `active` requests; None for 0 (nothing running)."""
    i = bisect.bisect_right(BUCKET_LOWS, active) - 1
    return LABELS[i] if i >= 0 else None


def curve_split(curve: list) -> dict:
    """{bucket: {"s", "tokens"}} of one active_curve, a step function: the segment [t_i, t_{i+1}) adds
    t_{i+1} - t_i s and tokens_per_s_i * (t_{i+1} - t_i) tokens to the bucket of active_i."""
    out = {}
    for (t0, active, rate), (t1, _, _) in itertools.pairwise(curve):
        b = bucket_of(active)
        if b is not None and t1 > t0:
            d = out.setdefault(b, {"s": 0.0, "tokens": 0.0})
            d["s"] += t1 - t0
            d["tokens"] += rate * (t1 - t0)
    return out


def trace_split(trace: list) -> dict:
    """{bucket: {"steps", "sd_steps", "s", "gamma_s": {gamma: s}}} of one thinned step trace. Kept point i
    stands for the window (t_{i-1}, t_i] its token count covers (`thin`), so it adds t_i - t_{i-1} s (the first
    point 0 s) at its own active batch and gamma; steps counts kept points (every k-th step, a uniform sample)."""
    out = {}
    for i, (t, active, gamma, _) in enumerate(trace):
        b = bucket_of(active)
        if b is None:
            continue
        dt = t - trace[i - 1][0] if i else 0.0
        d = out.setdefault(b, {"steps": 0, "sd_steps": 0, "s": 0.0, "gamma_s": {}})
        d["steps"] += 1
        d["sd_steps"] += gamma > 0
        d["s"] += dt
        d["gamma_s"][gamma] = d["gamma_s"].get(gamma, 0.0) + dt
    return out


def pooled(splits: list[dict]) -> dict:
    """The bucket-wise sum of several rollouts' splits (numbers added, nested dicts merged)."""
    def add(into: dict, d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                add(into.setdefault(k, {}), v)
            else:
                into[k] = into.get(k, 0) + v

    total = {}
    for split in splits:
        add(total, split)
    return total


def group_breakdown(runs: list[dict]) -> dict:
    """One (part, mode) over its rollouts. Curve: per bucket the mean s and tokens per rollout, time_share =
    s / sum of s, token_share likewise, tok_per_s = tokens / s (the time-weighted mean rate). Trace (SD modes):
    sd_step_frac = kept steps with gamma > 0 / kept steps, sd_time_frac and gamma_time_share = the trace time
    with gamma > 0 (with each gamma) / the bucket's trace time, pooled over the rollouts that have a trace."""
    curves = [curve_split(r["active_curve"]) for r in runs if r.get("active_curve")]
    traces = [trace_split(r["trace"]) for r in runs if r.get("trace") and r["mode"] != "no-sd"]
    curve, trace = pooled(curves), pooled(traces)
    total_s = sum(d["s"] for d in curve.values())
    total_tokens = sum(d["tokens"] for d in curve.values())
    buckets = {}
    for b in [b for b in LABELS if b in curve or b in trace]:
        row = buckets[b] = {}
        if b in curve:
            s, tokens = curve[b]["s"], curve[b]["tokens"]
            row.update(s=s / len(curves), time_share=s / total_s, tokens=tokens / len(curves),
                       token_share=tokens / total_tokens if total_tokens else None, tok_per_s=tokens / s)
        if b in trace:
            d = trace[b]
            row.update(sd_step_frac=d["sd_steps"] / d["steps"], sd_time_frac=None, gamma_time_share=None)
            if d["s"] > 0:
                row["sd_time_frac"] = sum(v for g, v in d["gamma_s"].items() if g > 0) / d["s"]
                row["gamma_time_share"] = {str(g): d["gamma_s"][g] / d["s"] for g in sorted(d["gamma_s"])}
    return {"part": runs[0]["part"], "mode": runs[0]["mode"], "rollouts": len(runs), "curve_rollouts": len(curves),
            "trace_rollouts": len(traces), "wall_s": sum(r["wall_s"] for r in runs) / len(runs),
            "wall_vs_no_sd": None, "buckets": buckets}


def breakdown(data: dict) -> dict:
    """Every (part, mode)'s group_breakdown with the speedups vs the same part's no-sd: wall_vs_no_sd = mean
    wall_s(no-sd) / mean wall_s(mode); per bucket vs_no_sd = no-sd's mean s in the bucket / the mode's (the
    buckets are by active count, so the same phase of the rollout). Runs lacking what a column needs are
    skipped with a note."""
    keys = list(dict.fromkeys((r["part"], r["mode"]) for r in data["runs"]))
    groups = [group_breakdown([r for r in data["runs"] if (r["part"], r["mode"]) == k]) for k in keys]
    base = {g["part"]: g for g in groups if g["mode"] == "no-sd"}
    notes = []
    for g in groups:
        name = f"{g['part']}/{g['mode']}"
        if g["curve_rollouts"] < g["rollouts"]:
            notes.append(f"{name}: {g['rollouts'] - g['curve_rollouts']} of {g['rollouts']} rollouts have no "
                         "active_curve (older JSON): left out of the time and token shares")
        if g["mode"] != "no-sd" and g["trace_rollouts"] < g["rollouts"]:
            notes.append(f"{name}: {g['rollouts'] - g['trace_rollouts']} of {g['rollouts']} rollouts have no "
                         "trace: left out of the gamma columns")
        b0 = base.get(g["part"])
        if b0 is None:
            notes.append(f"{name}: no no-sd run of this part: no speedups")
            continue
        g["wall_vs_no_sd"] = b0["wall_s"] / g["wall_s"] if g["wall_s"] else None
        for b, row in g["buckets"].items():
            if "s" in row:
                ref = b0["buckets"].get(b, {}).get("s")
                row["vs_no_sd"] = ref / row["s"] if ref else None
    return {"bucket_lows": list(BUCKET_LOWS), "groups": groups, "notes": notes}


COLUMNS = ("part", "mode", "B", "s", "time share", "token share", "tok/s", "vs no-sd", "SD-on steps", "SD-on time",
           "gamma by time")


def breakdown_lines(doc: dict) -> list[str]:
    """breakdown's markdown table: one `all` row per (part, mode) (s = mean wall_s, vs no-sd = the wall ratio)
    and one row per active-batch bucket it spent time in, small B (the tail) first; blank where no data."""
    def fmt(v, spec, unit=""):
        return "" if v is None else format(v, spec) + unit

    def row(cells):
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    lines = [row(COLUMNS), row(["---"] * len(COLUMNS)).replace(" ", "")]
    for g in doc["groups"]:
        lines.append(row([g["part"], g["mode"], "all", f"{g['wall_s']:.2f}", "", "", "",
                          fmt(g["wall_vs_no_sd"], ".2f", "x"), "", "", ""]))
        for b, r in g["buckets"].items():
            hist = " ".join(f"{k}:{v:.0%}" for k, v in (r.get("gamma_time_share") or {}).items())
            lines.append(row([g["part"], g["mode"], b, fmt(r.get("s"), ".2f"), fmt(r.get("time_share"), ".1%"),
                              fmt(r.get("token_share"), ".1%"), fmt(r.get("tok_per_s"), ".0f"),
                              fmt(r.get("vs_no_sd"), ".2f", "x"), fmt(r.get("sd_step_frac"), ".1%"),
                              fmt(r.get("sd_time_frac"), ".1%"), hist]))
    return lines + [f"note: {n}" for n in doc["notes"]]


def cmd_breakdown(args) -> None:
    with open(args.json) as f:
        doc = breakdown(json.load(f))
    print("\n".join(breakdown_lines(doc)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
