"""Tiny random HF models for CPU tests (no files, no network)."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, vocab: int = 32, hidden: int = 64, layers: int = 2, peak: float = 4.0):
    """A random Llama whose next-token distributions are peaked (lm_head scaled by `peak`)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(peak)
    return model


class ModelDrafter:
    """A drafter that is simply another model (e.g. a different random one) sharing the target's cache."""

    def __init__(self, model):
        self.model = model.eval()

    def requantize(self, state_dict=None) -> float:
        return 0.0


@pytest.fixture(autouse=True)  # autouse where a test module imports it
def one_thread():  # small CPU matmuls on a shared 2-core machine: threads only contend
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
