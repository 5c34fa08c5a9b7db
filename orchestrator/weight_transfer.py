"""Trainer -> engine weight handoff in buckets, in the engine's dtype, never through the driver.

Transports (`sync.transport`; `auto` picks cuda_ipc where it applies, else object_store):
  object_store  every trainer rank casts its own dim-0 shard of a bucket's tensors to the engine's dtype
                and returns it (CPU) to Ray's object store; every engine fetches all ranks' parts, joins
                them in rank order (FSDP2 shards dim 0 with torch.chunk sizes) and loads them. No
                collective and no copy through the driver; any placement, CPU or GPU.
  cuda_ipc      trainer rank i and engine i share GPU i (placement colocated, engine sglang): every rank
                all-gathers the bucket's full tensors on its GPU (DTensor.full_tensor, NCCL), casts them,
                packs them into one flat buffer (SGLang's FlattenedTensorBucket) and gives its engine CUDA
                IPC handles to it (SGLang's MultiprocessingSerializer, one payload per TP rank); SGLang's
                scheduler maps the buffer and loads it (load_format "flattened_bucket"). Only handles
                cross processes. The rank holds the buffer until the engine has loaded it
                (`release_bucket`); at most two buckets are alive (the next is packed during a load).
Buckets: tensors in state-dict order, packed greedily up to `sync.bucket_mb` (a larger tensor goes alone).
"""
from __future__ import annotations

TRANSPORTS = ("auto", "object_store", "cuda_ipc")


def resolve_transport(cfg) -> str:
    """The transport `sync.transport` names; `auto` = cuda_ipc when every engine has a trainer rank on its
    GPU and speaks SGLang's tensor path (engine sglang, num_gpus > 0, colocated, engines <= trainers)."""
    want = cfg.sync.transport
    return ("cuda_ipc" if ipc_reason(cfg) is None else "object_store") if want == "auto" else want


def ipc_reason(cfg) -> str | None:
    """Why cuda_ipc cannot serve this config (one phrase), or None when it can."""
    c = cfg.cluster
    if cfg.engine != "sglang":
        return f"engine=sglang (got {cfg.engine})"
    if not c.num_gpus:
        return "cluster.num_gpus > 0"
    if c.placement != "colocated":
        return f"cluster.placement=colocated (got {c.placement})"
    if c.num_engines > c.num_trainers:
        return f"cluster.num_engines <= cluster.num_trainers ({c.num_engines} > {c.num_trainers})"
    return None


def dtype_of(name: str):
    """torch.<name> ("bfloat16", "torch.float32"), or TypeError."""
    import torch

    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"not a torch dtype: {name!r}")
    return dtype


def plan_buckets(shapes: list[tuple[str, list[int]]], dtype, bucket_bytes: int) -> list[list[str]]:
    """Names in the given order, cut into buckets of <= bucket_bytes at `dtype` (a larger tensor alone)."""
    import torch

    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    size = torch.empty((), dtype=dtype).element_size()
    buckets, current, used = [], [], 0
    for name, shape in shapes:
        nbytes = size * int(torch.Size(shape).numel())
        if current and used + nbytes > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        buckets.append(current)
    return buckets


def shard_sizes(dim0: int, world: int) -> list[int]:
    """Rows of each rank's dim-0 shard (torch.chunk sizes, as FSDP2 shards; trailing ranks may get 0)."""
    chunk = -(-dim0 // world) if dim0 else 0
    return [max(0, min(chunk, dim0 - r * chunk)) for r in range(world)]


def assemble_shards(shards: list[dict]) -> dict:
    """Full tensors from every rank's dim-0 shards (rank order): concatenated; 0-dim entries from rank 0."""
    import torch

    if len(shards) == 1:
        return shards[0]
    return {k: torch.cat([s[k] for s in shards], 0) if shards[0][k].dim() else shards[0][k] for k in shards[0]}


def pack_ipc(named: list[tuple], copies: int):
    """(bucket, payloads): the tensors flattened into one CUDA buffer (keep `bucket` alive until the engine
    has loaded it) and `copies` serialized payloads of its CUDA IPC handles (one per engine TP rank)."""
    from sglang.srt.utils.common import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    monkey_patch_torch_reductions()  # handles name the device by UUID: the engine may number GPUs otherwise
    bucket = FlattenedTensorBucket(named_tensors=named)
    data = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
    return bucket, [MultiprocessingSerializer.serialize(data) for _ in range(copies)]
