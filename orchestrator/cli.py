"""`er-train [CONFIG.yaml] [key=value ...]`: GRPO with self-speculative rollouts.

Bad input (unknown key, bad value, missing file or model, broken YAML, a run_dir that cannot be one)
prints one `error:` line naming the key or file and exits 2 before anything is written or started; an
existing run is never written over. `resume=auto` continues the run in `run_dir` (or the newest run
under runs/ with a checkpoint) from its saved config.yaml plus any overrides, which are reported and
saved beside it; config.yaml itself always keeps the run's original config.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from er_sglang.config import (
    BAD_INPUT,
    ConfigError,
    load_config,
    reject_options,
    report_bad_input,
    schema_help,
    to_yaml,
)
from er_sglang.replay import refuse_in_training
from orchestrator.config import TrainConfig

USAGE = "usage: er-train [CONFIG.yaml] [key=value ...]   (resume=auto|PATH continues a run)"
RUNS = Path("runs")


@dataclass
class Plan:
    """What `er-train` will do, decided before anything is written or started."""

    cfg: TrainConfig
    run_dir: Path
    resume_from: Path | None = None  # checkpoint directory, None for a new run
    num_done_steps: int = 0  # steps the resumed checkpoint holds
    changes: list[str] = field(default_factory=list)  # "key: old -> new" against the run's config.yaml
    prompts: object = None  # PromptSource; None when the run is already complete

    @property
    def is_complete(self) -> bool:
        return self.resume_from is not None and self.num_done_steps >= self.cfg.train.num_steps


def prepare(argv: list[str]) -> Plan:
    """Validate everything that can be validated before anything is written; raises ConfigError or
    another BAD_INPUT exception whose message is one line naming the key or file."""
    from er_sglang.rollout import check_runnable
    from orchestrator import checkpoint
    from orchestrator.prompts import PromptSource

    reject_options(argv, USAGE)
    cfg = load_config(TrainConfig, argv)
    run_dir, resume_from = _pick_run(cfg)
    plan = Plan(cfg, run_dir, resume_from)
    if resume_from is not None:
        saved = run_dir / "config.yaml"
        if saved.is_file():  # the run's own config, then what this command line changes
            plan.cfg = load_config(TrainConfig, argv, base=saved)
            plan.changes = _config_changes(saved, plan.cfg)
        plan.num_done_steps = int(checkpoint.read_state(resume_from)["step"])
    plan.cfg.run_dir = str(run_dir)  # the saved config names its own directory
    if plan.is_complete:
        return plan
    check_runnable(plan.cfg)
    _check_gpus(plan.cfg.cluster)
    plan.prompts = PromptSource(plan.cfg)  # loads data and tokenizer: raises naming data.train / model.path
    plan.prompts.encode(plan.prompts.iterator.examples[:1])  # renders one prompt: raises naming data.template
    total = plan.cfg.data.prompts_per_step * plan.cfg.data.samples_per_prompt
    if plan.cfg.cluster.num_trainers > total:
        raise ConfigError(f"cluster.num_trainers: expected <= prompts x samples per step ({total})")
    return plan


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(schema_help(TrainConfig, USAGE))
        return 0
    try:
        refuse_in_training()
        plan = prepare(argv)
    except BAD_INPUT as exc:
        return report_bad_input(exc)
    if plan.is_complete:
        print(f"er-train: {plan.run_dir} is complete ({plan.num_done_steps} of {plan.cfg.train.num_steps} steps); "
              f"nothing to do (train.num_steps=N with N > {plan.num_done_steps} continues it)", flush=True)
        return 0
    _write_config(plan)
    where = f"resuming from {plan.resume_from}" if plan.resume_from else "new run"
    print(f"er-train: {where} in {plan.run_dir} (spec.mode={plan.cfg.spec.mode}, model={plan.cfg.model.path})",
          flush=True)
    return _train(plan)


def _train(plan: Plan) -> int:
    from orchestrator import checkpoint, tracker

    tracker.quiet_known_noise()
    # Ray calls this hook in ray.init: every worker then drops the same known noise at start.
    os.environ.setdefault("RAY_RUNTIME_ENV_HOOK", "orchestrator.tracker.quiet_ray_workers")
    from orchestrator.train import train

    code = train(plan.cfg, plan.run_dir, plan.resume_from, plan.prompts)
    logged = tracker.read_metrics(plan.run_dir / "metrics.jsonl")
    num_done = logged[-1]["step"] if logged else 0
    if code == 130 and num_done >= plan.cfg.train.num_steps:
        code = 0  # the interrupt landed during the last step, which then ran (and was saved): the run is done
    if code == 0:
        print(f"er-train: done in {plan.run_dir} (metrics.jsonl, checkpoints/)", flush=True)
    elif checkpoint.latest(plan.run_dir) is not None:
        print(f"er-train: stopped after step {num_done} of {plan.cfg.train.num_steps}; continue with: "
              f"er-train run_dir={plan.run_dir} resume=auto", flush=True)
    else:
        print(f"er-train: stopped after step {num_done} of {plan.cfg.train.num_steps} (no checkpoint to resume from)",
              flush=True)
    return code


def _pick_run(cfg) -> tuple[Path, Path | None]:
    """(run_dir, checkpoint to resume from or None). Never picks a directory that holds a run it would
    overwrite: a new run needs an empty or missing run_dir."""
    from orchestrator import checkpoint

    if cfg.resume and cfg.resume != "auto":
        ckpt = Path(cfg.resume)
        if not (ckpt / "state.json").is_file():
            raise ConfigError(f"resume: {cfg.resume} is not a complete checkpoint (no state.json)")
        run_dir = ckpt.parent.parent
        if cfg.run_dir and Path(cfg.run_dir).resolve() != run_dir.resolve():
            raise ConfigError(f"resume: {cfg.resume} is a checkpoint of {run_dir}, not of run_dir={cfg.run_dir}")
        return run_dir, ckpt
    if cfg.resume == "auto":
        run_dir = Path(cfg.run_dir) if cfg.run_dir else _newest_resumable_run()
        if run_dir is not None:
            _check_run_dir(run_dir)
            ckpt = checkpoint.latest(run_dir)
            if ckpt is not None:
                return run_dir, ckpt
            if _holds_run(run_dir):
                raise ConfigError(f"resume: {run_dir} holds a run without a complete checkpoint (its files are "
                                  f"kept); pass another run_dir, or remove it to start over")
            return run_dir, None
    run_dir = Path(cfg.run_dir) if cfg.run_dir else _default_run_dir(cfg)
    _check_run_dir(run_dir)
    if _holds_run(run_dir):
        raise ConfigError(f"run_dir: {run_dir} already holds a run; pass resume=auto or another run_dir")
    return run_dir, None


def _check_gpus(cluster) -> None:
    """A local Ray gets this machine's GPUs only; asking for more would hang in placement."""
    if cluster.num_gpus and not cluster.ray_address:
        import torch

        found = torch.cuda.device_count()
        if cluster.num_gpus > found:
            raise ConfigError(f"cluster.num_gpus: expected <= the {found} GPUs of this machine, got "
                              f"{cluster.num_gpus} (0 = CPU; cluster.ray_address joins a cluster)")


def _check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} is a file; expected a directory (new or holding a run)")
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"run_dir: cannot create {run_dir}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir: cannot create or write {run_dir}: {parent} is not writable")


def _holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.iterdir())


def _default_run_dir(cfg) -> Path:
    name = cfg.logging.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.spec.mode}"
    return RUNS / name


def _newest_resumable_run() -> Path | None:
    """The run under runs/ whose newest complete checkpoint is the newest (failed runs have none)."""
    from orchestrator import checkpoint

    latest = [c for c in (checkpoint.latest(d) for d in RUNS.glob("*/") if d.is_dir()) if c is not None]
    if not latest:
        print(f"er-train: resume=auto: no run under {RUNS}/ has a checkpoint; starting a new run", flush=True)
        return None
    newest = max(latest, key=lambda c: (c / "state.json").stat().st_mtime)
    print(f"er-train: resume=auto picked {newest.parent.parent} (the run with the newest checkpoint)", flush=True)
    return newest.parent.parent


def _config_changes(saved: Path, cfg) -> list[str]:
    """'key: old -> new' for every key whose value differs from the run's saved config.yaml."""
    before = _flat(OmegaConf.to_container(OmegaConf.load(saved)))
    after = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(before.keys() | after.keys())
            if k not in ("resume", "run_dir") and before.get(k) != after.get(k)]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "sglang":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _write_config(plan: Plan) -> None:
    """config.yaml = the run's config as it started; a resume that changes keys saves its own beside it."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    path = plan.run_dir / "config.yaml"
    if plan.changes:
        path = plan.run_dir / f"config.resume-step_{plan.num_done_steps:06d}.yaml"
        print(f"er-train: resuming with changes to {plan.run_dir / 'config.yaml'} (kept as it was; "
              f"this config -> {path.name}): " + "; ".join(plan.changes), flush=True)
    if plan.resume_from is None or plan.changes or not path.is_file():
        path.write_text(to_yaml(plan.cfg))


if __name__ == "__main__":
    sys.exit(main())
