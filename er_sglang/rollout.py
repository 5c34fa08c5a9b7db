"""Glue shared by `er-rollout` and `er-train`: config -> engine, prompts -> token ids, rollouts -> a summary."""
from __future__ import annotations

from collections import Counter

from er_sglang.engine import Rollout, RolloutEngine, SpecStats


def encode_prompts(examples, template: str, tokenizer, samples_per_prompt: int) -> list[list[int]]:
    """Render each example with the template and repeat it G times (the G samples stay adjacent)."""
    from er_sglang.data import render_prompt

    ids = [tokenizer(render_prompt(ex, template, tokenizer), add_special_tokens=False)["input_ids"]
           for ex in examples]
    return [p for p in ids for _ in range(samples_per_prompt)]


def summarize(mode: str, rollouts: list[Rollout], stats: SpecStats, wall_s: float) -> dict:
    """The er-rollout summary: throughput, acceptance and the gamma histogram of one rollout."""
    num_tokens = sum(len(r.output_ids) for r in rollouts)
    lengths = sorted(len(r.output_ids) for r in rollouts)
    return {
        "mode": mode,
        "num_sequences": len(rollouts),
        "num_tokens": num_tokens,
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(num_tokens / wall_s, 2) if wall_s > 0 else 0.0,
        "accept_rate": round(stats.accept_rate, 4),
        "mean_accept_len": round(stats.mean_accept_len, 4),
        "spec_on_frac": round(stats.spec_on_frac, 4),
        "gamma_hist": {str(k): v for k, v in sorted(stats.gamma_hist.items())},
        "accept_len_hist": {str(k): v for k, v in sorted(stats.accept_len_hist.items())},
        "num_decode_steps": stats.num_steps,
        "max_len": lengths[-1] if lengths else 0,
        "median_len": lengths[len(lengths) // 2] if lengths else 0,
        "finish_reasons": dict(Counter(r.finish_reason for r in rollouts)),
    }


def check_runnable(cfg) -> None:
    """Raise ConfigError (one line) when cfg.engine's backend is not installed, before anything starts."""
    import importlib.util

    from er_sglang.config import ConfigError

    if cfg.engine == "sglang" and importlib.util.find_spec("sglang") is None:
        raise ConfigError("engine: sglang needs SGLang 0.5.17 (pip install -e '.[gpu]' on a GPU machine); "
                          "engine=reference runs on CPU")
    cluster, sglang_args = getattr(cfg, "cluster", None), getattr(cfg, "sglang", None) or {}
    if (cfg.engine == "sglang" and getattr(cluster, "placement", None) == "colocated"
            and "enable_memory_saver" not in sglang_args and importlib.util.find_spec("torch_memory_saver") is None):
        # without it the engine's sleep() frees no GPU memory, and training beside it runs out of memory
        raise ConfigError("cluster.placement: colocated with engine=sglang needs torch_memory_saver (pip install "
                          "torch_memory_saver==0.0.10) so that the engine's sleep frees GPU memory for training; "
                          "or set sglang.enable_memory_saver=false to train beside an engine that keeps its memory")


def make_engine(cfg, progress: bool = False) -> RolloutEngine:
    """Build the engine named by cfg.engine ("reference" or "sglang") from a RolloutJob config."""
    if cfg.engine == "reference":
        from er_sglang.reference import ReferenceEngine

        return ReferenceEngine.from_config(cfg, progress=progress)
    if cfg.engine == "sglang":
        from er_sglang.sglang.engine import SGLangEngine

        return SGLangEngine.from_config(cfg)
    raise ValueError(f"engine: expected 'reference' or 'sglang', got {cfg.engine!r}")
