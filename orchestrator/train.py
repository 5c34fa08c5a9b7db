"""The GRPO loop with lossless self-speculative rollouts; one screen, one `ray.get` per phase.

Faults (docs/reliability.md) cost at most the step in flight, and every step is logged once:
a rollout engine that dies is restarted by Ray and the phase it was in redone (`_Supervisor.engines`);
a trainer rank that dies brings every rank back from the last checkpoint (`_Supervisor.recover_trainers`);
an acceptance collapse checks the drafters (`_Supervisor.check_acceptance`); the trainer skips a NaN/inf
update. Beyond `fault.*` restarts the run stops with one `error:` line and the command that resumes it.
"""
from __future__ import annotations

import itertools
import signal
import sys
import time
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayTaskError

from er_sglang.engine import SamplingParams, SpecStats, request_seeds
from er_sglang.replay import refuse_in_training
from orchestrator import checkpoint
from orchestrator.actors import Cluster, planned_faults, start_ray
from orchestrator.batch import assign_groups, make_train_batches
from orchestrator.prompts import PromptSource
from orchestrator.reward import reward_fn
from orchestrator.tracker import Tracker
from orchestrator.weight_sync import WeightSync, WeightSyncError, check_drafts
from orchestrator.weight_transfer import resolve_transport


def train(cfg, run_dir: Path, resume_from: Path | None, prompts: PromptSource) -> int:
    """Run GRPO until train.num_steps; returns the exit code (0; 130 after Ctrl-C; 1 after a fault it
    could not absorb)."""
    refuse_in_training()  # also when train() is called without the CLI
    start_ray(cfg.cluster)
    sup = _Supervisor(cfg, run_dir, Cluster(cfg), prompts)
    step = sup.restore(resume_from) if resume_from is not None else 0
    tracker, stop = _tracker(cfg, run_dir, resume=step > 0), _StopFlag()
    try:
        while step < cfg.train.num_steps and not stop.is_set:
            try:
                _step(step + 1, cfg, sup, prompts, tracker)
                step += 1
                if cfg.checkpoint.keep and (stop.is_set or step == cfg.train.num_steps
                                            or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)):
                    checkpoint.save(run_dir, step, sup.cluster.trainers, sup.cluster.engines,
                                    prompts.state_dict(), cfg.checkpoint.keep)
            except (RayActorError, RayTaskError) as exc:
                step = sup.recover_trainers(exc, step + 1)  # re-raises unless a trainer rank died
                tracker.close()
                tracker = _tracker(cfg, run_dir, resume=True)  # drops the lines of the steps to redo
    except (_GiveUp, WeightSyncError) as exc:
        print(f"error: {exc}; resume with: {sup.resume_command()}", file=sys.stderr, flush=True)
        return 1
    finally:
        tracker.close()
        stop.restore()
    return 130 if stop.is_set else 0


def _step(step: int, cfg, sup: _Supervisor, prompts: PromptSource, tracker: Tracker) -> None:
    """generate -> reward -> advantages -> train -> sync -> log; a dead engine redoes only its phase."""
    trainers, engines, group = sup.cluster.trainers, sup.cluster.engines, cfg.data.samples_per_prompt
    sup.arm_faults(step)
    examples = prompts.next_batch()
    t0 = time.perf_counter()
    rollouts, spec = sup.engines(lambda: generate(engines, prompts.encode(examples), cfg, step))
    draft_checks = [sup.check_acceptance(step, spec)]
    t1 = time.perf_counter()
    rewards = [sup.reward(prompts.decode(r.output_ids), examples[r.prompt_index // group].answer) for r in rollouts]
    batches, _ = make_train_batches(rollouts, rewards, group, len(trainers), prompts.pad_id)
    slept = sup.engines(lambda: ray.get([e.sleep.remote() for e in engines]))
    train_metrics = ray.get([t.train_step.remote(b) for t, b in zip(trainers, batches)])[0]
    woken = sup.engines(lambda: ray.get([e.wake.remote() for e in engines]))
    phase_metrics = {**(slept or [{}])[0], **(woken or [{}])[0]}  # engine 0's GPU memory per phase (GPU only)
    t2 = time.perf_counter()
    sync_metrics = sup.engines(sup.sync.sync)
    draft_checks.append(sync_metrics.pop("spec/draft_ok", None))
    sup.policies = sup.engines(lambda: ray.get([e.end_rollout.remote(spec.num_drafted, spec.num_accepted)
                                                for e in engines]))
    if train_metrics["train/skipped_updates"]:
        print(f"warning: step {step}: non-finite loss or gradient; update skipped, weights untouched",
              file=sys.stderr, flush=True)
    metrics = {**train_metrics, **_rollout_metrics(rollouts, rewards, spec), **sync_metrics, **phase_metrics,
               **sup.counters(),
               "timing/rollout_s": t1 - t0, "timing/train_s": t2 - t1, "timing/step_s": time.perf_counter() - t0}
    if any(c is not None for c in draft_checks):  # 1.0: drafts checked and fine; 0.0: one was re-quantized
        metrics["spec/draft_ok"] = min(c for c in draft_checks if c is not None)
    tracker.log_step(step, metrics, samples=_samples(prompts, examples, rollouts, rewards, cfg),
                     hists={"spec/accept_len_hist": spec.accept_len_hist, "spec/gamma_hist": spec.gamma_hist})


class _GiveUp(RuntimeError):
    """More faults than fault.* allows: the run stops with one line."""


class _Supervisor:
    """Brings dead actors back and re-creates what they held; counts what it absorbed (fault/*)."""

    def __init__(self, cfg, run_dir: Path, cluster: Cluster, prompts: PromptSource):
        self.cfg, self.run_dir, self.cluster, self.prompts = cfg, Path(run_dir), cluster, prompts
        self.sync = WeightSync(cluster.trainers, cluster.engines, cfg.sync.verify_every,
                               resolve_transport(cfg), cfg.sync.bucket_mb)
        self.reward = reward_fn(cfg.reward)
        self.faults = planned_faults()
        self.initial_data = prompts.state_dict()
        self.policies = self.initial_policies = ray.get([e.policy_state.remote() for e in cluster.engines])
        self.num_engine_restarts = self.num_trainer_restarts = 0
        self.prev_accept_rate = 0.0

    def counters(self) -> dict:
        return {"fault/engine_restarts": self.num_engine_restarts, "fault/trainer_restarts": self.num_trainer_restarts}

    def resume_command(self) -> str:
        return f"er-train run_dir={self.run_dir} resume=auto"  # resume=auto reloads the run's config.yaml

    def restore(self, path: Path | None) -> int:
        """Trainers, data position and engine policies from checkpoint `path` (None: the run's start);
        then the engines get the trainers' weights. Returns the step to continue after."""
        engines = self.cluster.engines
        if path is not None:
            state = checkpoint.load(path, self.cluster.trainers, engines)
            step, data = state["step"], state["data"]
        else:
            step, data = 0, self.initial_data
            ray.get([e.load_policy_state.remote(p) for e, p in zip(engines, self.initial_policies)])
        self.prompts.load_state_dict(data)
        self._wake_engines()  # a trainer that died in train_step left them asleep
        self.sync.sync()  # the engines generate with the restored weights, drafters re-quantized from them
        ray.get([e.stats.remote(True) for e in engines])  # counts of an abandoned step are not this one's
        self.policies = ray.get([e.policy_state.remote() for e in engines])
        return step

    def engines(self, phase):
        """Run `phase` (engine calls); if an engine died, wait for Ray's restart, give it the trainers'
        weights (its drafter re-quantized) and every engine its policy state from before the step, redo."""
        for attempt in itertools.count():
            try:
                if attempt:
                    self._revive_engines()
                return phase()
            except RayActorError as exc:
                index = self.cluster.dead_engine(exc)
                if index is None:
                    raise
                self.num_engine_restarts += 1
                if self.num_engine_restarts > self.cfg.fault.max_engine_restarts:
                    raise _GiveUp(f"rollout engine {index} died ({_first_line(exc)}) after "
                                  f"fault.max_engine_restarts={self.cfg.fault.max_engine_restarts} restarts") from None
                print(f"warning: rollout engine {index} died; restarting it, re-syncing weights, redoing the phase",
                      file=sys.stderr, flush=True)

    def _revive_engines(self) -> None:
        engines = self.cluster.engines
        self.cluster.wait_engines()  # Ray restarts the dead one (max_restarts = fault.max_engine_restarts)
        self._wake_engines()  # the survivors may be asleep (the restarted one starts awake)
        self.sync.sync()
        ray.get([e.load_policy_state.remote(p) for e, p in zip(engines, self.policies)])
        ray.get([e.stats.remote(True) for e in engines])  # the lost attempt's counts

    def _wake_engines(self) -> None:
        """Weights are written only into awake engines (asleep, a GPU engine's weights are unmapped); waking
        an awake engine is a no-op."""
        ray.get([e.wake.remote() for e in self.cluster.engines])

    def recover_trainers(self, exc: Exception, step: int) -> int:
        """A trainer call failed in `step`: if a rank died, restart every rank from the newest checkpoint
        (the run's start without one) and return the step to continue after; else re-raise."""
        rank = self.cluster.dead_trainer(exc)
        if rank is None:
            raise exc
        self.num_trainer_restarts += 1
        limit = self.cfg.fault.max_trainer_restarts
        if self.num_trainer_restarts > limit:
            raise _GiveUp(f"trainer rank {rank} died in step {step} ({_first_line(exc)}) after "
                          f"fault.max_trainer_restarts={limit} restarts") from None
        path = checkpoint.latest(self.run_dir) if self.cfg.checkpoint.keep else None
        print(f"warning: trainer rank {rank} died in step {step}; restarting every rank from "
              f"{path or 'the start of the run (no checkpoint)'}", file=sys.stderr, flush=True)
        self.cluster.restart_trainers()
        return self.restore(path)

    def check_acceptance(self, step: int, spec: SpecStats) -> float | None:
        """Acceptance far below the previous rollout's (< fault.accept_collapse_ratio x) checks every
        drafter against a fresh quantization (re-quantizing a bad one): 1.0 fine, 0.0 repaired, None
        not checked."""
        prev, ratio = self.prev_accept_rate, self.cfg.fault.accept_collapse_ratio
        if not spec.num_drafted:
            return None
        if not (prev and spec.accept_rate < ratio * prev):
            self.prev_accept_rate = spec.accept_rate
            return None
        is_ok = self.engines(lambda: check_drafts(self.cluster.engines))
        if is_ok:
            self.prev_accept_rate = spec.accept_rate  # the drafts are right: the policy itself moved
        print(f"warning: step {step}: acceptance {spec.accept_rate:.3f} < {ratio} x the previous rollout's "
              f"{prev:.3f}; " + ("drafts match their targets" if is_ok else "a bad draft was re-quantized"),
              file=sys.stderr, flush=True)
        return is_ok

    def arm_faults(self, step: int) -> None:
        """Test-only: arm the faults $ER_TEST_INJECT_FAULTS plans for this step, each once per run."""
        c = self.cluster
        targets = {"engine_kill": c.engines[0], "bad_draft": c.engines[0], "trainer_kill": c.trainers[-1],
                   "nan_loss": c.trainers[0]}
        ray.get([targets[kind].arm_fault.remote(kind) for kind in self.faults.pop(step, [])])


def generate(engines: list, prompt_ids: list[list[int]], cfg, step: int) -> tuple[list, SpecStats]:
    """All G samples of a prompt go to one engine (groups balanced by prompt length); one ray.get."""
    group = cfg.data.samples_per_prompt
    num_groups = len(prompt_ids) // group
    buckets = assign_groups([len(prompt_ids[g * group]) for g in range(num_groups)], len(engines))
    seeds = request_seeds(cfg.seed, step, num_groups, group)  # per request, whichever engine serves it
    calls = []
    for e, groups in enumerate(buckets):
        index = [g * group + k for g in groups for k in range(group)]
        params = SamplingParams(max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                                top_p=cfg.sampling.top_p, seeds=[seeds[i] for i in index])
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


def _tracker(cfg, run_dir: Path, resume: bool) -> Tracker:
    return Tracker(run_dir, _config_dict(cfg), mode=cfg.logging.wandb, project=cfg.logging.project,
                   name=cfg.logging.name or run_dir.name, tags=list(cfg.logging.tags), resume=resume)


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _config_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


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
