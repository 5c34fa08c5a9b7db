"""bench_step.py's `plot` and `table`: the step benchmark's records (one or more runs' JSON) as a PNG and as the
markdown table of docs/benchmarks.md (r = draft step / AR, r_plain, verify / AR per S, B, variant, gamma)."""
from __future__ import annotations

import json


def _rows(path):
    with open(path) as f:
        data = json.load(f)
    return data, data["records"]


def cmd_plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, recs = _rows(args.json)
    seqs = sorted({r["seq"] for r in recs})
    fig, axes = plt.subplots(1, len(seqs), figsize=(6 * len(seqs), 4.5), squeeze=False)
    for ax, s in zip(axes[0], seqs):
        for mode, g in sorted({(r["mode"], r["gamma"]) for r in recs if r["seq"] == s}):
            pts = sorted((r["batch"], r["ms_per_step"]) for r in recs
                         if r["seq"] == s and r["mode"] == mode and r["gamma"] == g and r["ms_per_step"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label="AR" if mode == "ar" else f"SD gamma={g}")
        ax.set(xscale="log", yscale="log", xlabel="batch B", ylabel="ms per decode step", title=f"S={s}")
        ax.legend(fontsize=7)
    fig.suptitle(f"{data['device']}: Qwen2.5-7B shapes, SGLang 0.5.17, int4 Marlin self-draft")
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)


def cmd_table(args) -> None:
    """Markdown: per (S, B, variant, gamma) the SD step, wall clock (ms_per_step_wall: what step/AR compares, as
    the AR step is wall clock too) and CUDA events (the worker's forward only), the AR step, r = draft step / AR,
    r_plain = draft step / the SD engine's own gamma = 0 decode step (no AR run needed) and verify / AR, over one
    or more runs' JSON files (records written before `variant` existed ran Marlin)."""
    recs = [r for path in args.json for r in _rows(path)[1]]
    ar = {(r["seq"], r["batch"]): r["ms_per_step"] for r in recs if r["mode"] == "ar"}
    sd = [dict(r, variant=r.get("variant", "marlin")) for r in recs if r["mode"] == "sd"]
    plain = {(r["seq"], r["batch"], r["variant"]): r.get("t_decode_ms") for r in sd if r["gamma"] == 0}

    def f(x):
        return "" if x is None else f"{x:.3f}"

    def ratio(x, t):
        return x / t if t and x else None

    print("| S | B | variant | gamma | wall ms/step | events ms/step | AR ms | step/AR (wall) | t_draft_step ms "
          "| r = draft step/AR | r_plain | t_verify ms | verify/AR |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(sd, key=lambda r: (r["seq"], r["batch"], r["variant"], r["gamma"])):
        t_ar, t_plain = ar.get((r["seq"], r["batch"])), plain.get((r["seq"], r["batch"], r["variant"]))
        draft, wall = r.get("t_draft_step_ms"), r.get("ms_per_step_wall")
        print(f"| {r['seq']} | {r['batch']} | {r['variant']} | {r['gamma']} | {f(wall)} | {f(r['ms_per_step'])} | "
              f"{f(t_ar)} | {f(ratio(wall, t_ar))} | {f(draft)} | {f(ratio(draft, t_ar))} | "
              f"{f(ratio(draft, t_plain))} | {f(r['t_verify_ms'])} | {f(ratio(r['t_verify_ms'], t_ar))} |")
