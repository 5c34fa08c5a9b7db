"""Plot metrics of one or more runs: `python scripts/plot_metrics.py RUN_DIR... --key train/reward_mean --out x.png`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from orchestrator.tracker import read_metrics


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--key", action="append", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    keys = args.key or ["train/reward_mean"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for run in args.runs:
            rows = [r for r in read_metrics(Path(run) / "metrics.jsonl") if key in r]
            steps, values = [r["step"] for r in rows], [r[key] for r in rows]
            ax.plot(steps, values, marker="o", label=Path(run).name)
            if len(values) >= 3:  # 3-step running mean, the trend under per-step prompt noise
                smooth = [sum(values[max(0, i - 2): i + 1]) / len(values[max(0, i - 2): i + 1]) for i in range(len(values))]
                ax.plot(steps, smooth, linestyle="--", color="gray")
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
