"""`er-rollout [CONFIG] [key=value ...] [--out PATH]`: rollouts only, on any engine; prints one JSON line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from er_sglang.config import BAD_INPUT, ConfigError, RolloutJob, load_config, reject_options, report_bad_input

USAGE = "usage: er-rollout [CONFIG.yaml] [key=value ...] [--out PATH]"


def _split_out(argv: list[str]) -> tuple[list[str], str | None]:
    if "--out" not in argv:
        return argv, None
    i = argv.index("--out")
    if i + 1 >= len(argv):
        raise ConfigError("--out: expected a file path")
    return argv[:i] + argv[i + 2:], argv[i + 1]


def run(cfg: RolloutJob, progress: bool) -> dict:
    from er_sglang.data import load_dataset
    from er_sglang.engine import SamplingParams, make_engine
    from er_sglang.models import load_tokenizer, resolve_model_path
    from er_sglang.rollout import encode_prompts, summarize

    examples = load_dataset(cfg.data.train, size=cfg.data.size, seed=cfg.data.seed)[: cfg.data.prompts_per_step]
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.path))
    prompts = encode_prompts(examples, cfg.data.template, tokenizer, cfg.data.samples_per_prompt)
    engine = make_engine(cfg, progress=progress)
    params = SamplingParams(max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                            top_p=cfg.sampling.top_p, seed=cfg.seed)
    start = time.perf_counter()
    rollouts = engine.generate(prompts, params)
    wall_s = time.perf_counter() - start
    return summarize(cfg.spec.mode, rollouts, engine.stats(), wall_s)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        argv, out = _split_out(argv)
        reject_options(argv, USAGE)
        cfg = load_config(RolloutJob, argv)
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
