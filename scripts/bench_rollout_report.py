"""bench_rollout.py's `plot` and `table`: a rollout benchmark's JSON as the markdown table of docs/benchmarks.md
and as a PNG of the active batch and tokens/s over time, one line per mode (the last rollout of one part)."""
from __future__ import annotations

import json


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
