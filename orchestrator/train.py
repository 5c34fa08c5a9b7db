"""The GRPO loop with lossless self-speculative rollouts; one screen, one `ray.get` per phase."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import ray

from er_sglang.engine import SamplingParams, SpecStats
from orchestrator import checkpoint
from orchestrator.actors import place_actors, start_ray
from orchestrator.batch import assign_groups, make_train_batches
from orchestrator.prompts import PromptSource
from orchestrator.reward import reward_fn
from orchestrator.tracker import Tracker
from orchestrator.weight_sync import WeightSync


def train(cfg, run_dir: Path, resume_from: Path | None, prompts: PromptSource) -> int:
    """Run GRPO until train.num_steps; returns the exit code (0, or 130 after Ctrl-C and a checkpoint)."""
    start_ray(cfg.cluster)
    trainers, engines = place_actors(cfg, _free_port())
    sync = WeightSync(trainers, engines, cfg.sync.verify_every)
    step = 0
    if resume_from is not None:
        state = checkpoint.load(resume_from, trainers, engines)
        step = state["step"]
        prompts.load_state_dict(state["data"])
        sync.sync()  # the engines generate with the restored weights
    tracker = Tracker(run_dir, _config_dict(cfg), mode=cfg.logging.wandb, project=cfg.logging.project,
                      name=cfg.logging.name or run_dir.name, tags=list(cfg.logging.tags), resume=step > 0)
    reward, group = reward_fn(cfg.reward), cfg.data.samples_per_prompt
    stop = _StopFlag()
    try:
        while step < cfg.train.num_steps and not stop.is_set:
            examples = prompts.next_batch()
            t0 = time.perf_counter()
            rollouts, spec = generate(engines, prompts.encode(examples), cfg, step)
            t1 = time.perf_counter()
            rewards = [reward(prompts.decode(r.output_ids), examples[r.prompt_index // group].answer)
                       for r in rollouts]
            batches, _ = make_train_batches(rollouts, rewards, cfg.data.samples_per_prompt,
                                                     len(trainers), prompts.pad_id)
            ray.get([e.sleep.remote() for e in engines])
            train_metrics = ray.get([t.train_step.remote(b) for t, b in zip(trainers, batches)])[0]
            ray.get([e.wake.remote() for e in engines])
            t2 = time.perf_counter()
            sync_metrics = sync.sync()
            ray.get([e.end_rollout.remote(spec.num_drafted, spec.num_accepted) for e in engines])
            step += 1
            metrics = {**train_metrics, **_rollout_metrics(rollouts, rewards, spec), **sync_metrics,
                       "timing/rollout_s": t1 - t0, "timing/train_s": t2 - t1,
                       "timing/step_s": time.perf_counter() - t0}
            tracker.log_step(step, metrics, samples=_samples(prompts, examples, rollouts, rewards, cfg),
                             hists={"spec/accept_len_hist": spec.accept_len_hist, "spec/gamma_hist": spec.gamma_hist})
            if stop.is_set or step == cfg.train.num_steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                checkpoint.save(run_dir, step, trainers, engines, prompts.state_dict(), cfg.checkpoint.keep)
    finally:
        tracker.close()
        stop.restore()
    return 130 if stop.is_set else 0


def generate(engines: list, prompt_ids: list[list[int]], cfg, step: int) -> tuple[list, SpecStats]:
    """All G samples of a prompt go to one engine (groups balanced by prompt length); one ray.get."""
    group = cfg.data.samples_per_prompt
    num_groups = len(prompt_ids) // group
    buckets = assign_groups([len(prompt_ids[g * group]) for g in range(num_groups)], len(engines))
    calls = []
    for e, groups in enumerate(buckets):
        index = [g * group + k for g in groups for k in range(group)]
        params = SamplingParams(max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                                top_p=cfg.sampling.top_p, seed=cfg.seed * 1_000_003 + step * 101 + e)
        calls.append((index, engines[e].generate.remote([prompt_ids[i] for i in index], params)))
    rollouts = [None] * len(prompt_ids)
    for index, outs in zip([i for i, _ in calls], ray.get([c for _, c in calls])):
        for i, r in zip(index, outs):
            r.prompt_index = i
            rollouts[i] = r
    stats = SpecStats()
    for s in ray.get([e.stats.remote(True) for e in engines]):
        stats = stats.merge(s)
    return rollouts, stats


def _rollout_metrics(rollouts, rewards, spec: SpecStats) -> dict:
    lengths = [len(r.output_ids) for r in rollouts]
    steps = sum(spec.gamma_hist.values())
    return {**spec.as_metrics(),
            "train/reward_mean": sum(rewards) / len(rewards),
            "rollout/response_len_mean": sum(lengths) / len(lengths), "rollout/response_len_max": max(lengths),
            "rollout/num_tokens": sum(lengths),
            "rollout/truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
            "spec/gamma_mean": sum(g * n for g, n in spec.gamma_hist.items()) / steps if steps else 0.0}


def _samples(prompts, examples, rollouts, rewards, cfg) -> list[dict]:
    picks = range(0, len(rollouts), max(1, len(rollouts) // max(cfg.logging.num_samples, 1)))
    return [{"prompt": examples[rollouts[i].prompt_index // cfg.data.samples_per_prompt].prompt,
             "response": prompts.decode(rollouts[i].output_ids), "reward": rewards[i],
             "answer": examples[rollouts[i].prompt_index // cfg.data.samples_per_prompt].answer}
            for i in list(picks)[: cfg.logging.num_samples]]


def _config_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _StopFlag:
    """Ctrl-C (SIGINT/SIGTERM) ends the current step, saves a checkpoint, and exits cleanly."""

    def __init__(self):
        self.is_set = False
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.is_set:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.is_set = True
        print("\ninterrupt: finishing this step, saving a checkpoint, then exiting", flush=True)

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
