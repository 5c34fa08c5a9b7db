"""Per-step metrics: one JSON line per step in `run_dir/metrics.jsonl`, wandb, and a table row on stdout.

The jsonl file is the source of truth (sweeps and tests read it); wandb is best effort: a failing
`wandb.init` or `log` warns once on stderr and training goes on with the jsonl only. Every wandb file
(run files, config, cache, artifacts) goes under `run_dir/wandb`, never under `~`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import uuid
from pathlib import Path

# stdout columns: (header, metric key, format); the header is printed once, right-aligned to the widths.
COLUMNS = (
    ("step", "step", "{:d}"),
    ("reward", "train/reward_mean", "{:.3f}"),
    ("acc_rate", "spec/accept_rate", "{:.3f}"),
    ("acc_len", "spec/mean_accept_len", "{:.2f}"),
    ("gamma", "spec/gamma_mean", "{:.1f}"),
    ("sd_on", "spec/on_frac", "{:.2f}"),
    ("rollout_s", "timing/rollout_s", "{:.2f}"),
    ("train_s", "timing/train_s", "{:.2f}"),
    ("sync_s", "timing/sync_s", "{:.2f}"),
    ("requant_s", "spec/requant_s", "{:.3f}"),
)
COLUMN_WIDTHS = (5, 7, 8, 7, 5, 5, 9, 8, 7, 9)
TRACKER_MODES = ("auto", "online", "offline", "disabled")
# Harmless log lines that every process (driver and each Ray worker) would print: (logger, message regex).
# Matched in full so that any other warning of these loggers still shows.
KNOWN_NOISE = (
    # torchao's optional CUDA kernels, which a CPU-only torch cannot load (torchao works without them)
    ("torchao", r"Failed to load \S*torchao/_C\w*\S*\.so: "),
    # torch 2.13 deprecates torchao 0.17's register_constant() of its enums (torchao's code, not ours)
    ("torch.utils._pytree", (r"<enum '\w+'> is an Enum subclass and is now natively supported by torch\.compile "
                             r"as an opaque value type\. Calling register_constant\(\) on Enum subclasses is deprecated")),
)


class _DropKnownNoise(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_known_noise() -> None:
    """Drop the KNOWN_NOISE lines in this process (idempotent); Ray workers run it at start (below)."""
    for name, pattern in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise(pattern))


def quiet_ray_workers(runtime_env: dict | None) -> dict:
    """A RAY_RUNTIME_ENV_HOOK (er-train sets it): every Ray worker runs quiet_known_noise() before it
    imports torchao, and loads weights without progress bars (8 per job, one per process and model)."""
    env = dict(runtime_env or {})
    env.setdefault("worker_process_setup_hook", "orchestrator.tracker.quiet_known_noise")
    env["env_vars"] = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", **(env.get("env_vars") or {})}
    return env


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a metrics.jsonl as dicts; histogram keys come back as ints."""
    p = Path(path)
    if not p.is_file():
        return []
    return [_int_keys(json.loads(line)) for line in p.read_text().splitlines() if line.strip()]


def resolve_mode(mode: str) -> str:
    """auto: WANDB_MODE if set, else online iff WANDB_API_KEY is set, else offline."""
    if mode not in TRACKER_MODES:
        raise ValueError(f"logging.wandb: expected one of {TRACKER_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE", "")
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    """`log_step(step, metrics, samples, hists)` -> metrics.jsonl + samples.jsonl + wandb + stdout row.

    resume=True keeps the wandb run id (run_dir/wandb_id.txt) and, at the first logged step s, drops the
    lines with step >= s, so a run resumed from a checkpoint keeps one line per step. resume=False
    starts the files and the wandb run afresh.
    """

    def __init__(self, run_dir: str | Path, config_dict: dict, mode: str = "auto",
                 project: str = "efficient-rollout", name: str = "", tags: list | None = None,
                 resume: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self.mode = resolve_mode(mode)
        self.is_resume = resume
        self.is_header_printed = False
        self._is_truncated = False
        self._warned = False
        if not resume:
            for p in (self.metrics_path, self.samples_path):
                p.unlink(missing_ok=True)
        self.run = None
        if self.mode != "disabled":
            self.run = self._init_wandb(config_dict, project, name, list(tags or []))

    def _init_wandb(self, config_dict: dict, project: str, name: str, tags: list):
        wandb_dir = self.run_dir / "wandb"
        wandb_dir.mkdir(exist_ok=True)
        for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            os.environ[var] = str(wandb_dir)
        os.environ["WANDB_SILENT"] = "true"
        id_path = self.run_dir / "wandb_id.txt"
        try:
            import wandb

            # A wandb agent passes its run id in WANDB_RUN_ID; a resumed run keeps the stored one.
            run_id = id_path.read_text().strip() if self.is_resume and id_path.is_file() else ""
            run_id = run_id or os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:8]
            id_path.write_text(run_id + "\n")
            run = wandb.init(project=project, name=name or None, tags=tags, config=config_dict,
                             mode=self.mode, dir=str(self.run_dir), id=run_id, resume="allow")
            # x-axis = the training step, so steps re-logged after a resume are kept, not dropped.
            run.define_metric("step")
            run.define_metric("*", step_metric="step")
            return run
        except Exception as exc:  # noqa: BLE001 - no network, bad key, broken install: train on
            self._warn(f"wandb init failed ({_first_line(exc)})")
            return None

    def log_step(self, step: int, metrics: dict, samples: list[dict] | None = None,
                 hists: dict[str, dict[int, int]] | None = None) -> None:
        """metrics: {"section/name": number}; samples: [{prompt, response, reward, answer}];
        hists: {"spec/accept_len_hist": {value: count}}."""
        if self.is_resume and not self._is_truncated:
            _drop_steps_from(self.metrics_path, step)
            _drop_steps_from(self.samples_path, step)
        self._is_truncated = True
        metrics = {k: _plain(v) for k, v in metrics.items()}
        hists = {k: {int(b): int(c) for b, c in h.items()} for k, h in (hists or {}).items()}
        line = {"step": step, "time": round(time.time(), 3), **metrics, **hists}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        if samples:
            with self.samples_path.open("a") as f:
                for s in samples:
                    f.write(json.dumps({"step": step, **{k: _plain(v) for k, v in s.items()}}) + "\n")
        self._log_wandb(step, metrics, samples or [], hists)
        self._print_row(step, metrics)

    def _log_wandb(self, step: int, metrics: dict, samples: list[dict], hists: dict) -> None:
        if self.run is None:
            return
        try:
            import wandb

            data = {"step": step, **metrics}
            for key, hist in hists.items():
                if hist:
                    data[key] = wandb.Histogram(np_histogram=_np_histogram(hist))
            if samples:
                columns = list(dict.fromkeys(k for s in samples for k in s))
                data["rollout/samples"] = wandb.Table(
                    columns=columns, data=[[_plain(s.get(c)) for c in columns] for s in samples])
            self.run.log(data)
        except Exception as exc:  # noqa: BLE001 - a logging failure must not stop training
            self._warn(f"wandb log failed ({_first_line(exc)})")
            self.run = None

    def _print_row(self, step: int, metrics: dict) -> None:
        if not self.is_header_printed:
            print("  ".join(h.rjust(w) for (h, _, _), w in zip(COLUMNS, COLUMN_WIDTHS)), flush=True)
            self.is_header_printed = True
        values = {"step": step, **metrics}
        cells = [(fmt.format(values[key]) if isinstance(values.get(key), (int, float)) else "-").rjust(w)
                 for (_, key, fmt), w in zip(COLUMNS, COLUMN_WIDTHS)]
        print("  ".join(cells), flush=True)

    def _warn(self, what: str) -> None:
        if not self._warned:
            print(f"warning: {what}; logging to {self.metrics_path} only", file=sys.stderr, flush=True)
            self._warned = True

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as exc:  # noqa: BLE001 - same: best effort
                self._warn(f"wandb finish failed ({_first_line(exc)})")
            self.run = None


def _drop_steps_from(path: Path, step: int) -> None:
    """Keep only the lines with step < `step` (the ones before the resumed checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", -1) < step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _np_histogram(hist: dict[int, int]) -> tuple[list[int], list[float]]:
    """{value: count} -> (counts, bin edges) with one unit-wide bin per integer from min to max."""
    lo, hi = min(hist), max(hist)
    counts = [hist.get(v, 0) for v in range(lo, hi + 1)]
    return counts, [v - 0.5 for v in range(lo, hi + 2)]


def _plain(v):
    """numpy / torch scalars -> Python numbers, so json and wandb take them."""
    return v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v


def _int_keys(obj):
    if isinstance(obj, dict):
        if obj and all(isinstance(k, str) and k.lstrip("-").isdigit() for k in obj):
            return {int(k): _int_keys(v) for k, v in obj.items()}
        return {k: _int_keys(v) for k, v in obj.items()}
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
