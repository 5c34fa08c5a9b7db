"""Weight probes: what an engine holds of the weights it was sent, read back under the trainer's names.

Verifying a sync compares like with like. For every name of the state dict that was sent, the engine
reads back `num_values` values of the tensor it loaded that name into (SGLang: a slice of its stacked
qkv / gate_up parameter, er_sglang/sglang/hf_weights.py), at flat positions spread evenly over the
trainer's shape, in its own dtype; the trainer takes the same positions of the sent tensor and casts
them to that dtype. Casting is elementwise round-to-nearest-even on CPU and GPU alike, and bf16, fp16
and fp32 values are exact as Python floats, so a correct sync is bit-equal: the tolerance is 0.

    shapes = {name: list(t.shape) for name, t in sent.items()}
    probe = engine.weights_probe(shapes, PROBE_NUM_VALUES)   # {name: {"dtype", "shape", "values"}}
    probe_mismatch(sent, probe)                               # None, or one line naming the first bad name

Sharded trainers (FSDP2, dim 0) probe without gathering: each rank takes the positions inside its rows
(`shard_probe`), cast to the dtype sent; `merge_shard_probes` joins them; `sent_probe_mismatch` compares.
"""
from __future__ import annotations

import torch

# per parameter: Qwen2.5-7B's 339 tensors give ~87k values, one small reply; a [512, 3584] k_proj is
# probed in every other row, a norm or a tiny test model's tensors in every element
PROBE_NUM_VALUES = 256


def probe_index(numel: int, num_values: int) -> torch.Tensor:
    """Flat row-major positions i * numel // n for i < n = min(numel, num_values) (all when numel <= num_values)."""
    n = min(numel, num_values)
    if n <= 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.arange(n, dtype=torch.int64) * numel // n


def probe_tensor(tensor: torch.Tensor, shape, num_values: int) -> dict:
    """Engine side: {"dtype", "shape", "values"} of `tensor` cut to `shape` (an engine may hold more, e.g.
    SGLang pads the vocabulary), values at probe_index as Python floats. A tensor that does not cover
    `shape` reports its own shape and no values."""
    shape = [int(s) for s in shape]
    dtype = str(tensor.dtype).removeprefix("torch.")
    if tensor.dim() != len(shape) or any(have < want for have, want in zip(tensor.shape, shape)):
        return {"dtype": dtype, "shape": list(tensor.shape), "values": []}
    cut = tensor.detach()[tuple(slice(0, s) for s in shape)].reshape(-1)
    index = probe_index(cut.numel(), num_values).to(cut.device)
    return {"dtype": dtype, "shape": shape, "values": cut[index].double().cpu().tolist()}


def tied_aliases(model) -> set[str]:
    """State-dict names that alias a parameter already listed under another name (a tied lm_head): a sync
    sends each tensor once, under its parameter name, and the tie carries it to the alias."""
    named = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k for k in model.state_dict() if k not in named}


def shard_probe(local: torch.Tensor, full_shape, row_offset: int, dtype: torch.dtype, num_values: int) -> dict:
    """Trainer side, one rank: of the full tensor's probe positions (probe_index over `full_shape`), those in
    this rank's dim-0 shard (rows row_offset.., FSDP2's layout; a 0-dim tensor: rank 0 holds it), as
    {"index", "values"}: flat positions and the values cast to `dtype` (what is sent), as Python floats."""
    full_shape = [int(s) for s in full_shape]
    numel = int(torch.Size(full_shape).numel())
    row = numel // full_shape[0] if full_shape and full_shape[0] else 1
    index = probe_index(numel, num_values)
    lo = row_offset * row
    hi = lo + (local.numel() if full_shape else (1 if row_offset == 0 else 0))
    sel = index[(index >= lo) & (index < hi)]
    flat = local.detach().reshape(-1)
    return {"index": sel.tolist(), "values": flat[(sel - lo).to(flat.device)].to(dtype).double().cpu().tolist()}


def merge_shard_probes(parts: list[dict], shape, dtype: torch.dtype) -> dict:
    """The sent tensor's probe, {"shape", "dtype", "values"}, from every rank's shard_probe of it."""
    pairs = sorted((i, v) for part in parts for i, v in zip(part["index"], part["values"]))
    return {"shape": [int(s) for s in shape], "dtype": str(dtype).removeprefix("torch."), "values": [v for _, v in pairs]}


def sent_probe(sent: torch.Tensor, num_values: int) -> dict:
    """The probe of a whole sent tensor (one rank holding all of it)."""
    return merge_shard_probes([shard_probe(sent, sent.shape, 0, sent.dtype, num_values)], sent.shape, sent.dtype)


def expected_values(sent: dict, dtype: str) -> list[float]:
    """The sent probe's values cast to the engine's `dtype` (exact: they are the sent dtype's values)."""
    values = torch.tensor(sent["values"], dtype=torch.float64).to(getattr(torch, sent["dtype"]))
    return values.to(getattr(torch, dtype)).double().tolist()


def probe_mismatch(sent: dict[str, torch.Tensor], probe: dict, num_values: int = PROBE_NUM_VALUES) -> str | None:
    """One line naming the first parameter (sorted names) whose probe differs from the sent tensor cast to
    the engine's dtype (tolerance 0), or that the engine lacks; None when every probe matches."""
    return sent_probe_mismatch({name: sent_probe(t, num_values) for name, t in sent.items()}, probe, num_values)


def sent_probe_mismatch(sent: dict[str, dict], probe: dict, num_values: int = PROBE_NUM_VALUES) -> str | None:
    """probe_mismatch from the sent tensors' probes (sent_probe / merge_shard_probes) instead of the tensors."""
    for name in sorted(sent):
        got = probe.get(name)
        if got is None:
            return f"{name}: the engine holds no such parameter"
        shape = tuple(sent[name]["shape"])
        if tuple(got["shape"]) != shape:
            return f"{name}: shape {tuple(got['shape'])} on the engine, {shape} sent"
        want = expected_values(sent[name], got["dtype"])
        values = got["values"]
        if values != want:
            i = next((k for k, (a, b) in enumerate(zip(values, want)) if a != b), min(len(values), len(want)))
            if i >= min(len(values), len(want)):
                return f"{name}: {len(values)} values probed on the engine, {len(want)} expected"
            flat = int(probe_index(int(torch.Size(shape).numel()), num_values)[i])
            return (f"{name} differs from the weights sent (as {got['dtype']}, tolerance 0): flat element {flat} "
                    f"is {values[i]!r} on the engine, {want[i]!r} sent")
    return None
