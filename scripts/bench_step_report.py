"""bench_step.py's `plot` and `table`: the step benchmark's records (one or more runs' JSON) as a PNG and as the
markdown tables of docs/benchmarks.md: per (S, B, variant, gamma) r = draft step / AR, r_plain, verify / AR; r side
by side per variant; with --accept (scripts/accept_real.py JSONs) the acceptance and the per-step gain over AR."""
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
    runs = [(path, *_rows(path)) for path in args.json]
    _same_server_args([(path, data) for path, data, _ in runs])
    recs = [r for _, _, records in runs for r in records]
    ar = {(r["seq"], r["batch"]): r["ms_per_step"] for r in recs if r["mode"] == "ar"}
    sd = [dict(r, variant=r.get("variant", "marlin")) for r in recs if r["mode"] == "sd"]
    plain = {(r["seq"], r["batch"], r["variant"]): r.get("t_decode_ms") for r in sd if r["gamma"] == 0}

    def ratio(x, t):
        return x / t if t and x else None

    print("| S | B | variant | gamma | wall ms/step | events ms/step | AR ms | step/AR (wall) | t_draft_step ms "
          "| r = draft step/AR | r_plain | t_verify ms | verify/AR |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(sd, key=lambda r: (r["seq"], r["batch"], r["variant"], r["gamma"])):
        t_ar, t_plain = ar.get((r["seq"], r["batch"])), plain.get((r["seq"], r["batch"], r["variant"]))
        draft, wall = r.get("t_draft_step_ms"), r.get("ms_per_step_wall")
        print(f"| {r['seq']} | {r['batch']} | {r['variant']} | {r['gamma']} | {_f(wall)} | {_f(r['ms_per_step'])} | "
              f"{_f(t_ar)} | {_f(ratio(wall, t_ar))} | {_f(draft)} | {_f(ratio(draft, t_ar))} | "
              f"{_f(ratio(draft, t_plain))} | {_f(r['t_verify_ms'])} | {_f(ratio(r['t_verify_ms'], t_ar))} |")
    _table_r(sd, ar)
    if args.accept:
        _table_gain(sd, ar, _accepts(args.accept))


def _same_server_args(docs: list) -> None:
    """Runs ([(path, JSON)]) whose engines differ in --sglang (e.g. a torch.compile run) have different AR steps: one
    table of them would set one run's SD against another's AR. ValueError naming the two files."""
    seen = {}
    for path, data in docs:
        seen.setdefault(json.dumps(data.get("meta", {}).get("sglang") or {}, sort_keys=True), path)
    if len(seen) > 1:
        (a, pa), (b, pb) = list(seen.items())[:2]
        raise ValueError(f"--json: {pa} ran --sglang {a}, {pb} --sglang {b}: table them apart (each has its own AR)")


def _f(x) -> str:
    return "" if x is None else f"{x:.3f}"


def _table_r(sd: list, ar: dict) -> None:
    """r = t_draft_step / T_AR, one column per variant (in order of appearance), per (S, B, gamma > 0)."""
    names = list(dict.fromkeys(r["variant"] for r in sd))
    r_of = {(r["seq"], r["batch"], r["gamma"], r["variant"]): r["t_draft_step_ms"] / ar[(r["seq"], r["batch"])]
            for r in sd if r["gamma"] and r.get("t_draft_step_ms") and ar.get((r["seq"], r["batch"]))}
    print(f"\n| S | B | gamma | {' | '.join(f'r {n}' for n in names)} |")
    print("|---|---|---|" + "---|" * len(names))
    for s, b, g in sorted({k[:3] for k in r_of}):
        print(f"| {s} | {b} | {g} | " + " | ".join(_f(r_of.get((s, b, g, n))) for n in names) + " |")


def _accept_key(grid: str, vocab: int, head: str, gamma: int, counts: str | None = "tokens") -> tuple:
    """What acceptance depends on besides the model and prompts: the int4 grid, the draft head (and what ranks a
    K-subset: SGLang counts tokens only; the CPU may count soft), gamma."""
    return grid, int(vocab or 0), head or "shared", (counts or "tokens") if vocab else None, int(gamma)


def _accepts(paths: list) -> dict:
    """_accept_key -> (accept_rate, mean_accept_len L = tokens per verify step incl. the bonus, path) of
    scripts/accept_real.py JSONs (files written before draft_grid existed ran the engine's default grid)."""
    from er_sglang.int4_linear import draft_grid

    out = {}
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        engine = "sglang" if d.get("engine") == "sglang" else "reference"
        key = _accept_key(d.get("draft_grid") or draft_grid(d.get("draft_kernel") or "auto", engine),
                          d.get("draft_vocab"), d.get("draft_head"), d["gamma"], d.get("draft_vocab_counts"))
        if key in out:
            raise SystemExit(f"--accept: {out[key][2]} and {path} both measured {key} (grid, vocab, head, counts, "
                             "gamma)")
        out[key] = (d["accept_rate"], d["mean_accept_len"], path)
    return out


def _table_gain(sd: list, ar: dict, accepts: dict) -> None:
    """Per SD record with an acceptance of its variant's grid, head and gamma: predicted gain per step
    G = L / (gamma * r + v) (r = t_draft_step / T_AR, v = t_verify / T_AR: the worker's events, so no host work)
    and measured G = L * T_AR / wall ms per step; G > 1: SD emits tokens faster than plain decoding."""
    from er_sglang.int4_linear import draft_grid
    from scripts.bench_step_variant import parse_variant

    print("\nPredicted G uses the worker's CUDA-event times over AR's wall time (no host work on the SD side), so it "
          "reads above the measured G where host work shows (small B).")
    print("\n| S | B | variant | gamma | accept rate | L (tokens/step) | r | v | G = L/(gamma r + v) "
          "| G measured = L T_AR / wall step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rec in sorted(sd, key=lambda r: (r["seq"], r["batch"], r["variant"], r["gamma"])):
        t_ar, g, v = ar.get((rec["seq"], rec["batch"])), rec["gamma"], parse_variant(rec["variant"])
        hit = accepts.get(_accept_key(draft_grid(v.kernel, "sglang"), v.vocab, v.head, g))
        if not (g and hit and t_ar and rec.get("t_draft_step_ms") and rec.get("t_verify_ms")):
            continue
        alpha, length, _ = hit
        r, ver, wall = rec["t_draft_step_ms"] / t_ar, rec["t_verify_ms"] / t_ar, rec.get("ms_per_step_wall")
        wall = wall if wall and wall > 0 else None  # early runs' first point per B (benchmarks.md §6)
        print(f"| {rec['seq']} | {rec['batch']} | {rec['variant']} | {g} | {_f(alpha)} | {_f(length)} | {_f(r)} "
              f"| {_f(ver)} | {_f(length / (g * r + ver))} | {_f(length * t_ar / wall if wall else None)} |")
