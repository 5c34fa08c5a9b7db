"""`er-rollout [CONFIG] [key=value ...] [--out PATH]`: rollouts only, on any engine; prints one JSON line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from er_sglang.config import (
    BAD_INPUT,
    ConfigError,
    RolloutJob,
    foreign_keys,
    load_config,
    reject_options,
    report_bad_input,
    schema_help,
)

USAGE = "usage: er-rollout [CONFIG.yaml] [key=value ...] [--out PATH]"


def _split_out(argv: list[str]) -> tuple[list[str], str | None]:
    if "--out" not in argv:
        return argv, None
    i = argv.index("--out")
    if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
        raise ConfigError("--out: expected a file path")
    out = Path(argv[i + 1])
    if out.is_dir():
        raise ConfigError(f"--out: {out} is a directory; expected a file path")
    parent = next(p for p in out.parents if p.exists())  # checked now: the rollout may take minutes
    if not parent.is_dir():
        raise ConfigError(f"--out: cannot create {out}: {parent} is a file")
    return argv[:i] + argv[i + 2:], str(out)


def _load(argv: list[str]) -> RolloutJob:
    """An er-train experiment file works too: its training sections (train, cluster, reward, ...) are
    left out, with a note naming them; keys under the rollout sections are still checked."""
    files = [a for a in argv if "=" not in a]
    ignored = foreign_keys(RolloutJob, files[0]) if len(files) == 1 else []
    cfg = load_config(RolloutJob, argv, ignore=tuple(ignored))
    if ignored:
        print(f"er-rollout: using the rollout part of {files[0]} (leaving out {', '.join(ignored)})",
              file=sys.stderr)
    return cfg


def run(cfg: RolloutJob, progress: bool) -> dict:
    from er_sglang.data import first_batch, load_dataset
    from er_sglang.engine import SamplingParams, request_seeds
    from er_sglang.models import load_tokenizer, resolve_model_path
    from er_sglang.rollout import check_runnable, encode_prompts, make_engine, summarize

    check_runnable(cfg)
    examples = first_batch(load_dataset(cfg.data.train, size=cfg.data.size, seed=cfg.data.seed),
                           cfg.data.prompts_per_step, cfg.data.seed)  # er-train's step-1 prompts
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.path))
    prompts = encode_prompts(examples, cfg.data.template, tokenizer, cfg.data.samples_per_prompt)
    engine = make_engine(cfg, progress=progress)
    group = cfg.data.samples_per_prompt
    seeds = request_seeds(cfg.seed, 0, len(prompts) // group, group)  # step 0: er-train counts from 1
    params = SamplingParams(max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                            top_p=cfg.sampling.top_p, seeds=seeds)
    start = time.perf_counter()
    rollouts = engine.generate(prompts, params)
    wall_s = time.perf_counter() - start
    return summarize(cfg.spec.mode, rollouts, engine.stats(), wall_s)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(schema_help(RolloutJob, USAGE))
        return 0
    try:
        argv, out = _split_out(argv)
        reject_options(argv, USAGE)
        cfg = _load(argv)
        summary = run(cfg, progress=sys.stderr.isatty())
    except BAD_INPUT as exc:
        return report_bad_input(exc)
    line = json.dumps(summary)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
