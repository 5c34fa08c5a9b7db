"""GPU test helpers: a tiny random Qwen2 checkpoint with peaked next-token distributions."""
from __future__ import annotations

import os

import pytest

TINY_DIR = os.environ.get("ER_TINY_DIR", "/tmp/er_tiny_qwen2_hd128_g4_e30")
PROMPT = [11, 22, 33, 44, 55, 66, 77, 88, 99, 111, 222, 333, 444, 555, 666, 777]  # the lossless test's prompt


def make_tiny_qwen2(path: str = TINY_DIR, peak: float = 10.0, embed_scale: float = 30.0, seed: int = 0) -> str:
    """Random 4-layer Qwen2, lm_head scaled by `peak`; vocab 32000, Marlin-compatible shapes. head_dim 128 and
    a GQA group of 4 select the flashinfer modules of the prebuilt JIT cache (Qwen2.5-7B's: tensor-core
    decode from group 4 up); another shape would JIT-compile flashinfer for minutes on the device.

    Embeddings scaled by `embed_scale`: with plain random init the int4 layers' error dominates the residual
    stream and the draft accepts 0.24 at T = 1 (device run of 2026-12-05: 0.23); with the token's embedding
    carrying the stream, as in trained models, the int4 draft accepts about 0.75 while the next-token
    distribution stays peaked (top-1 0.54, top-3 0.81) and context-dependent (CPU estimate, Marlin's grid:
    scripts/tiny_accept.py, docs/benchmarks.md §11)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    cfg = Qwen2Config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096,
                      tie_word_embeddings=False, eos_token_id=31999, bos_token_id=0)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(peak)
        model.model.embed_tokens.weight.mul_(embed_scale)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_path() -> str:
    return make_tiny_qwen2()


def small_engine_args(**kw) -> dict:
    """sglang: block for tests (small memory, few CUDA-graph batch sizes, no prefill graphs)."""
    args = {"mem_fraction_static": 0.35, "cuda_graph_max_bs_decode": 64, "max_running_requests": 64,
            "disable_prefill_cuda_graph": True, "random_seed": 0, "log_level": "warning"}
    args.update(kw)
    return args
