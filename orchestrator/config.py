"""The `er-train` experiment schema: the rollout job plus training, cluster, logging and checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, field

from er_sglang.config import ConfigError, RolloutJob, _require
from orchestrator.weight_transfer import TRANSPORTS, ipc_reason

PLACEMENTS = ("colocated", "split")
KL_TYPES = ("low_var_kl", "kl", "mse")
WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class TrainSection:
    num_steps: int = 10
    lr: float = 2e-5  # the default CPU job (135M); the 7-14B experiment files set the paper's 5e-7
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mini_batch_size: int = 0  # sequences per optimizer step; 0 = the whole rollout batch
    micro_batch_size: int = 16  # sequences per rank per forward/backward (gradient accumulation)
    micro_batch_tokens: int = 0  # > 0: micro-batches of <= this many padded tokens (sequences x longest), sorted
    logprob_chunk_tokens: int = 1024  # positions whose logits [chunk, vocab] exist at once (0 = a micro-batch's)
    ppo_epochs: int = 1
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0  # default CPU job: no reference model (it would cost 1/4 of the train step);
    # experiment files: 1e-4 (Qwen) / 1e-2 (Llama) with the reference model, as in the paper
    kl_type: str = "low_var_kl"
    use_ref_model: bool = True
    entropy_coef: float = 0.0
    activation_checkpointing: bool = False

    def __post_init__(self):
        _require(self.num_steps >= 1, "train.num_steps", "an int >= 1", self.num_steps)
        _require(self.lr > 0, "train.lr", "a float > 0", self.lr)
        _require(self.mini_batch_size >= 0, "train.mini_batch_size", "an int >= 0", self.mini_batch_size)
        _require(self.micro_batch_size >= 1, "train.micro_batch_size", "an int >= 1", self.micro_batch_size)
        _require(self.micro_batch_tokens >= 0, "train.micro_batch_tokens", "an int >= 0 (0 = by micro_batch_size)",
                 self.micro_batch_tokens)
        _require(self.logprob_chunk_tokens >= 0, "train.logprob_chunk_tokens", "an int >= 0 (0 = no chunks)",
                 self.logprob_chunk_tokens)
        _require(self.ppo_epochs >= 1, "train.ppo_epochs", "an int >= 1", self.ppo_epochs)
        _require(self.kl_type in KL_TYPES, "train.kl_type", f"one of {KL_TYPES}", self.kl_type)
        _require(self.kl_coef >= 0, "train.kl_coef", "a float >= 0", self.kl_coef)
        _require(0 <= self.clip_low < 1 and self.clip_high >= 0, "train.clip_low/clip_high",
                 "0 <= clip_low < 1 and clip_high >= 0", (self.clip_low, self.clip_high))


@dataclass
class ClusterSection:
    num_gpus: int = 0  # 0: CPU (gloo); N: N GPUs, FSDP over all of them (NCCL)
    num_trainers: int = 2  # FSDP ranks (on GPUs: = num_gpus)
    num_engines: int = 1  # rollout engines (on GPUs colocated: one per GPU)
    placement: str = "colocated"  # colocated: train and rollout share devices, engines sleep during training
    ray_address: str = ""  # "" = start a local Ray bound to 127.0.0.1
    num_cpus: int = 0  # CPUs given to Ray; 0 = all

    def __post_init__(self):
        _require(self.num_gpus >= 0, "cluster.num_gpus", "an int >= 0", self.num_gpus)
        _require(self.num_trainers >= 1, "cluster.num_trainers", "an int >= 1", self.num_trainers)
        _require(self.num_engines >= 1, "cluster.num_engines", "an int >= 1", self.num_engines)
        _require(self.placement in PLACEMENTS, "cluster.placement", f"one of {PLACEMENTS}", self.placement)
        if self.num_gpus and self.placement == "colocated":
            _require(self.num_trainers == self.num_gpus, "cluster.num_trainers",
                     f"= cluster.num_gpus ({self.num_gpus}) when colocated", self.num_trainers)


@dataclass
class LoggingSection:
    wandb: str = "auto"  # auto: online when WANDB_API_KEY is set, else offline
    project: str = "efficient-rollout"
    name: str = ""
    tags: list[str] = field(default_factory=list)
    num_samples: int = 4  # rollout samples logged per step (wandb table + samples.jsonl)

    def __post_init__(self):
        _require(self.wandb in WANDB_MODES, "logging.wandb", f"one of {WANDB_MODES}", self.wandb)


@dataclass
class CheckpointSection:
    every: int = 5  # save every N steps (and at the end, and on Ctrl-C); 0 = only at the end
    keep: int = 2  # newest checkpoints kept on disk; 0 = write none (sweeps: a 135M run's is ~1.6 GB)

    def __post_init__(self):
        _require(self.every >= 0, "checkpoint.every", "an int >= 0", self.every)
        _require(self.keep >= 0, "checkpoint.keep", "an int >= 0 (0 = no checkpoints)", self.keep)


@dataclass
class FaultSection:
    """What a run survives before it stops (docs/reliability.md)."""

    max_engine_restarts: int = 3  # rollout-engine deaths per run: Ray restarts it, the rollout is redone
    max_trainer_restarts: int = 2  # trainer-rank deaths per run: all ranks restart from the last checkpoint
    accept_collapse_ratio: float = 0.5  # acceptance < ratio x the previous rollout's: check the drafts

    def __post_init__(self):
        _require(self.max_engine_restarts >= 0, "fault.max_engine_restarts", "an int >= 0",
                 self.max_engine_restarts)
        _require(self.max_trainer_restarts >= 0, "fault.max_trainer_restarts", "an int >= 0",
                 self.max_trainer_restarts)
        _require(0 <= self.accept_collapse_ratio < 1, "fault.accept_collapse_ratio",
                 "a float in [0, 1) (0 = never check on acceptance)", self.accept_collapse_ratio)


@dataclass
class SyncSection:
    verify_every: int = 5  # check every N syncs that engines hold the sent weights exactly (0 = never)
    transport: str = "auto"  # object_store | cuda_ipc (colocated GPUs, sglang) | auto (orchestrator/weight_transfer.py)
    bucket_mb: float = 512.0  # weights per bucket, in the engines' dtype (a larger tensor goes alone)

    def __post_init__(self):
        _require(self.verify_every >= 0, "sync.verify_every", "an int >= 0", self.verify_every)
        _require(self.transport in TRANSPORTS, "sync.transport", f"one of {TRANSPORTS}", self.transport)
        _require(self.bucket_mb > 0, "sync.bucket_mb", "a number > 0 (MiB)", self.bucket_mb)


@dataclass
class TrainConfig(RolloutJob):
    train: TrainSection = field(default_factory=TrainSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    sync: SyncSection = field(default_factory=SyncSection)
    fault: FaultSection = field(default_factory=FaultSection)
    reward: str = "math_lenient"  # math: last \\boxed{} only (the paper); math_lenient: else the last number
    run_dir: str = ""  # "" = runs/<name or timestamp>
    resume: str = ""  # "" | "auto" (newest checkpoint in run_dir) | a checkpoint directory

    def __post_init__(self):
        super().__post_init__()
        _require(self.reward in ("math", "math_lenient"), "reward", "one of ('math', 'math_lenient')", self.reward)
        if self.sync.transport == "cuda_ipc" and ipc_reason(self):
            raise ConfigError(f"sync.transport: cuda_ipc needs {ipc_reason(self)}; use auto or object_store")
        budget, longest = self.train.micro_batch_tokens, self.sampling.max_new_tokens + 1  # >= 1 prompt token
        _require(not budget or budget >= longest, "train.micro_batch_tokens", "0 or at least the longest sequence "
                 f"(a prompt + sampling.max_new_tokens: > {longest - 1} tokens)", budget)
        if self.resume and self.resume != "auto" and not self.resume.strip():
            raise ConfigError("resume: expected '', 'auto' or a checkpoint directory")
