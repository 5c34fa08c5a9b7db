"""Issue 11's GPU training record from device runs' metrics.jsonl files: JSON + PNG + a summary.

    python scripts/train_report.py --run no-sd=res/train/no-sd.jsonl --run argmax=res/train/argmax.jsonl \
        --resume res/train/resume_argmax.jsonl --kill-after 2 \
        --json docs/results/train_gpu_h200.json --png docs/train_gpu_h200.png

JSON: {"runs": [{"mode", "steps": [metrics rows]}], "resume_checked", "resume", "summary"}. summary per mode:
steps, mean step / rollout / train / sync times over steps >= 2 (step 1 holds the warm-up), sync + requant as a
fraction of the step, reward of the first and last thirds, acceptance, the largest GPU memory per phase
(mem_max_gib: awake, asleep, training peak, woken; GPU runs only); and step_time_ratio = no-sd's mean step
time / each mode's (> 1: faster than no-sd). resume_checked: the resumed run's steps are 1..N without a gap,
and it went past --kill-after; resume.exact (with --resume-reference, the same run uninterrupted): its steps after
the kill equal the reference's (reward, loss, tokens), which SGLang allows only with deterministic inference.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator.tracker import read_metrics

PLOT_KEYS = ("train/reward_mean", "timing/step_s")
# GPU memory per phase (GiB; engine 0's device-wide nvidia-smi reading around sleep/wake, the trainer's own peak)
MEM_KEYS = ("mem/used_gib_awake", "mem/used_gib_asleep", "mem/train_peak_gib", "mem/train_reserved_gib",
            "mem/used_gib_woken")


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def summarize(rows: list[dict]) -> dict:
    """Means over steps >= 2 (all steps when there is only one)."""
    warm = [r for r in rows if r.get("step", 0) >= 2] or rows
    third = max(len(rows) // 3, 1)
    step_s = _mean(warm, "timing/step_s")
    # requant is inside sync_s on the CPU (the reference engine re-quantizes at the last bucket) and inside the
    # next rollout on SGLang (lazily, before the first draft): its own share, never added to sync's
    sync_s, requant_s = _mean(warm, "timing/sync_s"), _mean(warm, "spec/requant_s")
    out = {"num_steps": len(rows), "step_s": step_s, "rollout_s": _mean(warm, "timing/rollout_s"),
           "train_s": _mean(warm, "timing/train_s"), "sync_s": sync_s, "requant_s": requant_s,
           "sync_frac": (sync_s / step_s) if (sync_s is not None and step_s) else None,
           "requant_frac": (requant_s / step_s) if (requant_s is not None and step_s) else None,
           "reward_first": _mean(rows[:third], "train/reward_mean"),
           "reward_last": _mean(rows[-third:], "train/reward_mean"),
           "accept_rate": _mean(warm, "spec/accept_rate"), "spec_on_frac": _mean(warm, "spec/on_frac")}
    out["mem_max_gib"] = {k.split("/", 1)[1]: max(r[k] for r in rows if k in r) for k in MEM_KEYS
                          if any(k in r for r in rows)}
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def resume_checked(rows: list[dict], kill_after: int) -> bool:
    steps = [r["step"] for r in rows]
    return bool(steps) and steps == list(range(1, len(steps) + 1)) and steps[-1] > kill_after


# what must match, step for step, between the resumed run and an uninterrupted one (RESUME_EXACT=1 on the device)
EXACT_KEYS = ("train/reward_mean", "train/loss", "train/num_tokens")


def resume_exact(resumed: list[dict], reference: list[dict], kill_after: int, rtol: float = 1e-6) -> dict:
    """Steps after the kill, resumed vs uninterrupted (same config, deterministic inference): {"exact": every
    EXACT_KEYS value equal within rtol at every such step of both, "steps": compared step numbers, "max_rel_diff"}.
    exact is None when no step after the kill is in both."""
    ref = {r["step"]: r for r in reference}
    steps = [r["step"] for r in resumed if r["step"] > kill_after and r["step"] in ref]
    worst = 0.0
    for r in resumed:
        if r["step"] in steps:
            for key in EXACT_KEYS:
                a, b = r.get(key), ref[r["step"]].get(key)
                if a is None or b is None:
                    continue
                worst = max(worst, abs(a - b) / max(abs(a), abs(b), 1e-12))
    return {"exact": (worst <= rtol) if steps else None, "steps": steps, "max_rel_diff": worst}


def build(runs: dict[str, list[dict]], resume: list[dict] | None, kill_after: int,
          reference: list[dict] | None = None) -> dict:
    summary = {mode: summarize(rows) for mode, rows in runs.items()}
    base = summary.get("no-sd", {}).get("step_s")
    for s in summary.values():
        s["step_time_ratio"] = round(base / s["step_s"], 4) if (base and s["step_s"]) else None
    return {"runs": [{"mode": m, "steps": rows} for m, rows in runs.items()],
            "resume_checked": resume_checked(resume or [], kill_after),
            "resume": {"kill_after_step": kill_after, "steps": resume or [],
                       "exact": resume_exact(resume or [], reference, kill_after) if reference else None},
            "summary": summary}


def plot(runs: dict[str, list[dict]], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOT_KEYS), figsize=(5 * len(PLOT_KEYS), 3.5), squeeze=False)
    for ax, key in zip(axes[0], PLOT_KEYS):
        for mode, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def _run_arg(text: str) -> tuple[str, str]:
    mode, sep, path = text.partition("=")
    if not sep or not mode or not path:
        raise argparse.ArgumentTypeError(f"--run: expected MODE=PATH, got {text!r}")
    return mode, path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=_run_arg, action="append", required=True, help="MODE=metrics.jsonl")
    ap.add_argument("--resume", default=None, help="metrics.jsonl of the killed-and-resumed run")
    ap.add_argument("--kill-after", type=int, default=2)
    ap.add_argument("--resume-reference", default=None, help="metrics.jsonl of the same run uninterrupted: the "
                    "resumed steps are compared with it (resume.exact)")
    ap.add_argument("--json", required=True)
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    runs = {}
    for mode, path in args.run:
        if not Path(path).is_file():
            print(f"--run {mode}={path}: file not found", file=sys.stderr)
            return 2
        runs[mode] = read_metrics(path)
    for flag, path in (("--resume", args.resume), ("--resume-reference", args.resume_reference)):
        if path and not Path(path).is_file():
            print(f"{flag} {path}: file not found", file=sys.stderr)
            return 2
    report = build(runs, read_metrics(args.resume) if args.resume else None, args.kill_after,
                   read_metrics(args.resume_reference) if args.resume_reference else None)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.png:
        plot(runs, args.png)
    print(json.dumps({"summary": report["summary"], "resume_checked": report["resume_checked"],
                      "resume_exact": report["resume"]["exact"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
