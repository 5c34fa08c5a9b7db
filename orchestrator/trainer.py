"""FSDP2 GRPO trainer for one rank (no Ray here; the Ray actor wraps this class).

Each rank holds a shard of the policy (``fully_shard`` on every decoder layer, then the root) and of
its AdamW state, and trains on its own share of the rollout batch. ``torch.distributed`` must be
initialized by the caller (``init_process_group``: gloo on CPU, nccl on GPU).

Loss scaling (why token-mean is exact): per mini-batch the valid response tokens of *all* ranks are
counted with one all-reduce (``denom``); every micro-batch contributes ``Σ ℓ_tok / denom``. FSDP2
averages gradients over ranks, so each rank's loss is multiplied by ``world_size``; the summed
gradient is then exactly that of the mini-batch token mean, whatever the micro-batching or the number
of ranks.

Memory: the head's float32 logits exist ``logprob_chunk_tokens`` positions at a time, in forward and
backward (``orchestrator/logprobs.py``); each micro-batch is trimmed to its own columns, and with
``micro_batch_tokens`` packed by padded tokens (``batch.micro_batches``), as many on every rank.
"""

import os
import random
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from orchestrator import grpo
from orchestrator.batch import column_span, micro_batches, seq_spans
from orchestrator.logprobs import compute_logprobs, token_scores
from orchestrator.weight_transfer import assemble_shards, dtype_of, pack_ipc, shard_sizes  # noqa: F401 - re-export

TOKEN_KEYS = ("input_ids", "attention_mask", "response_mask")


def init_process_group(rank: int, world_size: int, master_addr: str = "127.0.0.1", master_port: int = 29500,
                       backend: str | None = None) -> None:
    """Join the trainers' process group (backend default: nccl with CUDA, else gloo)."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size)


class FSDPTrainer:
    """The policy (and frozen reference) of one rank, sharded with FSDP2, trained with GRPO.

    ``micro_batch_size``/``mini_batch_size`` count sequences of *this rank* (mini: per optimizer
    step, None = the whole share in one step); ``micro_batch_tokens > 0`` packs micro-batches by
    padded tokens instead (``batch.micro_batches``); ``logprob_chunk_tokens``: positions whose logits
    exist at once (0: a whole micro-batch's); ``ppo_epochs`` passes over the batch. ``dtype`` is the
    compute dtype: bf16 (default on CUDA) via FSDP2 ``MixedPrecisionPolicy`` with fp32 master weights
    and fp32 gradient reduction; float32 default on CPU.
    """

    def __init__(self, model_path: str, rank: int = 0, world_size: int = 1, lr: float = 5e-7,
                 weight_decay: float = 0.01, grad_clip: float = 1.0, kl_coef: float = 1e-4,
                 kl_type: str = "low_var_kl", entropy_coef: float = 0.0, clip_low: float = 0.2,
                 clip_high: float = 0.2, clip_ratio_c: float | None = 3.0, loss_agg: str = "token-mean",
                 micro_batch_size: int = 4, mini_batch_size: int | None = None, ppo_epochs: int = 1,
                 micro_batch_tokens: int = 0, logprob_chunk_tokens: int = 1024, use_ref_model: bool = True,
                 temperature: float = 1.0, seed: int = 0, device: str = "cpu", dtype: str | None = None,
                 activation_checkpointing: bool = False):
        if kl_type not in grpo.KL_KINDS or loss_agg not in grpo.AGG_MODES:
            raise ValueError(f"kl_type in {grpo.KL_KINDS}, loss_agg in {grpo.AGG_MODES}; got {kl_type!r}, {loss_agg!r}")
        if not dist.is_initialized() or dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(f"init_process_group(rank={rank}, world_size={world_size}) must run first")
        self.rank, self.world_size = rank, world_size
        self._held_buckets: dict[int, object] = {}
        self.kl_coef, self.kl_type, self.entropy_coef = kl_coef, kl_type, entropy_coef
        self.clip_low, self.clip_high, self.clip_ratio_c, self.loss_agg = clip_low, clip_high, clip_ratio_c, loss_agg
        self.micro_batch_size, self.mini_batch_size, self.ppo_epochs = micro_batch_size, mini_batch_size, ppo_epochs
        self.micro_batch_tokens, self.logprob_chunk_tokens = micro_batch_tokens, logprob_chunk_tokens
        self.grad_clip, self.temperature, self.seed = grad_clip, temperature, seed
        self.activation_checkpointing = activation_checkpointing
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
        self.compute_dtype = getattr(torch, dtype)
        self._seed_everything(seed + rank)
        self.mesh = init_device_mesh(self.device.type, (world_size,))
        self.model = self._build_model(model_path, trainable=True)
        self.ref_model = self._build_model(model_path, trainable=False) if kl_coef > 0 and use_ref_model else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.num_steps = 0

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device

    def _build_model(self, model_path: str, trainable: bool):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        model.config.use_cache = False
        if trainable and self.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # the policy keeps its gathered layers from forward to backward (one all-gather per layer, not two)
        kwargs = {"mesh": self.mesh, "reshard_after_forward": not trainable}
        if self.compute_dtype != torch.float32:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        block_names = set(model._no_split_modules or ())  # the decoder layer class, e.g. LlamaDecoderLayer
        for module in model.modules():
            if type(module).__name__ in block_names:
                fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)  # embeddings, final norm, lm_head (tied or not)
        if not trainable:
            model.requires_grad_(False)
            model.eval()
        return model

    def logprobs(self, batch: dict[str, Tensor], use_ref: bool = False) -> Tensor:
        """compute_logprobs of this rank's share with the policy (or the reference), on CPU ``[N, T]``."""
        model = self.ref_model if use_ref else self.model
        model.eval()
        ids, attn, resp = (batch[k].to(self.device) for k in TOKEN_KEYS)
        rows = self._micro_batches(batch["attention_mask"])
        return compute_logprobs(model, ids, attn, resp, self.temperature, rows, self.logprob_chunk_tokens).cpu()

    def _micro_batches(self, attention_mask: Tensor) -> list[Tensor]:
        """Row indices of each micro-batch of ``attention_mask [n, T]``; as many on every rank (each forward
        and backward is a set of FSDP2 collectives)."""
        if not self.micro_batch_tokens:
            return micro_batches(attention_mask, max_seqs=self.micro_batch_size)
        first, last = seq_spans(attention_mask)
        local = [len(micro_batches(attention_mask, max_tokens=self.micro_batch_tokens)),
                 max(b - a + 1 for a, b in zip(first, last))]
        count, longest = self._all_reduce(torch.tensor(local), dist.ReduceOp.MAX).tolist()
        if longest > self.micro_batch_tokens:  # every rank raises: none is left waiting in a collective
            raise ValueError(f"train.micro_batch_tokens: expected >= the longest sequence ({longest} tokens), "
                             f"got {self.micro_batch_tokens}")
        return micro_batches(attention_mask, max_tokens=self.micro_batch_tokens, min_count=count)

    def _all_reduce(self, values: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        values = values.to(self.device)
        dist.all_reduce(values, op=op)
        return values.cpu()

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One GRPO update (ppo_epochs × mini-batches × micro-batches) on this rank's share.

        ``batch``: ``input_ids, attention_mask, response_mask [N, T]``, ``advantages [N]`` and
        optionally ``old_logprobs`` / ``ref_logprobs [N, T]`` (aligned as compute_logprobs). N must be
        the same on every rank. Returns rank-averaged metrics.
        """
        n = batch["input_ids"].shape[0]
        n_max, neg_n_min = self._all_reduce(torch.tensor([n, -n]), dist.ReduceOp.MAX).tolist()
        if n_max != -neg_n_min:
            raise ValueError(f"every rank must get the same number of sequences (got {-neg_n_min}..{n_max})")
        batch = {k: v for k, v in batch.items()}
        on_gpu = self.device.type == "cuda"
        if on_gpu:  # mem/train_*: this step's own peak (the engines sleep meanwhile when colocated)
            torch.cuda.reset_peak_memory_stats(self.device)
        mini = self.mini_batch_size or n
        # on-policy: old log-probs are the current policy's. With one update over the whole batch they equal
        # the update's own forward (detached), so the extra forward is skipped; otherwise recompute first.
        if "old_logprobs" not in batch and not (self.ppo_epochs == 1 and mini >= n):
            batch["old_logprobs"] = self.logprobs(batch)
        if self.kl_coef > 0 and "ref_logprobs" not in batch:
            if self.ref_model is None:
                raise ValueError("kl_coef > 0 with use_ref_model=False needs batch['ref_logprobs']")
            batch["ref_logprobs"] = self.logprobs(batch, use_ref=True)
        totals: dict[str, float] = defaultdict(float)
        num_updates = 0
        for _ in range(self.ppo_epochs):
            for start in range(0, n, mini):
                metrics = self._update({k: v[start:start + mini] for k, v in batch.items()})
                for k, v in metrics.items():
                    totals[k] += v
                num_updates += 1
        self.num_steps += 1
        out = {k: v / num_updates for k, v in totals.items()}
        out["train/num_tokens"] = totals["train/num_tokens"] / self.ppo_epochs
        out["train/skipped_updates"] = totals["train/skipped_updates"]  # a count, not a mean
        out["train/lr"] = self.optimizer.param_groups[0]["lr"]
        if on_gpu:
            out["mem/train_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            out["mem/train_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
            torch.cuda.empty_cache()  # colocated: the engine's wake() re-maps its memory next; return the cache
        return out

    def _update(self, mini: dict[str, Tensor]) -> dict[str, float]:
        """One optimizer step on a mini-batch, micro-batched with gradient accumulation."""
        self.model.train()
        mask = mini["response_mask"].float()
        local_count = mask.sum() if self.loss_agg == "token-mean" else torch.tensor(float(mask.shape[0]))
        counts = self._all_reduce(torch.stack([local_count, mask.sum()]))
        denom, num_tokens = counts[0].clamp(min=1).to(self.device), counts[1].item()
        sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros(()))
        self.optimizer.zero_grad(set_to_none=True)
        for rows in self._micro_batches(mini["attention_mask"]):
            cols = column_span(mini["attention_mask"][rows])  # trimmed to its own longest sequence
            micro = {k: (v[rows, cols] if v.dim() == 2 else v[rows]).to(self.device) for k, v in mini.items()}
            logp, entropy = token_scores(self.model, micro["input_ids"], micro["attention_mask"], self.temperature,
                                     with_entropy=True, entropy_grad=self.entropy_coef != 0,
                                     chunk_tokens=self.logprob_chunk_tokens)
            old_logp = micro["old_logprobs"] if "old_logprobs" in micro else logp.detach()
            loss, metrics = grpo.grpo_loss(
                logp, old_logp, micro["advantages"], micro["response_mask"].float(),
                ref_logp=micro.get("ref_logprobs"), entropy=entropy, kl_coef=self.kl_coef,
                kl_type=self.kl_type, entropy_coef=self.entropy_coef, clip_low=self.clip_low,
                clip_high=self.clip_high, clip_ratio_c=self.clip_ratio_c, agg=self.loss_agg, denom=denom)
            (loss * self.world_size).backward()  # FSDP2 divides the reduced gradient by world_size
            sums["train/loss"] += loss.detach().cpu()
            for k, v in metrics.items():
                sums[k] += v.cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        keys = sorted(sums)
        reduced = self._all_reduce(torch.stack([sums[k] for k in keys]))  # contributions add up exactly
        out = {k: v.item() for k, v in zip(keys, reduced)}
        # grad_norm and the reduced loss are global, so every rank takes the same decision: a NaN/inf loss
        # or gradient skips the step (weights and AdamW moments untouched) instead of poisoning them
        is_finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(reduced[keys.index("train/loss")]))
        if is_finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out["train/grad_norm"] = grad_norm.item()
        out["train/num_tokens"] = num_tokens
        out["train/skipped_updates"] = float(not is_finite)
        return out

    def full_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor] | None:
        """Unsharded CPU state dict of the policy on rank 0 (HF ``state_dict()`` names), None elsewhere."""
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        return {k: v.to(dtype) for k, v in sd.items()} if dtype is not None else sd

    # ---- weight handoff to the engines (orchestrator/weight_transfer.py) --------------------------------
    def weight_shapes(self) -> list[tuple[str, list[int]]]:
        """(name, full shape) of every state-dict entry but tied aliases (a tied lm_head is sent once, as the
        embedding), in state-dict order (the same on every rank)."""
        from er_sglang.weight_probe import tied_aliases

        aliases = tied_aliases(self.model)
        return [(k, list(v.shape)) for k, v in self.model.state_dict().items() if k not in aliases]

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """No NaN/inf in this rank's shards (no collective)."""
        return all(bool(torch.isfinite(_local(v)).all()) for v in self.model.state_dict().values()
                   if v.is_floating_point())

    @torch.no_grad()
    def pack_bucket(self, index: int, names: list[str], dtype: str, transport: str, copies: int = 0):
        """One bucket of the policy's weights, cast to `dtype`, for the engines.

        object_store: {name: this rank's dim-0 shard} (CPU; no collective). cuda_ipc: every rank all-gathers
        the full tensors on its GPU (collective: all ranks call with the same names); a rank with an engine
        on its GPU (`copies` = that engine's TP size) keeps the flat buffer as bucket `index` until
        `release_bucket(index)` and returns `copies` serialized CUDA IPC payloads; the others return None.
        """
        sd, dt = self.model.state_dict(), dtype_of(dtype)
        if transport == "object_store":
            return {n: _local(sd[n]).detach().to(device="cpu", dtype=dt, copy=True) for n in names}
        named = [(n, (sd[n].full_tensor() if isinstance(sd[n], DTensor) else sd[n]).detach().to(dt))
                 for n in names]
        if not copies:
            return None
        self._held_buckets[index], payloads = pack_ipc(named, copies)
        return payloads

    def release_bucket(self, index: int) -> None:
        """The engines have loaded bucket `index`: drop its buffer (torch frees it once the engine's mapping
        is gone)."""
        self._held_buckets.pop(index, None)

    @torch.no_grad()
    def sent_probes(self, dtype: str, num_values: int) -> dict[str, dict]:
        """{name: shard_probe} of this rank's rows of every entry as sent (cast to `dtype`); the driver merges
        the ranks' parts (er_sglang/weight_probe.py), so a sync is checked without gathering the weights."""
        from er_sglang.weight_probe import shard_probe

        out = {}
        for name, v in self.model.state_dict().items():
            offset = sum(shard_sizes(v.shape[0], self.world_size)[:self.rank]) if v.dim() else self.rank
            out[name] = shard_probe(_local(v), list(v.shape), offset, dtype_of(dtype), num_values)
        return out

    @torch.no_grad()
    def local_state_dict(self) -> dict[str, Tensor]:
        """This rank's dim-0 shard of every state-dict entry (CPU copies; no collective).

        FSDP2 shards dim 0 in rank order with torch.chunk sizes, so concatenating the ranks' shards
        (`assemble_shards`) gives the full state dict without gloo/NCCL all-gathers.
        """
        return {k: _local(v).detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def param_checksum(self) -> float:
        """``Σ_params Σ_i p_i`` in float64 over the full policy (tied weights once); same on every rank."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.model.parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            total += local.double().sum()
        return self._all_reduce(total).item()

    def save_checkpoint(self, path: str) -> None:
        """Sharded model + optimizer (DCP) and this rank's RNG state into directory ``path``."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
               "num_steps": self.num_steps}
        torch.save(rng, os.path.join(path, f"rng_rank{self.rank}.pt"))
        dist.barrier()

    def load_checkpoint(self, path: str) -> None:
        """Restore what save_checkpoint wrote (same world size for the RNG files)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = torch.load(os.path.join(path, f"rng_rank{self.rank}.pt"), weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.num_steps = rng["num_steps"]
        dist.barrier()


def _local(v: Tensor) -> Tensor:
    """This rank's part of a state-dict entry (a DTensor's local shard, else the tensor)."""
    return v.to_local() if isinstance(v, DTensor) else v
