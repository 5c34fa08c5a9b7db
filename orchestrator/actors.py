"""Ray actors: one FSDP2 trainer rank each, one RolloutEngine each, their placement, and restarts."""
from __future__ import annotations

import os
import signal
import socket
import time

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

# every process we start keeps NVLink multicast off (see the device README) and Ray on loopback
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "NCCL_CUMEM_ENABLE": "0", "TOKENIZERS_PARALLELISM": "false",
              "OMP_NUM_THREADS": os.environ.get("ER_OMP_THREADS", "1")}

# Test-only fault injection (docs/reliability.md): "kind@step,..." e.g. "engine_kill@2,trainer_kill@4".
# Only this variable arms a fault; the driver arms each one once, right before that step's rollout.
FAULT_ENV = "ER_TEST_INJECT_FAULTS"
FAULT_KINDS = ("engine_kill", "trainer_kill", "nan_loss", "bad_draft")


def planned_faults(text: str | None = None) -> dict[int, list[str]]:
    """{step: [kind, ...]} from $ER_TEST_INJECT_FAULTS (or `text`); {} when unset."""
    text = os.environ.get(FAULT_ENV, "") if text is None else text
    plan: dict[int, list[str]] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        kind, _, step = item.partition("@")
        if kind not in FAULT_KINDS or not step.isdigit():
            raise ValueError(f"{FAULT_ENV}: expected kind@step with kind in {FAULT_KINDS}, got {item!r}")
        plan.setdefault(int(step), []).append(kind)
    return plan


def _die() -> None:
    """What an OOM kill or a crashed node does to a worker: no cleanup, no exception."""
    os.kill(os.getpid(), signal.SIGKILL)


@ray.remote
class TrainerActor:
    """One FSDP2 rank: GRPO updates, full state dict for weight sync, sharded checkpoints."""

    def __init__(self, rank: int, world_size: int, master_port: int, kwargs: dict):
        import torch

        from orchestrator.trainer import FSDPTrainer, init_process_group

        torch.set_num_threads(int(WORKER_ENV["OMP_NUM_THREADS"]))
        init_process_group(rank, world_size, "127.0.0.1", master_port)
        self.trainer = FSDPTrainer(rank=rank, world_size=world_size, **kwargs)
        self.fault = ""

    def train_step(self, batch: dict) -> dict:
        fault, self.fault = self.fault, ""
        if fault == "trainer_kill":
            _die()  # the other ranks are left waiting in the step's first all-reduce
        if fault == "nan_loss":
            batch = dict(batch, advantages=batch["advantages"] * float("nan"))
        return self.trainer.train_step(batch)

    def arm_fault(self, kind: str) -> None:
        """Test-only (FAULT_ENV): the next train_step dies (trainer_kill) or sees NaN advantages (nan_loss)."""
        self.fault = kind

    def ping(self) -> bool:
        return True

    def local_state_dict(self):
        return self.trainer.local_state_dict()

    def weight_shapes(self):
        return self.trainer.weight_shapes()

    def weights_finite(self) -> bool:
        return self.trainer.weights_finite()

    def pack_bucket(self, index: int, names: list, dtype: str, transport: str, copies: int = 0):
        return self.trainer.pack_bucket(index, names, dtype, transport, copies)

    def release_bucket(self, index: int) -> None:
        self.trainer.release_bucket(index)

    def sent_probes(self, dtype: str, num_values: int) -> dict:
        return self.trainer.sent_probes(dtype, num_values)

    def save_checkpoint(self, path: str) -> None:
        self.trainer.save_checkpoint(path)

    def load_checkpoint(self, path: str) -> None:
        self.trainer.load_checkpoint(path)


@ray.remote
class RolloutActor:
    """Owns one RolloutEngine (reference on CPU, SGLang on a GPU)."""

    def __init__(self, cfg, index: int):
        import torch

        from er_sglang.rollout import make_engine

        torch.set_num_threads(int(os.environ.get("ER_ENGINE_THREADS", "2")))
        self.index = index
        self.engine = make_engine(cfg)
        self.fault = ""

    def generate(self, prompts, params):
        rollouts = self.engine.generate(prompts, params)
        if self.fault == "engine_kill":
            _die()  # the rollout is done but never returned: lost in flight
        return rollouts

    def arm_fault(self, kind: str) -> None:
        """Test-only (FAULT_ENV): engine_kill = die before the next generate returns; bad_draft = corrupt the
        drafter now (rows of every int4 linear reversed), as a sync that skipped or botched it would."""
        if kind == "bad_draft":
            import torch

            with torch.no_grad():
                for linear in self.engine.drafter.quantized_linears().values():
                    for t in linear.packed_tensors() + ([linear.w_hat] if hasattr(linear, "w_hat") else []):
                        t.copy_(t.flip(0))
        else:
            self.fault = kind

    def ping(self) -> bool:
        return True

    def draft_check(self) -> dict:
        return self.engine.draft_check()

    def requantize(self) -> float:
        return self.engine.requantize()

    def update_weights(self, state_dict) -> dict:
        return self.engine.update_weights(state_dict)

    def weights_dtype(self) -> str:
        return self.engine.weights_dtype()

    def tp_size(self) -> int:
        return int(getattr(self.engine, "tp_size", 1))

    def begin_weight_update(self, shapes: dict) -> None:
        self.engine.begin_weight_update(shapes)

    def load_weight_bucket(self, transport: str, parts: list, last: bool) -> dict:
        """One bucket (orchestrator/weight_transfer.py): object_store = every trainer rank's shard dict (refs,
        fetched here, joined in rank order); cuda_ipc = [ref to the colocated rank's IPC payloads]."""
        from orchestrator.weight_transfer import assemble_shards

        got = ray.get(parts)
        if transport == "cuda_ipc":
            return self.engine.load_weights_serialized(got[0], last)
        return self.engine.load_weights(list(assemble_shards(got).items()), last)

    def weights_checksum(self) -> str:
        return self.engine.weights_checksum()

    def weights_probe(self, shapes: dict, num_values: int) -> dict:
        return self.engine.weights_probe(shapes, num_values)

    def sleep(self) -> dict:
        """The engine's phase metrics (GPU memory awake/asleep, seconds); {} on CPU."""
        return self.engine.sleep() or {}

    def wake(self) -> dict:
        return self.engine.wake() or {}

    def stats(self, reset: bool = False):
        return self.engine.stats(reset)

    def end_rollout(self, num_drafted=None, num_accepted=None) -> dict | None:
        """Returns the policy state after the rollout: what a restarted engine is given back."""
        self.engine.end_rollout(num_drafted, num_accepted)
        return self.policy_state()

    def policy_state(self) -> dict | None:
        return self.engine.policy_state()  # SGLang's lives in its scheduler process: reached by RPC

    def load_policy_state(self, state: dict | None) -> None:
        self.engine.load_policy_state(state)


def start_ray(cluster_cfg) -> None:
    """Start (or join) Ray; a local Ray listens on 127.0.0.1 only and writes no auth token."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if ray.is_initialized():
        return
    if cluster_cfg.ray_address:
        ray.init(address=cluster_cfg.ray_address, runtime_env={"env_vars": WORKER_ENV})
        return
    ray.init(num_cpus=cluster_cfg.num_cpus or os.cpu_count(), num_gpus=cluster_cfg.num_gpus,
             include_dashboard=False, object_store_memory=1 << 30, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True, configure_logging=False)


class Cluster:
    """The run's trainer ranks and rollout engines in one placement group, and their restarts.

    colocated: bundle i holds trainer rank i and engine i (they share the device; engines sleep during
    training). split: trainers and engines get bundles of their own. On CPU the bundles are small
    fractional CPU reservations (the 2-core CI machine runs 2 trainers + 1 engine). An engine that dies
    is restarted by Ray (max_restarts; its in-flight call fails); trainer ranks are restarted together
    by `restart_trainers` (a process group cannot take a new member).
    """

    def __init__(self, cfg):
        c = self.c = cfg.cluster
        self.cfg, self.gpu = cfg, c.num_gpus > 0
        colocated = c.placement == "colocated"
        num_bundles = max(c.num_trainers, c.num_engines) if colocated else c.num_trainers + c.num_engines
        bundle = {"GPU": 1, "CPU": 1} if self.gpu else {"CPU": 0.1}
        self.pg = placement_group([dict(bundle) for _ in range(num_bundles)], strategy="PACK")
        ray.get(self.pg.ready())
        self.trainers = self._start_trainers()
        first = 0 if colocated else c.num_trainers
        self.engines = [RolloutActor.options(max_restarts=cfg.fault.max_engine_restarts, **self._resources(first + i))
                        .remote(cfg, i) for i in range(c.num_engines)]

    def _resources(self, bundle: int) -> dict:
        share = 0.5 if (self.gpu and self.c.placement == "colocated") else (1 if self.gpu else 0)
        strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=bundle)
        return {"num_cpus": 0.5 if self.gpu else 0.05, "num_gpus": share, "scheduling_strategy": strategy}

    def _start_trainers(self) -> list:
        kwargs, port = trainer_kwargs_from(self.cfg), free_port()
        return [TrainerActor.options(**self._resources(i)).remote(i, self.c.num_trainers, port, kwargs)
                for i in range(self.c.num_trainers)]

    def restart_trainers(self) -> None:
        """Kill every rank (a survivor may sit in a collective with the dead one) and start fresh ones
        (model weights from model.path) in the same bundles; `self.trainers` is updated in place."""
        for t in self.trainers:
            ray.kill(t, no_restart=True)
        self.trainers[:] = self._start_trainers()

    def dead_trainer(self, exc: Exception) -> int | None:
        """The rank behind a failed trainer call, if a rank died; None if every rank still answers."""
        ids = [t._actor_id.hex() for t in self.trainers]
        if isinstance(exc, RayActorError) and exc.actor_id in ids:
            return ids.index(exc.actor_id)
        pings = [t.ping.remote() for t in self.trainers]
        ray.wait(pings, num_returns=len(pings), timeout=10.0)  # a survivor stuck in a collective won't answer
        for rank, ref in enumerate(pings):
            try:
                ray.get(ref, timeout=0)
            except RayActorError:
                return rank
            except Exception:  # noqa: BLE001, S112 - busy (in a collective with the dead rank) or failing: alive
                continue
        return None

    def wait_engines(self, timeout_s: float = 900.0) -> None:
        """Block until every engine answers; one Ray is restarting (model load, drafter) is unavailable."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ray.get([e.ping.remote() for e in self.engines])
                return
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def dead_engine(self, exc: Exception) -> int | None:
        ids = [e._actor_id.hex() for e in self.engines]
        return ids.index(exc.actor_id) if isinstance(exc, RayActorError) and exc.actor_id in ids else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_kwargs_from(cfg) -> dict:
    from er_sglang.models import resolve_model_path

    t = cfg.train
    per_rank_mini = max(t.mini_batch_size // cfg.cluster.num_trainers, 1) if t.mini_batch_size else None
    return {"model_path": str(resolve_model_path(cfg.model.path)), "lr": t.lr, "weight_decay": t.weight_decay,
            "grad_clip": t.grad_clip, "kl_coef": t.kl_coef, "kl_type": t.kl_type, "entropy_coef": t.entropy_coef,
            "clip_low": t.clip_low, "clip_high": t.clip_high, "micro_batch_size": t.micro_batch_size,
            "mini_batch_size": per_rank_mini, "ppo_epochs": t.ppo_epochs, "use_ref_model": t.use_ref_model,
            "temperature": cfg.sampling.temperature or 1.0, "seed": cfg.seed,
            "device": "cuda" if cfg.cluster.num_gpus else "cpu",
            "activation_checkpointing": t.activation_checkpointing,
            "micro_batch_tokens": t.micro_batch_tokens, "logprob_chunk_tokens": t.logprob_chunk_tokens}
