"""`er-train [CONFIG.yaml] [key=value ...]`: GRPO with self-speculative rollouts.

Bad input (unknown key, bad value, missing file or model, broken YAML) prints one `error:` line naming
the key or file and exits 2 before anything is written; an existing run is never written over unless
`resume=` asks to continue it.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from er_sglang.config import BAD_INPUT, ConfigError, load_config, reject_options, report_bad_input, to_yaml
from orchestrator.config import TrainConfig

USAGE = "usage: er-train [CONFIG.yaml] [key=value ...]   (resume=auto|PATH continues a run)"


def prepare(argv: list[str]):
    """Validate everything cheap to validate before anything is written.

    Returns (config, run_dir, checkpoint to resume from or None, the run's PromptSource).
    """
    from orchestrator import checkpoint
    from orchestrator.prompts import PromptSource

    reject_options(argv, USAGE)
    cfg = load_config(TrainConfig, argv)
    prompts = PromptSource(cfg)  # loads the data and the tokenizer: raises naming data.train / model.path
    total = cfg.data.prompts_per_step * cfg.data.samples_per_prompt
    if cfg.cluster.num_trainers > total:
        raise ConfigError(f"cluster.num_trainers: expected <= prompts x samples per step ({total})")
    resume_from = None
    if cfg.resume:
        if cfg.resume == "auto":
            run_dir = Path(cfg.run_dir) if cfg.run_dir else _newest_run()
            resume_from = checkpoint.latest(run_dir) if run_dir else None
            if resume_from is None:  # nothing to resume: start this run fresh
                run_dir = run_dir or _default_run_dir(cfg)
        else:
            resume_from = Path(cfg.resume)
            if not (resume_from / "state.json").is_file():
                raise ConfigError(f"resume: {cfg.resume} is not a complete checkpoint (no state.json)")
            run_dir = resume_from.parent.parent
    else:
        run_dir = Path(cfg.run_dir) if cfg.run_dir else _default_run_dir(cfg)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"run_dir: {run_dir} already holds a run; pass resume=auto or another run_dir")
    return cfg, run_dir, resume_from, prompts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        cfg, run_dir, resume_from, prompts = prepare(argv)
    except BAD_INPUT as exc:
        return report_bad_input(exc)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    where = f"resuming from {resume_from}" if resume_from else "new run"
    print(f"er-train: {where} in {run_dir} (spec.mode={cfg.spec.mode}, model={cfg.model.path})", flush=True)
    from orchestrator.train import train

    code = train(cfg, run_dir, resume_from, prompts)
    print(f"er-train: done in {run_dir} (metrics.jsonl, checkpoints/)", flush=True)
    return code


def _default_run_dir(cfg) -> Path:
    name = cfg.logging.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.spec.mode}"
    return Path("runs") / name


def _newest_run() -> Path | None:
    runs = sorted(Path("runs").glob("*/config.yaml"), key=lambda p: p.stat().st_mtime) if Path("runs").is_dir() else []
    return runs[-1].parent if runs else None


if __name__ == "__main__":
    sys.exit(main())
