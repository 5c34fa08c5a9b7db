"""Chunked log-probs/entropy (the head's logits never exist as one [B, T, V] tensor) and token-budget
micro-batches, on plain tiny HF models (no process group; the FSDP2 trainer runs are in test_trainer.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM

from er_sglang.config import ConfigError, load_config
from orchestrator import grpo
from orchestrator import logprobs as logprobs_mod
from orchestrator import trainer as trainer_mod
from orchestrator.batch import column_span, micro_batches
from orchestrator.config import TrainConfig

VOCAB, B, T = 1000, 3, 11  # B·T = 33 positions: chunks of 5 and 7 do not divide it


def _model(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # left padding
    attn[1, 8:] = 0  # right padding
    return ids * attn, attn


def _unchunked(model, ids, attn, temperature):
    """The trainer's computation before chunking: full logits [B, T-1, V] in float32."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).logits
    logits = logits[:, :-1].float() / temperature
    logp = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return F.pad(logp, (1, 0)), F.pad(grpo.entropy_from_logits(logits), (1, 0))


def _loss(logp, entropy, attn):
    """A GRPO loss (old log-probs 0.1 below the current ones: ratio e^0.1) with an entropy bonus."""
    mask = attn.float()
    mask[:, 0] = 0
    loss, _ = grpo.grpo_loss(logp, logp.detach() - 0.1, torch.tensor([1.0, -0.5, 0.25]), mask, kl_coef=0.0,
                             entropy=entropy, entropy_coef=0.01)
    return loss


def _grads(model, logp, entropy, attn):
    model.zero_grad()
    _loss(logp, entropy, attn).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_chunked_forward_equals_unchunked_values_and_gradients(tied):
    model, (ids, attn) = _model(tied), _batch()
    ref_logp, ref_ent = _unchunked(model, ids, attn, temperature=0.7)
    ref_grads = _grads(model, ref_logp, ref_ent, attn)
    for chunk in (5, 7, 0):
        logp, ent = logprobs_mod.token_scores(model, ids, attn, 0.7, with_entropy=True, entropy_grad=True,
                                         chunk_tokens=chunk)
        torch.testing.assert_close(logp, ref_logp, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ent, ref_ent, atol=1e-6, rtol=1e-6)
        grads = _grads(model, logp, ent, attn)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-5, msg=name)
    assert model.get_output_embeddings().forward.__func__ is torch.nn.Linear.forward  # the head is restored
    with torch.no_grad():
        out = logprobs_mod.compute_logprobs(model, ids, attn, attn, 0.7, [torch.tensor([2, 0]), torch.tensor([1])],
                                           chunk_tokens=4)
    torch.testing.assert_close(out, ref_logp * attn, atol=1e-6, rtol=1e-6)


class _LargestVocabTensor(TorchDispatchMode):
    """Records the most elements of any op output with the vocabulary as last dimension that is new
    memory (not a view of an input, such as the head weight's transpose)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == VOCAB
                    and t.untyped_storage().data_ptr() not in inputs):
                self.numel = max(self.numel, t.numel())
        return out


def _largest_vocab_tensor(model, ids, attn, chunk):
    with _LargestVocabTensor() as mode:
        logp, ent = logprobs_mod.token_scores(model, ids, attn, 1.0, with_entropy=True, entropy_grad=True,
                                         chunk_tokens=chunk)
        _loss(logp, ent, attn).backward()
    return mode.numel


def test_chunked_forward_backward_never_builds_full_logits():
    model, (ids, attn) = _model(tied=True), _batch()
    assert _largest_vocab_tensor(model, ids, attn, chunk=0) == B * T * VOCAB  # what chunking removes
    assert _largest_vocab_tensor(model, ids, attn, chunk=5) == 5 * VOCAB  # forward and backward alike


def _mask(spans, width=12):
    m = torch.zeros(len(spans), width, dtype=torch.long)
    for i, (a, b) in enumerate(spans):
        m[i, a:b + 1] = 1
    return m


def test_micro_batches_pack_longest_first_within_budget():
    mask = _mask([(2, 8), (1, 9), (0, 10), (2, 11)])  # lengths 7, 9, 11, 10
    # sorted 2, 3, 1, 0; [2, 3] spans columns 0..11: 2 x 12 = 24 <= 24; [1, 0] spans 1..9: 2 x 9 = 18
    assert [r.tolist() for r in micro_batches(mask, max_tokens=24)] == [[2, 3], [1, 0]]
    assert [r.tolist() for r in micro_batches(mask, max_tokens=23)] == [[2], [3, 1], [0]]  # [3, 1]: 2 x 11
    assert [r.tolist() for r in micro_batches(mask, max_tokens=5)] == [[2], [3], [1], [0]]  # each alone
    # as many micro-batches as another rank: the one with the most padded tokens is halved
    assert [r.tolist() for r in micro_batches(mask, max_tokens=24, min_count=3)] == [[2], [3], [1, 0]]
    assert [r.tolist() for r in micro_batches(mask, max_seqs=3)] == [[0, 1, 2], [3]]
    assert column_span(mask[[1, 0]]) == slice(1, 10)


@pytest.mark.parametrize("override, message", [
    ("train.micro_batch_tokens=-1", "train.micro_batch_tokens: expected an int >= 0"),
    ("train.micro_batch_tokens=24", ("train.micro_batch_tokens: expected 0 or at least the longest sequence "
                                     "(a prompt + sampling.max_new_tokens: > 24 tokens), got 24")),
    ("train.logprob_chunk_tokens=-5", "train.logprob_chunk_tokens: expected an int >= 0"),
])
def test_config_token_keys_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(TrainConfig, [override])
    assert str(exc.value).startswith(message) and len(str(exc.value).splitlines()) == 1
    assert load_config(TrainConfig, ["train.micro_batch_tokens=25"]).train.micro_batch_tokens == 25


def _bench(args: list[str]) -> dict:
    """One FSDP2 rank (gloo) on CPU: RSS before, peak RSS during, wall and CPU time of one train_step
    or one `logprobs` pass, after a small warm-up step (AdamW's state, allocator pools).
    args: MODEL LENGTHS train_step|logprobs [key=value trainer kwargs]; LENGTHS: tokens per sequence,
    e.g. ``1024,1024`` or ``1024,128x7`` (right-padded, random tokens)."""
    import os
    import time
    from pathlib import Path

    from er_sglang.models import resolve_model_path

    def gib(field: str) -> float:  # VmHWM: peak RSS since the last reset; VmRSS: now
        status = Path("/proc/self/status").read_text().splitlines()
        kib = next(line.split()[1] for line in status if line.startswith(field))
        return round(int(kib) / 2**20, 2)

    lengths = [int(part.split("x")[0]) for part in args[1].split(",")
               for _ in range(int((part + "x1").split("x")[1]))]
    mask = torch.stack([(torch.arange(max(lengths)) < n).long() for n in lengths])
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 1000, mask.shape, generator=g) * mask, "attention_mask": mask,
             "response_mask": mask * (torch.arange(mask.shape[1]) >= 16).long(),
             "advantages": torch.randn(len(lengths), generator=g)}
    path = args[0]
    if path.startswith("tiny:"):  # tiny:VOCAB:HIDDEN, a random 2-layer Llama whose head dominates
        vocab, hidden = (int(x) for x in path.split(":")[1:])
        path = f"/tmp/er_bench_tiny_{vocab}_{hidden}"
        LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=4096)).save_pretrained(path)
    trainer_mod.init_process_group(0, 1, master_port=int(os.environ.get("MASTER_PORT", "29512")), backend="gloo")
    tr = trainer_mod.FSDPTrainer(str(resolve_model_path(path)), kl_coef=0.0, lr=1e-6,
                                 **{k: int(v) for k, v in (a.split("=") for a in args[3:])})
    tr.train_step({k: v[:1, :32] if v.dim() == 2 else v[:1] for k, v in batch.items()})
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    rss, wall, cpu = gib("VmRSS:"), time.perf_counter(), time.process_time()
    getattr(tr, args[2])(batch)
    return {"args": args, "rss_before_gib": rss, "peak_rss_gib": gib("VmHWM:"),
            "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}


if __name__ == "__main__":  # the command of docs/benchmarks.md §8
    import json
    import sys

    print(json.dumps(_bench(sys.argv[1:])))
