"""Fault handling, unit by unit (no Ray cluster): the fault plan, NaN skip, draft checks, atomic bounded
checkpoints, the give-up paths and the fault.* keys. The end-to-end run is tests/test_faults.py."""
import json
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from ray.exceptions import ActorDiedError

from er_sglang.config import ConfigError, load_config
from er_sglang.drafter import build_drafter
from er_sglang.policy import SpecPolicy
from er_sglang.reference import ReferenceEngine
from orchestrator import checkpoint, weight_sync
from orchestrator import train as train_mod
from orchestrator import trainer as trainer_mod
from orchestrator.actors import planned_faults
from orchestrator.config import TrainConfig
from tests.test_trainer import BATCH_1, VOCAB
from tests.tiny import tiny_llama


def test_planned_faults_parses_plan_and_rejects_unknown_kinds():
    assert planned_faults("") == {}
    assert planned_faults("engine_kill@1, nan_loss@1,trainer_kill@3") == {1: ["engine_kill", "nan_loss"],
                                                                          3: ["trainer_kill"]}
    for bad in ("kill@1", "engine_kill", "engine_kill@x"):
        with pytest.raises(ValueError, match="ER_TEST_INJECT_FAULTS"):
            planned_faults(bad)


@pytest.fixture
def one_rank(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    trainer_mod.init_process_group(0, 1, master_port=port, backend="gloo")
    yield trainer_mod.FSDPTrainer(str(tmp_path), lr=1e-3, weight_decay=0.0, kl_coef=0.0, micro_batch_size=4)
    dist.destroy_process_group()


def test_trainer_nan_loss_skips_the_update_weights_untouched(one_rank):
    before = {k: v.clone() for k, v in one_rank.full_state_dict().items()}
    m = one_rank.train_step(dict(BATCH_1, advantages=BATCH_1["advantages"] * float("nan")))
    assert m["train/skipped_updates"] == 1.0 and not torch.isfinite(torch.tensor(m["train/loss"]))
    after = one_rank.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not one_rank.optimizer.state  # AdamW never stepped: no moments poisoned by NaN
    m = one_rank.train_step(BATCH_1)  # the next finite batch trains normally
    assert m["train/skipped_updates"] == 0.0
    assert any(not torch.equal(before[k], v) for k, v in one_rank.full_state_dict().items())


@pytest.mark.parametrize("backend", ["rtn", "torchao"])
def test_reference_draft_check_catches_stale_and_corrupt_drafts(backend):
    target = tiny_llama(0)
    try:
        drafter = build_drafter(target, group_size=32, backend=backend)
    except ValueError:
        pytest.skip(f"no {backend} int4 kernel here")
    engine = ReferenceEngine(target, SpecPolicy(mode="rtn", gamma=3), drafter)
    assert engine.draft_check() == {"ok": True, "num_linears": 14, "num_equal": 14}
    with torch.no_grad():  # stale: the target moved (a sync that skipped the drafter)
        target.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    assert engine.draft_check() == {"ok": False, "num_linears": 14, "num_equal": 13}
    assert engine.requantize() > 0 and engine.draft_check()["ok"]
    with torch.no_grad():  # corrupt: the draft's own tensors damaged (what the bad_draft fault does)
        for t in drafter.quantized_linears()["model.layers.1.self_attn.q_proj"].packed_tensors():
            t.copy_(t.flip(0))
    assert engine.draft_check()["num_equal"] == 13
    engine.requantize()
    assert engine.draft_check()["ok"]


class _FakeEngine:
    """An engine actor stand-in whose methods' `.remote` return plain values (ray.get is patched)."""

    def __init__(self, ok: bool, fixable: bool = True):
        self.ok, self.fixable, self.num_requant = ok, fixable, 0
        self.draft_check = SimpleNamespace(remote=lambda: {"ok": self.ok})
        self.requantize = SimpleNamespace(remote=self._requantize)

    def _requantize(self):
        self.num_requant += 1
        self.ok = self.ok or self.fixable
        return 0.1


def test_check_drafts_requantizes_bad_ones_and_raises_if_it_persists(monkeypatch):
    monkeypatch.setattr(weight_sync.ray, "get", lambda x: x)
    good, bad = _FakeEngine(True), _FakeEngine(False)
    assert weight_sync.check_drafts([good, bad]) == 0.0
    assert (good.num_requant, bad.num_requant) == (0, 1)
    assert weight_sync.check_drafts([good, bad]) == 1.0 and bad.num_requant == 1
    with pytest.raises(weight_sync.DraftError, match=r"engine\(s\) \[1\].*even after re-quantizing"):
        weight_sync.check_drafts([good, _FakeEngine(False, fixable=False)])


class _FakeTrainer:
    def __init__(self, fail: bool = False):
        self.save_checkpoint = SimpleNamespace(remote=self._save)
        self.fail = fail

    def _save(self, path):
        if self.fail:
            raise RuntimeError("rank died mid-save")
        torch.save({}, f"{path}.pt")


def test_checkpoint_save_is_atomic_and_keeps_the_newest(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint.ray, "get", lambda x: x)
    engines = [SimpleNamespace(policy_state=SimpleNamespace(remote=lambda: {"rung": 1}))]
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, [_FakeTrainer()], engines, {"pos": step}, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    with pytest.raises(RuntimeError, match="mid-save"):  # a crash mid-save leaves only a hidden partial dir
        checkpoint.save(tmp_path, 4, [_FakeTrainer(fail=True)], engines, {"pos": 4}, keep=2)
    assert checkpoint.latest(tmp_path).name == "step_000003"
    assert (tmp_path / "checkpoints" / ".step_000004.partial").is_dir()
    checkpoint.save(tmp_path, 3, [_FakeTrainer()], engines, {"pos": 33}, keep=2)  # step 3 redone
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000003"]  # the partial is swept, the redo replaced step 3
    assert json.loads((tmp_path / "checkpoints" / "step_000003" / "state.json").read_text())["data"] == {"pos": 33}


def _supervisor(max_engine: int = 0, max_trainer: int = 0, dead_rank=1, dead_engine=0):
    sup = object.__new__(train_mod._Supervisor)
    sup.cfg = SimpleNamespace(fault=SimpleNamespace(max_engine_restarts=max_engine, max_trainer_restarts=max_trainer),
                              checkpoint=SimpleNamespace(keep=1))
    sup.cluster = SimpleNamespace(dead_trainer=lambda exc: dead_rank, dead_engine=lambda exc: dead_engine)
    sup.num_engine_restarts = sup.num_trainer_restarts = 0
    return sup


def test_supervisor_gives_up_with_one_line_beyond_the_retry_limits():
    died = ActorDiedError()
    with pytest.raises(train_mod._GiveUp, match=r"trainer rank 1 died in step 3 .*max_trainer_restarts=0"):
        _supervisor().recover_trainers(died, 3)

    def phase():
        raise died

    with pytest.raises(train_mod._GiveUp, match=r"rollout engine 0 died .*max_engine_restarts=0"):
        _supervisor().engines(phase)
    with pytest.raises(ValueError):  # not a death: the error is the caller's, re-raised unchanged
        _supervisor(dead_rank=None).recover_trainers(ValueError("bug"), 3)


@pytest.mark.parametrize("arg, key", [("fault.accept_collapse_ratio=1.5", "fault.accept_collapse_ratio"),
                                      ("fault.max_engine_restarts=-1", "fault.max_engine_restarts"),
                                      ("fault.max_trainer_restarts=-1", "fault.max_trainer_restarts"),
                                      ("checkpoint.keep=-1", "checkpoint.keep")])
def test_config_fault_keys_are_validated_by_name(arg, key):
    with pytest.raises(ConfigError, match=key):
        load_config(TrainConfig, [arg])
    assert load_config(TrainConfig, ["checkpoint.keep=0"]).checkpoint.keep == 0  # 0 = no checkpoints
