"""Bucketed weight handoff (orchestrator/weight_transfer.py, weight_sync.py): plans, shard probes, the
reference engine's bucket loads, WeightSync's lifecycle with stand-in actors, and the sync.* keys."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from er_sglang.config import ConfigError, load_config
from er_sglang.drafter import build_drafter
from er_sglang.policy import SpecPolicy
from er_sglang.reference import ReferenceEngine
from er_sglang.weight_probe import (
    merge_shard_probes,
    sent_probe,
    sent_probe_mismatch,
    shard_probe,
    tied_aliases,
)
from orchestrator import weight_sync
from orchestrator.actors import RolloutActor
from orchestrator.config import TrainConfig
from orchestrator.weight_transfer import assemble_shards, plan_buckets, resolve_transport, shard_sizes
from tests.tiny import tiny_llama


def test_plan_buckets_keeps_order_packs_greedily_and_gives_a_large_tensor_its_own_bucket():
    shapes = [("a", [4, 8]), ("b", [8]), ("big", [64, 8]), ("c", [2, 8]), ("d", [2, 8])]
    # bf16: a 64 B, b 16 B, big 1024 B, c 32 B, d 32 B; buckets of 100 B
    assert plan_buckets(shapes, torch.bfloat16, 100) == [["a", "b"], ["big"], ["c", "d"]]
    assert plan_buckets(shapes, torch.float32, 100) == [["a"], ["b"], ["big"], ["c"], ["d"]]  # 128, 32, 4096, 64, 64 B
    assert plan_buckets(shapes, torch.float32, 10**6) == [["a", "b", "big", "c", "d"]]
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(shapes, torch.float32, 0)


@pytest.mark.parametrize("dim0,world", [(10, 2), (7, 3), (3, 4), (1, 2), (0, 2), (896, 2)])
def test_shard_sizes_are_torch_chunk_sizes(dim0, world):
    chunks = [len(c) for c in torch.arange(dim0).chunk(world)] if dim0 else []
    assert shard_sizes(dim0, world) == chunks + [0] * (world - len(chunks))


@pytest.mark.parametrize("shape,world", [([7, 5], 3), ([3, 4], 4), ([1000, 3], 2), ([13], 2), ([], 2)])
def test_shard_probes_merge_to_the_whole_tensor_probe(shape, world):
    full = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if full.dim():
        shards = list(full.split(shard_sizes(shape[0], world)))
        offsets = [sum(shard_sizes(shape[0], world)[:r]) for r in range(world)]
    else:
        shards, offsets = [full] * world, list(range(world))  # a 0-dim entry: rank 0 reports it
    parts = [shard_probe(s, shape, o, torch.bfloat16, 64) for s, o in zip(shards, offsets)]
    assert merge_shard_probes(parts, shape, torch.bfloat16) == sent_probe(full.to(torch.bfloat16), 64)
    assert torch.equal(assemble_shards([{"w": s} for s in shards])["w"], full)


def test_sent_probes_catch_one_bf16_ulp_and_a_missing_name():
    full = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    sent = {"w": merge_shard_probes([shard_probe(s, [6, 4], o, torch.bfloat16, 256)
                                     for s, o in zip(full.split([3, 3]), [0, 3])], [6, 4], torch.bfloat16)}
    held = full.to(torch.bfloat16)
    engine_probe = {"w": {"dtype": "bfloat16", "shape": [6, 4], "values": held.reshape(-1).double().tolist()}}
    assert sent_probe_mismatch(sent, engine_probe) is None
    held.view(torch.int16)[4, 1] += 1
    engine_probe["w"]["values"] = held.reshape(-1).double().tolist()
    assert sent_probe_mismatch(sent, engine_probe).startswith("w differs from the weights sent (as bfloat16, "
                                                              "tolerance 0): flat element 17 ")
    assert sent_probe_mismatch(sent, {}) == "w: the engine holds no such parameter"


def _rtn(model) -> ReferenceEngine:
    return ReferenceEngine(model, SpecPolicy("rtn", gamma=3), build_drafter(model, group_size=32, backend="rtn"))


def _new_weights(engine, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in engine.model.state_dict().items()}


def test_reference_bucket_loads_equal_one_update_and_requantize_once_at_the_last():
    whole, buckets = _rtn(tiny_llama(0)), _rtn(tiny_llama(0))
    new = _new_weights(whole, 3)
    whole.update_weights(new)
    buckets.begin_weight_update({k: list(v.shape) for k, v in new.items()})
    names = list(new)
    first = buckets.load_weights([(k, new[k]) for k in names[:5]], last=False)
    assert first["requant_s"] == 0.0 and not buckets.draft_check()["ok"]  # draft still the old weights'
    buckets.load_weights([(k, new[k]) for k in names[5:]], last=True)
    assert buckets.draft_check()["ok"]
    for k, v in whole.model.state_dict().items():
        assert torch.equal(buckets.model.state_dict()[k], v), k


def test_reference_refuses_an_update_with_a_wrong_shape_or_name_before_copying():
    engine = ReferenceEngine(tiny_llama(0), SpecPolicy("no-sd"))
    shapes = {k: list(v.shape) for k, v in engine.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^update_weights: model\.norm\.weight has shape \(3,\), expected"):
        engine.begin_weight_update({**shapes, "model.norm.weight": [3]})
    with pytest.raises(ValueError, match=r"unexpected \['nope'\]"):
        engine.begin_weight_update({**shapes, "nope": [1]})


class _ShardTrainer:
    """A trainer-rank stand-in holding dim-0 shards of a state dict (FSDP2's layout), methods as the actor's."""

    def __init__(self, full: dict, rank: int, world: int):
        self.full, self.rank, self.world, self.packed = full, rank, world, []
        for name in ("weight_shapes", "weights_finite", "pack_bucket", "release_bucket", "sent_probes"):
            setattr(self, name, SimpleNamespace(remote=getattr(self, "_" + name)))

    def _local(self, v):
        if not v.dim():
            return v
        sizes = shard_sizes(v.shape[0], self.world)
        return v.split(sizes)[self.rank]

    def _weight_shapes(self):
        return [(k, list(v.shape)) for k, v in self.full.items()]

    def _weights_finite(self):
        return all(bool(torch.isfinite(self._local(v)).all()) for v in self.full.values())

    def _pack_bucket(self, index, names, dtype, transport, copies=0):
        assert transport == "object_store"
        self.packed.append(list(names))
        return {n: self._local(self.full[n]).to(getattr(torch, dtype)) for n in names}

    def _release_bucket(self, index):
        raise AssertionError("object_store holds nothing to release")

    def _sent_probes(self, dtype, num_values):
        out = {}
        for k, v in self.full.items():
            offset = sum(shard_sizes(v.shape[0], self.world)[:self.rank]) if v.dim() else self.rank
            out[k] = shard_probe(self._local(v), list(v.shape), offset, getattr(torch, dtype), num_values)
        return out


class _Ref:
    """A call that runs at ray.get, as an actor's exception surfaces there."""

    def __init__(self, fn, args, kwargs):
        self.fn, self.args, self.kwargs = fn, args, kwargs


class _Engine:
    """A RolloutActor handle stand-in: handle.method.remote(...) -> _Ref, run by the patched ray.get."""

    def __init__(self, engine):
        self.actor = object.__new__(RolloutActor.__ray_actor_class__)
        self.actor.engine = engine

    def __getattr__(self, name):
        return SimpleNamespace(remote=lambda *a, **k: _Ref(getattr(self.actor, name), a, k))


def _get(x):
    if isinstance(x, list):
        return [_get(v) for v in x]
    return x.fn(*x.args, **x.kwargs) if isinstance(x, _Ref) else x


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setattr(weight_sync.ray, "get", _get)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_sync_buckets_from_two_ranks_reach_every_engine_exactly_and_verify(no_ray, dtype):
    engines = [_rtn(tiny_llama(0).to(dtype)) for _ in range(2)]
    new = _new_weights(ReferenceEngine(tiny_llama(0), SpecPolicy("no-sd")), 5)  # fp32, as FSDP2 holds it
    trainers = [_ShardTrainer(new, r, 2) for r in range(2)]
    sync = weight_sync.WeightSync(trainers, [_Engine(e) for e in engines], verify_every=1, bucket_mb=0.01)
    out = sync.sync()
    buckets = sync.plan()[2]
    assert out["sync/num_buckets"] == len(buckets) > 2 and out["sync/verified"] == 1.0
    assert out["spec/draft_ok"] == 1.0 and trainers[0].packed == trainers[1].packed == buckets
    for e in engines:
        for k, v in new.items():
            assert torch.equal(e.model.state_dict()[k], v.to(dtype)), k
    with torch.no_grad():
        engines[1].model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    with pytest.raises(weight_sync.WeightSyncError, match=r"^weight sync check failed on engine 1: "
                       r"model\.layers\.0\.mlp\.down_proj\.weight differs"):
        sync.verify(*sync.plan()[:2])


def test_weight_sync_refuses_non_finite_weights_and_unknown_names_before_any_bucket(no_ray):
    engine = ReferenceEngine(tiny_llama(0), SpecPolicy("no-sd"))
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    bad = _new_weights(engine, 6)
    bad["model.norm.weight"][0] = float("nan")
    trainers = [_ShardTrainer(bad, r, 2) for r in range(2)]
    with pytest.raises(weight_sync.WeightSyncError, match="NaN/inf; engines keep their previous weights"):
        weight_sync.WeightSync(trainers, [_Engine(engine)]).sync()
    extra = {**_new_weights(engine, 7), "model.extra.weight": torch.zeros(2, 2)}
    trainers = [_ShardTrainer(extra, r, 2) for r in range(2)]
    with pytest.raises(weight_sync.WeightSyncError, match=r"^weight sync refused the update on engine 0: "
                       r"update_weights: missing \[\], unexpected \['model.extra.weight'\]"):
        weight_sync.WeightSync(trainers, [_Engine(engine)]).sync()
    assert all(torch.equal(engine.model.state_dict()[k], v) for k, v in before.items())


def _train_cfg(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, list(overrides))  # what er-train does with key=value arguments


def test_sync_keys_validate_and_auto_picks_the_transport():
    assert resolve_transport(_train_cfg()) == "object_store"  # CPU, reference engine
    with pytest.raises(ConfigError, match=r"^sync\.transport: cuda_ipc needs engine=sglang \(got reference\)"):
        _train_cfg("sync.transport=cuda_ipc")
    with pytest.raises(ConfigError, match=r"^sync\.transport: expected one of \('auto', 'object_store', "):
        _train_cfg("sync.transport=ipc")
    with pytest.raises(ConfigError, match=r"^sync\.bucket_mb: expected a number > 0"):
        _train_cfg("sync.bucket_mb=0")
    gpu = SimpleNamespace(engine="sglang", sync=SimpleNamespace(transport="auto"),
                          cluster=SimpleNamespace(num_gpus=1, placement="colocated", num_engines=1, num_trainers=1))
    assert resolve_transport(gpu) == "cuda_ipc"
    gpu.cluster.placement = "split"
    assert resolve_transport(gpu) == "object_store"


def test_a_tied_head_is_sent_once_and_follows_its_embedding(no_ray):
    from transformers import LlamaConfig, LlamaForCausalLM

    def tied():
        cfg = LlamaConfig(vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()

    engine = ReferenceEngine(tied(), SpecPolicy("no-sd"))
    assert tied_aliases(engine.model) == {"lm_head.weight"}
    new = {k: v for k, v in _new_weights(engine, 8).items() if k != "lm_head.weight"}
    trainers = [_ShardTrainer(new, r, 2) for r in range(2)]
    sync = weight_sync.WeightSync(trainers, [_Engine(engine)], verify_every=1)
    assert sync.sync()["sync/verified"] == 1.0
    held = engine.model.state_dict()
    assert torch.equal(held["lm_head.weight"], new["model.embed_tokens.weight"])
    assert engine.model.lm_head.weight.data_ptr() == engine.model.model.embed_tokens.weight.data_ptr()
