"""The engine interface the orchestrator relies on, on both backends, on CPU.

Policy state and weight checks go through engine methods only (the SGLang engine's policy and weights live in
its scheduler process). The SGLang side runs here for real, without SGLang: `_sglang_like` is an SGLangEngine
whose `rpc` goes, through JSON both ways as on the socket, to the scheduler's `plugin.scheduler_op` and the
worker's `control.handle`, over a stand-in model laid out as SGLang's Llama (stacked qkv / gate_up in bf16,
padded vocabulary, tied head).
"""
import json
import types
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from er_sglang.policy import SpecPolicy
from er_sglang.reference import ReferenceEngine
from er_sglang.sglang import control, plugin
from er_sglang.sglang.engine import SGLangEngine
from er_sglang.sglang.hf_weights import hf_view
from er_sglang.weight_probe import PROBE_NUM_VALUES, probe_index, probe_mismatch, probe_tensor, sent_probe
from orchestrator import checkpoint, weight_sync
from orchestrator import train as train_mod
from orchestrator.actors import RolloutActor
from tests.test_policy import LinearRoofline, rollout
from tests.tiny import tiny_llama

K_ROW = 64 + 3  # qkv_proj row 67 = k_proj row 3 (these Llamas: 4 heads x 16 = 64 q rows, then 2 x 16 k, 2 x 16 v)


# ---- stand-ins ---------------------------------------------------------------------------------------
class _Leaf(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, **attrs):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        for key, value in attrs.items():
            setattr(self, key, value)


def _put(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    *heads, last = path.split(".")
    for head in heads:
        if not hasattr(root, head):
            root.add_module(head, torch.nn.Module())
        root = getattr(root, head)
    root.add_module(last, module)


def sglang_llama(sd: dict, cfg, dtype=torch.bfloat16, vocab_multiple: int = 64) -> torch.nn.Module:
    """A model laid out as SGLang's LlamaForCausalLM after loading HF state dict `sd`: q/k/v and gate/up
    concatenated into qkv_proj / gate_up_proj (with the attributes their weight_loaders read), the vocabulary
    padded to `vocab_multiple` rows, a tied lm_head the embedding module itself."""
    root = torch.nn.Module()
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    vocab = sd["model.embed_tokens.weight"].shape[0]
    pad = torch.zeros(-vocab % vocab_multiple, cfg.hidden_size)
    embed = _Leaf(torch.cat([sd["model.embed_tokens.weight"], pad]).to(dtype))
    _put(root, "model.embed_tokens", embed)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]).to(dtype)
        _put(root, p + "self_attn.qkv_proj", _Leaf(qkv, num_heads=heads, num_kv_heads=kv_heads,
                                                   head_size=head_dim, v_head_size=head_dim))
        gate_up = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]).to(dtype)
        _put(root, p + "mlp.gate_up_proj", _Leaf(gate_up, output_sizes=[cfg.intermediate_size] * 2, tp_size=1))
        for name in ("self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            _put(root, p + name, _Leaf(sd[p + name + ".weight"].to(dtype)))
    _put(root, "model.norm", _Leaf(sd["model.norm.weight"].to(dtype)))
    tied = cfg.tie_word_embeddings
    _put(root, "lm_head", embed if tied else _Leaf(torch.cat([sd["lm_head.weight"], pad]).to(dtype)))
    root.config = SimpleNamespace(tie_word_embeddings=tied)
    return root


def _sglang_like(mode: str, policy: SpecPolicy | None, model: torch.nn.Module) -> SGLangEngine:
    """An SGLangEngine whose scheduler is in this process: rpc -> JSON -> plugin.scheduler_op -> JSON."""
    engine = object.__new__(SGLangEngine)
    engine.mode = mode
    worker = SimpleNamespace(policy=policy)  # what control.handle reads of SelfSpecWorker
    scheduler = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)),
                                draft_worker=SimpleNamespace(control=lambda op, **kw: control.handle(worker, op, **kw))
                                if mode != "no-sd" else None)

    def rpc(op, **kw):
        return json.loads(json.dumps(plugin.scheduler_op(scheduler, op, **json.loads(json.dumps(kw)))))

    engine.rpc = rpc
    return engine


class _Handle:
    """A Ray handle stand-in: handle.method.remote(*args) runs RolloutActor.method now (ray.get patched)."""

    def __init__(self, engine, **overrides):
        self.actor = object.__new__(RolloutActor.__ray_actor_class__)
        self.actor.engine = engine
        self.overrides = overrides

    def __getattr__(self, name):
        return SimpleNamespace(remote=self.overrides.get(name) or getattr(self.actor, name))


class _Trainer:
    save_checkpoint = SimpleNamespace(remote=lambda path: None)
    load_checkpoint = SimpleNamespace(remote=lambda path: None)


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setattr(weight_sync.ray, "get", lambda x: x)  # one `ray` module: checkpoint's and train's too


def _adaptive() -> SpecPolicy:
    return SpecPolicy("adaptive", gamma=7, roofline=LinearRoofline())


def _llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


# ---- policy state ------------------------------------------------------------------------------------
def test_checkpoint_round_trips_policy_state_of_an_engine_without_a_policy_attribute(no_ray, tmp_path):
    model = _llama(tie=False)
    policy = _adaptive()
    engine = _sglang_like("adaptive", policy, model)
    assert not hasattr(engine, "policy")  # reachable through policy_state / load_policy_state only
    rollout(policy, 0.95)
    rollout(policy, 0.96)  # two rollouts at >= 0.94: one rung up, 7 -> 9
    assert policy.gamma == 9
    checkpoint.save(tmp_path, 3, [_Trainer()], [_Handle(engine)], {"pos": 3}, keep=1)
    saved = checkpoint.read_state(checkpoint.latest(tmp_path))["policies"]
    assert saved[0]["gamma"] == 9 and saved[0]["accept_rate_prev"] == pytest.approx(0.96)

    fresh_policy = _adaptive()  # a new engine process starts at the configured gamma
    fresh = _sglang_like("adaptive", fresh_policy, model)
    checkpoint.load(checkpoint.latest(tmp_path), [_Trainer()], [_Handle(fresh), _Handle(fresh)])
    assert fresh_policy.gamma == 9 and fresh.policy_state() == policy.state_dict()


def test_engine_restart_gets_its_policy_state_back_through_the_engine(no_ray):
    policy = _adaptive()
    engine = _sglang_like("adaptive", policy, _llama(tie=False))
    rollout(policy, 0.80)  # down-streak 1
    before = engine.policy_state()
    rollout(policy, 0.80)  # the step that is lost: the down-streak completes, 7 -> 5
    assert policy.gamma == 5
    sup = object.__new__(train_mod._Supervisor)
    sup.policies = [before]
    sup.sync = SimpleNamespace(sync=dict)
    sup.cluster = SimpleNamespace(engines=[_Handle(engine, stats=lambda reset=False: None)],
                                  wait_engines=lambda: None)
    sup._revive_engines()
    assert policy.gamma == 7 and policy.num_down_streak == 1 and engine.policy_state() == before


def test_policy_state_is_json_and_none_without_speculation():
    ref = ReferenceEngine(tiny_llama(0), _adaptive(), drafter=object())
    ref.policy.observe(7, [7, 2, 0])
    ref.end_rollout()
    state = ref.policy_state()
    assert json.loads(json.dumps(state, allow_nan=False)) == state
    other = ReferenceEngine(tiny_llama(0), _adaptive(), drafter=object())
    other.load_policy_state(state)
    other.load_policy_state(None)  # None keeps the state
    assert other.policy_state() == state
    plain = _sglang_like("no-sd", None, _llama(tie=False))
    assert plain.policy_state() is None
    plain.load_policy_state(None)


# ---- weight checks -----------------------------------------------------------------------------------
def test_probe_index_spreads_over_the_whole_tensor():
    assert probe_index(10, 4).tolist() == [0, 2, 5, 7]  # i * 10 // 4
    assert probe_index(3, 256).tolist() == [0, 1, 2]
    assert probe_index(0, 8).tolist() == []
    assert probe_index(64 * 64, PROBE_NUM_VALUES)[-1] == 255 * 16  # the last row of a 64 x 64 weight


def test_probe_bf16_copy_is_bit_equal_and_one_ulp_is_caught():
    sent = {"w": torch.randn(8, 8, generator=torch.Generator().manual_seed(0))}
    held = sent["w"].to(torch.bfloat16)
    assert probe_mismatch(sent, {"w": probe_tensor(held, [8, 8], 256)}) is None
    off = held.clone()
    off.view(torch.int16)[2, 5] += 1  # one bf16 ulp
    assert off[2, 5] != held[2, 5]
    msg = probe_mismatch(sent, {"w": probe_tensor(off, [8, 8], 256)})
    assert msg.startswith("w differs from the weights sent (as bfloat16, tolerance 0): flat element 21 ")
    assert probe_mismatch(sent, {}) == "w: the engine holds no such parameter"
    assert probe_mismatch(sent, {"w": probe_tensor(held[:4], [8, 8], 256)}) == "w: shape (4, 8) on the engine, (8, 8) sent"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_weights_probe_passes_a_sync_and_names_a_corrupted_parameter(dtype):
    engine = ReferenceEngine(tiny_llama(0).to(dtype), SpecPolicy("no-sd"))
    gen = torch.Generator().manual_seed(1)
    sent = {k: v.float() + 0.05 * torch.randn(v.shape, generator=gen) for k, v in engine.model.state_dict().items()}
    engine.update_weights(sent)
    shapes = {k: list(v.shape) for k, v in sent.items()}
    assert probe_mismatch(sent, engine.weights_probe(shapes, PROBE_NUM_VALUES)) is None
    with torch.no_grad():
        engine.model.model.layers[1].mlp.up_proj.weight[-1].mul_(2.0)  # last row: probed too
    msg = probe_mismatch(sent, engine.weights_probe(shapes, PROBE_NUM_VALUES))
    assert msg.startswith(f"model.layers.1.mlp.up_proj.weight differs from the weights sent (as {str(dtype)[6:]}")


@pytest.mark.parametrize("tie", [False, True])
def test_hf_view_maps_stacked_qkv_gate_up_padding_and_tied_head(tie):
    hf = _llama(tie)
    sd, cfg = hf.state_dict(), hf.config
    model = sglang_llama(sd, cfg)
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.1.self_attn.v_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.0.mlp.up_proj.weight", "model.norm.weight"):
        assert torch.equal(hf_view(model, name), bf16[name]), name
    assert hf_view(model, "lm_head.weight").shape == (64, 64)  # padded: the probe cuts it to the sent shape
    assert hf_view(model, "model.layers.0.self_attn.nope.weight") is None
    engine = _sglang_like("no-sd", None, model)
    shapes = {k: list(v.shape) for k, v in sd.items()}
    assert probe_mismatch(sd, engine.weights_probe(shapes, PROBE_NUM_VALUES)) is None


def test_weight_sync_verify_names_the_engine_and_the_first_bad_parameter(no_ray):
    hf = _llama(tie=True)
    sent = hf.state_dict()
    good = _sglang_like("adaptive", _adaptive(), sglang_llama(sent, hf.config))
    ref = ReferenceEngine(_llama(tie=True), SpecPolicy("no-sd"))
    ref.update_weights(sent)
    swapped = sglang_llama(sent, hf.config)  # k and v loaded into each other's rows: a mapping bug
    qkv = swapped.get_parameter("model.layers.0.self_attn.qkv_proj.weight").data
    qkv[64:96], qkv[96:128] = qkv[96:128].clone(), qkv[64:96].clone()
    engines = [_Handle(ref), _Handle(good)]
    probes = {name: sent_probe(t, PROBE_NUM_VALUES) for name, t in sent.items()}
    shapes = {name: list(t.shape) for name, t in sent.items()}

    def verify():
        weight_sync.check_engines(engines, probes, shapes)

    verify()
    engines.append(_Handle(_sglang_like("no-sd", None, swapped)))
    with pytest.raises(weight_sync.WeightSyncError, match=r"^weight sync check failed on engine 2: "
                       r"model\.layers\.0\.self_attn\.k_proj\.weight differs from the weights sent \(as bfloat16"):
        verify()
    engines[2] = _Handle(_sglang_like("no-sd", None, sglang_llama(sent, hf.config)))
    verify()
    bad = sglang_llama(sent, hf.config)
    bad.get_parameter("model.layers.1.self_attn.qkv_proj.weight").data[K_ROW] += 1.0
    engines[0] = _Handle(_sglang_like("no-sd", None, bad))
    with pytest.raises(weight_sync.WeightSyncError, match=r"engine 0: model\.layers\.1\.self_attn\.k_proj\.weight "):
        verify()


def test_sglang_begin_weight_update_checks_names_and_shapes_on_its_model():
    hf = _llama(tie=True)
    sent = hf.state_dict()
    engine = _sglang_like("no-sd", None, sglang_llama(sent, hf.config))
    assert engine.weights_dtype() == "bfloat16"
    shapes = {k: list(v.shape) for k, v in sent.items()}
    engine.begin_weight_update(shapes)
    rows, cols = shapes["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=rf"^update_weights: model\.layers\.0\.mlp\.up_proj\.weight: shape "
                                         rf"\({rows}, {cols}\) on the engine, \({rows + 1}, {cols}\) sent"):
        engine.begin_weight_update({**shapes, "model.layers.0.mlp.up_proj.weight": [rows + 1, cols]})
    with pytest.raises(ValueError, match=r"^update_weights: model\.nope\.weight: the engine holds no such parameter"):
        engine.begin_weight_update({**shapes, "model.nope.weight": [2]})


def test_sglang_warmup_decodes_at_every_candidate_gamma_and_puts_the_state_back():
    calls, engine = [], object.__new__(SGLangEngine)
    engine.mode, engine._num_calls, forced = "argmax", 7, {"gamma": None}
    policy = {"state": {"accept_rate_prev": 0.9}}

    def rpc(op, **kw):
        calls.append((op, kw))
        if op == "set_gamma":
            forced["gamma"] = None if kw["gamma"] < 0 else kw["gamma"]
        if op == "load_policy_state":
            policy["state"] = kw["state"]
        return {"candidates": [0, 1, 3], "policy": dict(policy["state"]), "num_steps": 0}

    def generate(prompts, params, **extra):
        engine._num_calls += 1
        policy["state"] = {"accept_rate_prev": 0.1}  # what warm-up decoding does to the live policy
        calls.append(("generate", forced["gamma"], extra))
        return []

    engine.rpc, engine.generate = rpc, generate
    engine.stats = lambda reset=False: calls.append(("stats", reset))
    assert engine.warmup() >= 0
    assert [c[1] for c in calls if c[0] == "generate"] == [0, 1, 3]
    assert all(c[2] == {"ignore_eos": True} for c in calls if c[0] == "generate")
    assert forced["gamma"] is None and policy["state"] == {"accept_rate_prev": 0.9}
    assert ("stats", True) in calls and engine._num_calls == 7
    engine.mode, calls[:] = "no-sd", []
    assert engine.warmup() >= 0  # no-sd decodes once too (a first timed rollout must not pay the compiles)
    assert [c[0] for c in calls] == ["generate", "stats"] and engine._num_calls == 7


def test_sglang_sleep_and_wake_are_idempotent_and_wake_marks_the_draft_stale(monkeypatch):
    """SGLang raises on releasing a released tag or resuming an unreleased one (and its scheduler then takes the
    engine down): a fault path that wakes a restarted (awake) engine, or sleeps twice, must be a no-op."""
    from er_sglang.sglang import engine as sgl_engine

    calls, engine = [], object.__new__(SGLangEngine)
    engine.mode, engine.memory, engine.is_asleep, engine._gpu_id = "argmax", {}, False, 0
    engine.engine = types.SimpleNamespace(
        release_memory_occupation=lambda tags: calls.append(("release", tuple(tags))),
        resume_memory_occupation=lambda tags: calls.append(("resume", tuple(tags))))
    engine.rpc = lambda op, **kw: calls.append((op,))
    monkeypatch.setattr(sgl_engine, "_gpu_used_gib", lambda gpu_id=0: None)
    assert engine.wake() == {} and calls == []  # awake: nothing to resume
    assert "timing/sleep_s" in engine.sleep() and engine.is_asleep
    assert engine.sleep() == {}  # already asleep
    assert "timing/wake_s" in engine.wake() and not engine.is_asleep
    assert engine.wake() == {}
    tags = tuple(sgl_engine.MEMORY_TAGS)
    assert calls == [("release", tags), ("resume", tags), ("mark_stale",)]
