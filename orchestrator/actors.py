"""Ray actors: one FSDP2 trainer rank each, one RolloutEngine each, and their placement."""
from __future__ import annotations

import os

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

# every process we start keeps NVLink multicast off (see the device README) and Ray on loopback
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "NCCL_CUMEM_ENABLE": "0", "TOKENIZERS_PARALLELISM": "false",
              "OMP_NUM_THREADS": os.environ.get("ER_OMP_THREADS", "1")}


@ray.remote
class TrainerActor:
    """One FSDP2 rank: GRPO updates, full state dict for weight sync, sharded checkpoints."""

    def __init__(self, rank: int, world_size: int, master_port: int, kwargs: dict):
        import torch

        from orchestrator.trainer import FSDPTrainer, init_process_group

        torch.set_num_threads(int(WORKER_ENV["OMP_NUM_THREADS"]))
        init_process_group(rank, world_size, "127.0.0.1", master_port)
        self.trainer = FSDPTrainer(rank=rank, world_size=world_size, **kwargs)

    def train_step(self, batch: dict) -> dict:
        return self.trainer.train_step(batch)

    def local_state_dict(self):
        return self.trainer.local_state_dict()

    def save_checkpoint(self, path: str) -> None:
        self.trainer.save_checkpoint(path)

    def load_checkpoint(self, path: str) -> None:
        self.trainer.load_checkpoint(path)


@ray.remote
class RolloutActor:
    """Owns one RolloutEngine (reference on CPU, SGLang on a GPU)."""

    def __init__(self, cfg, index: int):
        import torch

        from er_sglang.engine import make_engine

        torch.set_num_threads(int(os.environ.get("ER_ENGINE_THREADS", "2")))
        self.index = index
        self.engine = make_engine(cfg)

    def generate(self, prompts, params):
        return self.engine.generate(prompts, params)

    def update_weights(self, state_dict) -> dict:
        return self.engine.update_weights(state_dict)

    def weights_checksum(self) -> str:
        return self.engine.weights_checksum()

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def stats(self, reset: bool = False):
        return self.engine.stats(reset)

    def end_rollout(self, num_drafted=None, num_accepted=None) -> None:
        self.engine.end_rollout(num_drafted, num_accepted)

    def policy_state(self) -> dict:
        return self.engine.policy.state_dict()

    def load_policy_state(self, state: dict) -> None:
        self.engine.policy.load_state_dict(state)


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


def place_actors(cfg, master_port: int) -> tuple[list, list]:
    """Create trainer and engine actors in one placement group.

    colocated: bundle i holds trainer rank i and engine i (they share the device; engines sleep during
    training). split: trainers and engines get bundles of their own. On CPU the bundles are small
    fractional CPU reservations (the 2-core CI machine runs 2 trainers + 1 engine).
    """
    c = cfg.cluster
    gpu = c.num_gpus > 0
    num_bundles = max(c.num_trainers, c.num_engines) if c.placement == "colocated" else c.num_trainers + c.num_engines
    bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 0.1}
    pg = placement_group([dict(bundle) for _ in range(num_bundles)], strategy="PACK")
    ray.get(pg.ready())
    share = 0.5 if (gpu and c.placement == "colocated") else (1 if gpu else 0)
    cpu = 0.05 if not gpu else 0.5

    def strategy(i):
        return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)

    trainer_kwargs = trainer_kwargs_from(cfg)
    trainers = [TrainerActor.options(num_cpus=cpu, num_gpus=share, scheduling_strategy=strategy(i))
                .remote(i, c.num_trainers, master_port, trainer_kwargs) for i in range(c.num_trainers)]
    first_engine_bundle = 0 if c.placement == "colocated" else c.num_trainers
    engines = [RolloutActor.options(num_cpus=cpu, num_gpus=share, scheduling_strategy=strategy(first_engine_bundle + i))
               .remote(cfg, i) for i in range(c.num_engines)]
    return trainers, engines


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
            "activation_checkpointing": t.activation_checkpointing}
