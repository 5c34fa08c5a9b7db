"""HF-named views of SGLang's parameters: the tensor SGLang's loader wrote the trainer's `name` into.

SGLang's Llama and Qwen2 load q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`
(STACKED, as `stacked_params_mapping` in models/llama.py and qwen2.py's `_legacy_load_weights`,
which `update_weights_from_tensor` goes through); the slice of each is the one the layer's
`weight_loader` narrows to (layers/linear.py: QKVParallelLinear by heads, MergedColumnParallelLinear by
`output_sizes`); a tied lm_head is the embedding. The views are what `weight_probe.probe_tensor` reads.

SGLang's own `get_weights_by_name` (entrypoints/engine.py -> ModelRunner -> model) maps names the same
way but is not used: Qwen2ForCausalLM has none in 0.5.17 (the call logs an error and returns None), and
it turns the whole tensor into Python lists before keeping the first `truncate_size` rows. Tensor
parallelism is not handled (tp_size 1: one engine per GPU); a TP shard reports its shape and fails the check.
No SGLang import: layers are read through their attributes, so CPU tests run this on a stand-in model.
"""
from __future__ import annotations

import torch

from er_sglang.weight_probe import probe_tensor

STACKED = ((".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
           (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1))


def shard_slice(layer, shard) -> tuple[int, int]:
    """(offset, size) along dim 0 of a stacked layer's weight/bias where shard `shard` was loaded."""
    if shard in ("q", "k", "v"):  # QKVParallelLinear.weight_loader
        q, kv = layer.num_heads * layer.head_size, layer.num_kv_heads * layer.head_size
        return {"q": (0, q), "k": (q, kv), "v": (q + kv, layer.num_kv_heads * layer.v_head_size)}[shard]
    sizes = layer.output_sizes  # MergedColumnParallelLinear.weight_loader
    return sum(sizes[:shard]) // layer.tp_size, sizes[shard] // layer.tp_size


def hf_view(model, name: str, params: dict | None = None) -> torch.Tensor | None:
    """The part of `model`'s parameters that holds HF tensor `name`; None if it holds none."""
    params = dict(model.named_parameters()) if params is None else params
    for fused, part, shard in STACKED:
        if part in name:
            fused_name = name.replace(part, fused)
            if fused_name not in params:
                return None
            offset, size = shard_slice(model.get_submodule(fused_name.rsplit(".", 1)[0]), shard)
            return params[fused_name].data.narrow(0, offset, size)
    if name in params:
        return params[name].data
    if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
        return params.get("model.embed_tokens.weight")
    return None


@torch.no_grad()
def probe(model, shapes: dict, num_values: int) -> dict:
    """RolloutEngine.weights_probe on an SGLang model: {name: probe_tensor(view, shape)} for held names."""
    params = dict(model.named_parameters())
    views = {name: hf_view(model, name, params) for name in shapes}
    return {name: probe_tensor(v, shapes[name], num_values) for name, v in views.items() if v is not None}
