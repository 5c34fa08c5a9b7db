"""FSDP2 trainer on a tiny random Llama, 1 and 2 gloo ranks.

Each world size is one ``torch.multiprocessing.spawn`` (module fixture) that runs every scenario and
saves its results; the tests then check them. A rank's share of the global batch is ``batch[r::W]``,
so that the mini-batches of the 2-rank run (1 sequence per rank) are those of the 1-rank run.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from er_sglang.weight_probe import merge_shard_probes, sent_probe
from orchestrator import logprobs as logprobs_mod
from orchestrator import trainer as trainer_mod
from orchestrator.grpo import group_advantages

T_PROMPT, T_RESP, VOCAB = 5, 7, 128
COMMON = {"lr": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0, "kl_coef": 0.0, "seed": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batch(seed: int, rewards: list[float]) -> dict[str, torch.Tensor]:
    """4 sequences: left-padded prompts of 3..5 tokens, right-padded responses of 4..7 tokens."""
    g = torch.Generator().manual_seed(seed)
    n = len(rewards)
    ids = torch.randint(1, VOCAB, (n, T_PROMPT + T_RESP), generator=g)
    attn = torch.ones_like(ids)
    resp = torch.zeros_like(ids)
    for i in range(n):
        prompt_len, resp_len = 3 + i % 3, 4 + i
        attn[i, :T_PROMPT - prompt_len] = 0
        attn[i, T_PROMPT + resp_len:] = 0
        resp[i, T_PROMPT:T_PROMPT + resp_len] = 1
    ids = ids * attn
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp,
            "advantages": group_advantages(torch.tensor(rewards), group_size=2)}


BATCH_1 = make_batch(1, [1.0, 0.0, 0.0, 1.0])
BATCH_2 = make_batch(2, [0.0, 1.0, 1.0, 1.0])
# BATCH_1 with sequence 3's response cut to 3 tokens. Tokens per sequence 7, 9, 11, 6 (columns 2-8, 1-9, 0-10,
# 2-7); with a 20-token budget rank 0 of 2 ({0, 2}: 2 x 11 columns) needs 2 micro-batches, rank 1 ({1, 3}:
# 2 x 9) one, which it must split to run as many forwards as rank 0.
BATCH_T = {k: v.clone() for k, v in BATCH_1.items()}
BATCH_T["attention_mask"][3, T_PROMPT + 3:] = 0
BATCH_T["response_mask"][3, T_PROMPT + 3:] = 0
BATCH_T["input_ids"] *= BATCH_T["attention_mask"]
TOKENS = {"kl_coef": 0.1, "ppo_epochs": 2}  # old and reference log-probs through compute_logprobs


def _share(batch, rank, world):
    return {k: v[rank::world] for k, v in batch.items()}


def _params(tr):
    sd = tr.full_state_dict()  # a collective: every rank calls it, rank 0 gets the dict
    return None if sd is None else {k: v.clone() for k, v in sd.items()}


def _record_grads(tr) -> list:
    """The full (clipped) gradients of each of `tr`'s optimizer steps, appended as they happen."""
    grads, step = [], tr.optimizer.step

    def record():
        grads.append({n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                      for n, p in tr.model.named_parameters()})
        step()
    tr.optimizer.step = record
    return grads


def _run_world1(model_path, out):
    res = {}
    tr = trainer_mod.FSDPTrainer(model_path, **COMMON, micro_batch_size=4)
    res["init"] = _params(tr)
    res["m_step1"] = tr.train_step(BATCH_1)
    res["micro4"] = _params(tr)
    res["logprobs"] = tr.logprobs(BATCH_1)
    res["checksum"] = tr.param_checksum()
    tr = trainer_mod.FSDPTrainer(model_path, **COMMON, micro_batch_size=2)
    tr.train_step(BATCH_1)
    res["micro2"] = _params(tr)
    tr = trainer_mod.FSDPTrainer(model_path, **COMMON, micro_batch_size=2)
    tr.train_step(dict(BATCH_1, old_logprobs=tr.logprobs(BATCH_1)))  # explicit recomputation
    res["explicit_old"] = _params(tr)
    zero = dict(BATCH_1, advantages=torch.zeros(4))
    tr = trainer_mod.FSDPTrainer(model_path, **COMMON, micro_batch_size=2)
    res["m_zero"] = tr.train_step(zero)
    res["zero"] = _params(tr)
    for name, kwargs in (("one_micro", {"micro_batch_size": 4, "logprob_chunk_tokens": 0}),  # unchunked
                         ("budget", {"micro_batch_tokens": 24, "logprob_chunk_tokens": 5})):
        tr = trainer_mod.FSDPTrainer(model_path, **COMMON, **kwargs)
        res[f"g_{name}"] = _record_grads(tr)
        res[f"m_{name}"] = tr.train_step(BATCH_1)
    tr = trainer_mod.FSDPTrainer(model_path, **COMMON | TOKENS, micro_batch_size=4, logprob_chunk_tokens=0)
    res["g_tokens_ref"] = _record_grads(tr)
    tr.train_step(BATCH_T)
    try:
        trainer_mod.FSDPTrainer(model_path, **COMMON, micro_batch_tokens=10).train_step(BATCH_1)
    except ValueError as exc:
        res["budget_error"] = str(exc)
    return res


def _run_dist(model_path, out, rank, world):
    """Same global batches on any world size: KL to a reference, 2 mini-batches, 2 steps, checkpoint."""
    res = {}
    cfg = dict(COMMON, kl_coef=0.1, micro_batch_size=1, mini_batch_size=2 // world)
    tr = trainer_mod.FSDPTrainer(model_path, rank=rank, world_size=world, **cfg)
    res["m_step1"] = tr.train_step(_share(BATCH_1, rank, world))
    res["step1"] = _params(tr)
    tr.save_checkpoint(os.path.join(out, f"ckpt_w{world}"))
    res["m_step2"] = tr.train_step(_share(BATCH_2, rank, world))
    res["step2"] = _params(tr)
    resumed = trainer_mod.FSDPTrainer(model_path, rank=rank, world_size=world, **dict(cfg, seed=123))
    resumed.load_checkpoint(os.path.join(out, f"ckpt_w{world}"))
    res["m_resumed2"] = resumed.train_step(_share(BATCH_2, rank, world))
    res["resumed2"] = _params(resumed)
    res["full_sd_is_none"] = tr.full_state_dict() is None
    res["local"] = tr.local_state_dict()
    res["shapes"], res["finite"] = tr.weight_shapes(), tr.weights_finite()
    res["packed"] = tr.pack_bucket(0, [name for name, _ in res["shapes"]], "bfloat16", "object_store")
    res["probes"] = tr.sent_probes("bfloat16", 64)
    tr = trainer_mod.FSDPTrainer(model_path, rank=rank, world_size=world, **COMMON | TOKENS,
                                 micro_batch_tokens=20, logprob_chunk_tokens=5)
    res["g_tokens"] = _record_grads(tr)
    tr.train_step(_share(BATCH_T, rank, world))
    return res


def _worker(rank, world, port, model_path, out):
    torch.set_num_threads(1)
    trainer_mod.init_process_group(rank, world, master_port=port, backend="gloo")
    res = _run_world1(model_path, out) if world == 1 else {}
    res["dist"] = _run_dist(model_path, out, rank, world)
    torch.save(res, os.path.join(out, f"w{world}_rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _spawn(model_path, tmp_path_factory, world):
    out = str(tmp_path_factory.mktemp(f"w{world}"))
    mp.spawn(_worker, args=(world, _free_port(), model_path, out), nprocs=world, join=True)
    return [torch.load(os.path.join(out, f"w{world}_rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def world1(model_path, tmp_path_factory):
    return _spawn(model_path, tmp_path_factory, 1)[0]


@pytest.fixture(scope="module")
def world2(model_path, tmp_path_factory):
    return _spawn(model_path, tmp_path_factory, 2)


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_train_step_changes_every_trained_parameter(world1):
    init, after = world1["init"], world1["micro4"]
    for name in after:
        if "embed_tokens" not in name:  # embedding rows of unseen tokens get no gradient
            assert (after[name] - init[name]).abs().max() > 1e-4, name
    m = world1["m_step1"]
    assert m["train/num_tokens"] == 4 + 5 + 6 + 7
    assert m["train/clip_frac"] == 0.0 and abs(m["train/approx_kl"]) < 1e-6  # recomputed old logprobs
    assert m["train/grad_norm"] > 0 and m["train/lr"] == 1e-3


def test_train_step_zero_advantage_leaves_parameters_unchanged(world1):
    assert _max_diff(world1["zero"], world1["init"]) == 0.0
    assert world1["m_zero"]["train/grad_norm"] == 0.0


def test_train_step_micro_batching_invariant(world1):
    assert _max_diff(world1["micro2"], world1["micro4"]) < 1e-5


def _max_grad_diff(a: list, b: list) -> float:
    assert len(a) == len(b) > 0 and max(g.abs().max().item() for g in b[0].values()) > 1e-2
    return max(_max_diff(x, y) for x, y in zip(a, b))


def test_train_step_token_budget_and_chunks_match_one_unchunked_micro_batch(world1):
    # a 24-token budget packs BATCH_1 as [2, 3] (2 x 12 columns) and [1, 0] (2 x 9); logits 5 positions at a time
    assert _max_grad_diff(world1["g_budget"], world1["g_one_micro"]) < 1e-5
    for key in ("train/loss", "train/entropy", "train/num_tokens", "train/grad_norm"):
        assert world1["m_budget"][key] == pytest.approx(world1["m_one_micro"][key], rel=1e-5), key


@pytest.mark.parametrize("world", [1, 2])
def test_train_step_token_budget_with_unequal_rank_packing_matches_one_micro_batch(world, world1, world2):
    # both epochs' updates, their old and reference log-probs computed by token budget too
    grads = (world1 if world == 1 else world2[0])["dist"]["g_tokens"]
    assert len(grads) == 2 and _max_grad_diff(grads, world1["g_tokens_ref"]) < 1e-5


def test_train_step_budget_below_longest_sequence_names_the_key(world1):
    assert world1["budget_error"] == ("train.micro_batch_tokens: expected >= the longest sequence (11 tokens), "
                                      "got 10")


def test_train_step_single_update_reuses_its_forward_as_old_logprobs(world1):
    # one update over the whole batch: old log-probs = the update's own detached forward, no extra pass
    assert _max_diff(world1["explicit_old"], world1["micro2"]) < 1e-6


def test_local_shards_assemble_to_the_full_state_dict(world2):
    full = world2[0]["dist"]["step2"]  # rank 0 full_state_dict of the same trainer
    assembled = trainer_mod.assemble_shards([r["dist"]["local"] for r in world2])
    assert set(assembled) == set(full)
    assert all(torch.equal(assembled[k], full[k]) for k in full)


def test_bucket_parts_and_shard_probes_of_two_ranks_rebuild_the_sent_weights(world2):
    # what WeightSync's object_store transport and its verify get from the ranks, without a gather
    full = world2[0]["dist"]["step2"]
    ranks = [r["dist"] for r in world2]
    assert all(r["finite"] for r in ranks) and [n for n, _ in ranks[0]["shapes"]] == list(full)
    packed = trainer_mod.assemble_shards([r["packed"] for r in ranks])
    assert all(torch.equal(packed[k], v.to(torch.bfloat16)) for k, v in full.items())
    for name, shape in ranks[0]["shapes"]:
        merged = merge_shard_probes([r["probes"][name] for r in ranks], shape, torch.bfloat16)
        assert merged == sent_probe(full[name].to(torch.bfloat16), 64), name


def test_full_state_dict_loads_into_hf_model(world1, model_path):
    sd = world1["micro4"]
    hf = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    assert set(sd) == set(hf.state_dict())
    hf.load_state_dict(sd, strict=True)
    # the plain HF model with these weights reproduces the trainer's log-probs and checksum
    ids, attn, resp = (BATCH_1[k] for k in trainer_mod.TOKEN_KEYS)
    torch.testing.assert_close(logprobs_mod.compute_logprobs(hf, ids, attn, resp), world1["logprobs"])
    assert sum(p.double().sum().item() for p in hf.parameters()) == pytest.approx(world1["checksum"], rel=1e-9)


def test_compute_logprobs_alignment_by_hand(model_path):
    hf = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids = torch.tensor([[0, 0, 5, 9, 17, 3]])  # 2 left pads, prompt [5, 9], response [17, 3]
    attn = torch.tensor([[0, 0, 1, 1, 1, 1]])
    resp = torch.tensor([[0, 0, 0, 0, 1, 1]])
    out = logprobs_mod.compute_logprobs(hf, ids, attn, resp, temperature=2.0)
    with torch.no_grad():
        logits = hf(torch.tensor([[5, 9, 17, 3]])).logits[0] / 2.0  # unpadded, positions 0..3
    expected = [logits[1].log_softmax(-1)[17], logits[2].log_softmax(-1)[3]]
    assert out[0, :4].tolist() == [0.0] * 4
    torch.testing.assert_close(out[0, 4:], torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_train_step_two_ranks_match_one_rank(world1, world2):
    one, two = world1["dist"], world2[0]["dist"]
    assert _max_diff(two["step1"], one["step1"]) < 1e-5
    assert _max_diff(two["step2"], one["step2"]) < 1e-5
    for key in ("train/pg_loss", "train/kl", "train/loss", "train/num_tokens", "train/grad_norm"):
        assert two["m_step2"][key] == pytest.approx(one["m_step2"][key], rel=1e-4, abs=1e-7), key
    assert one["m_step2"]["train/kl"] > 0  # the policy moved away from the reference in step 1
    assert world2[1]["dist"]["full_sd_is_none"] and not one["full_sd_is_none"]


@pytest.mark.parametrize("world", [1, 2])
def test_checkpoint_resume_matches_uninterrupted_run(world, world1, world2):
    res = (world1 if world == 1 else world2[0])["dist"]
    assert _max_diff(res["resumed2"], res["step2"]) == 0.0
    assert res["m_resumed2"] == res["m_step2"]
    assert _max_diff(res["step2"], res["step1"]) > 1e-4
