"""The CPU drafter's int4 grid follows spec.draft_kernel (er_sglang/drafter.py, er_sglang/int4_linear.py): auto / tinygemm = torchao's float
zero point, marlin / gemlite = the GPU drafter's integer zero point (IntZeroInt4Linear, bit for bit
marlin_int4.dequantize_rtn(quantize_rtn(w))); requantized in place, checked bitwise, still lossless; the key's
config values and SGLangEngine.from_config's auto -> marlin."""
from types import SimpleNamespace

import pytest
import torch

from er_sglang.config import ConfigError, RolloutJob, SpecConfig, load_config
from er_sglang.draft_vocab import install_subset_head
from er_sglang.drafter import build_drafter
from er_sglang.engine import SamplingParams
from er_sglang.int4_linear import IntZeroInt4Linear, RtnInt4Linear, TorchaoInt4Linear
from er_sglang.policy import SpecPolicy
from er_sglang.reference import ReferenceEngine
from er_sglang.sglang import marlin_int4 as mi
from tests.stats import chi2_pvalue
from tests.test_reference import PROMPT, _exact_marginals
from tests.tiny import tiny_llama


def _marlin_w_hat(w: torch.Tensor, g: int) -> torch.Tensor:
    """What the GPU's Marlin twin multiplies by: dequantize_rtn(quantize_rtn(w)) (bf16), as fp32."""
    return mi.dequantize_rtn(*mi.quantize_rtn(w.detach(), g), g).float()


def _int_zero(seed=0, head="shared", kernel="marlin"):
    target = tiny_llama(seed)
    return target, build_drafter(target, group_size=32, backend="auto", head=head, kernel=kernel)


def test_int_zero_linear_by_hand_keeps_zero_where_float_zero_shifts_it():
    # group [-7/16, 23/16, 0, ...]: s = 30/16 / 15 = 1/8 on both grids; integer zero z = -round(-3.5) = 4, so the
    # grid is k/8 (0 exact, the max clamps to 11/8); the float zero's grid starts at -7/16 (0 -> -7/16 + 4/8)
    w = torch.zeros(1, 32)
    w[0, :2] = torch.tensor([-0.4375, 1.4375])
    int_zero, float_zero = IntZeroInt4Linear(w, None, 32), RtnInt4Linear(w, None, 32)
    assert int_zero.w_hat[0, :3].tolist() == [-0.5, 1.375, 0.0]
    assert float_zero.w_hat[0, :3].tolist() == [-0.4375, 1.4375, 0.0625]
    assert int_zero.zeros.dtype == torch.uint8 and int_zero.zeros.tolist() == [[4]]
    assert int_zero.scales.tolist() == [[0.125]]


@pytest.mark.parametrize("kernel", ["marlin", "gemlite"])
def test_int_zero_drafter_weights_equal_marlin_dequantize(kernel):
    target, drafter = _int_zero(kernel=kernel)
    assert drafter.backend == "rtn_int_zero"  # backend auto: torchao has no integer-zero CPU kernel
    for name, lin in drafter.quantized_linears().items():
        w = target.get_submodule(name).weight
        assert isinstance(lin, IntZeroInt4Linear) and lin.w_hat.dtype == w.dtype
        assert torch.equal(lin.w_hat, _marlin_w_hat(w, 32)) and torch.equal(lin.dequantize(), _marlin_w_hat(w, 32))
    float_zero = build_drafter(target, group_size=32, backend="rtn", kernel="tinygemm")
    name = "model.layers.0.mlp.down_proj"
    assert not torch.equal(drafter.quantized_linears()[name].w_hat, float_zero.quantized_linears()[name].w_hat)


@pytest.mark.parametrize("kernel", ["auto", "tinygemm"])
def test_float_zero_kernels_keep_todays_cpu_drafter(kernel):
    target = tiny_llama(0)
    drafter = build_drafter(target, group_size=32, backend="rtn", kernel=kernel)
    today = build_drafter(target, group_size=32, backend="rtn")
    assert drafter.backend == "rtn" and all(type(m) is RtnInt4Linear for m in drafter.quantized_linears().values())
    for name, lin in drafter.quantized_linears().items():
        assert torch.equal(lin.w_hat, today.quantized_linears()[name].w_hat)


def test_int_zero_requantize_in_place_after_weight_update():
    target, drafter = _int_zero()
    lins = drafter.quantized_linears()
    ptrs = {n: [t.data_ptr() for t in m.packed_tensors() + [m.w_hat]] for n, m in lins.items()}
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert drafter.check()["num_equal"] == 0  # every twin is stale
    drafter.requantize()
    assert drafter.check()["all_equal"]
    assert {n: [t.data_ptr() for t in m.packed_tensors() + [m.w_hat]] for n, m in lins.items()} == ptrs
    for name, lin in lins.items():
        assert torch.equal(lin.w_hat, _marlin_w_hat(target.get_submodule(name).weight, 32))
    name = "model.layers.1.self_attn.q_proj"  # a bucket: only its linears are requantized, from its tensors
    new = torch.randn(64, 64)
    drafter.requantize({f"{name}.weight": new})
    assert torch.equal(lins[name].w_hat, _marlin_w_hat(new, 32)) and drafter.check()["num_equal"] == 13


@pytest.mark.parametrize("buffer", ["w_hat", "zeros", "qweight"])
def test_int_zero_check_catches_a_stale_twin(buffer):
    _, drafter = _int_zero()
    assert drafter.check() == {"num_linears": 14, "num_equal": 14, "head_equal": True, "all_equal": True}
    lin = drafter.quantized_linears()["model.layers.0.mlp.up_proj"]
    getattr(lin, buffer).view(-1)[0] += 1  # one code, zero point or cached weight off
    report = drafter.check()
    assert report["num_equal"] == 13 and not report["all_equal"]


def test_int4_head_follows_the_scheme():
    target, drafter = _int_zero(head="int4")
    head = drafter.model.get_output_embeddings()
    assert isinstance(head.linear, IntZeroInt4Linear) and head.backend == "rtn_int_zero"
    assert torch.equal(head.linear.dequantize(), _marlin_w_hat(target.lm_head.weight, 32))
    ids = torch.tensor([1, 4, 9, 16, 20, 25, 30, 31])
    sub = install_subset_head(drafter.model, ids)  # a narrowed head keeps the integer-zero grid
    assert isinstance(sub.linear, IntZeroInt4Linear)
    assert torch.equal(sub.linear.dequantize(), _marlin_w_hat(target.lm_head.weight[ids], 32))
    assert drafter.check()["head_equal"]
    float_head = build_drafter(target, group_size=32, backend="rtn", head="int4").model.get_output_embeddings()
    assert type(float_head.linear) is RtnInt4Linear


def test_build_drafter_refuses_torchao_with_int_zero_and_unknown_kernels():
    target = tiny_llama(0)
    with pytest.raises(ValueError, match=r"backend='torchao' has no CPU kernel for spec.draft_kernel='marlin'"):
        build_drafter(target, group_size=32, backend="torchao", kernel="marlin")
    with pytest.raises(ValueError, match=r"spec.draft_kernel: expected one of \('auto', 'marlin', 'tinygemm', "):
        build_drafter(target, group_size=32, kernel="exllama")


def test_int_zero_drafter_greedy_sd_equals_ar():
    target = tiny_llama(0)
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    prompts = [PROMPT, [3, 4], [7, 7, 7, 7, 7, 1]]
    ar = ReferenceEngine(target, SpecPolicy(mode="no-sd"), None).generate(prompts, params)
    drafter = build_drafter(target, group_size=32, backend="rtn", kernel="marlin")
    sd = ReferenceEngine(target, SpecPolicy(mode="rtn", gamma=4), drafter).generate(prompts, params)
    assert [r.output_ids for r in sd] == [r.output_ids for r in ar]


def test_int_zero_drafter_preserves_target_distribution():
    target = tiny_llama(0)
    drafter = build_drafter(target, group_size=32, backend="rtn", kernel="marlin")
    engine = ReferenceEngine(target, SpecPolicy(mode="rtn", gamma=2), drafter)
    outs = engine.generate([PROMPT] * 3000, SamplingParams(max_new_tokens=3, seed=11))
    exact = _exact_marginals(target, PROMPT, 3)
    tokens = torch.tensor([r.output_ids for r in outs])
    assert engine.stats().num_accepted < engine.stats().num_drafted  # some rejections: the residual is exercised
    assert min(chi2_pvalue(torch.bincount(tokens[:, k], minlength=32), exact[k]) for k in (1, 2)) > 1e-4


# ---- the key -------------------------------------------------------------------------------------------------

def test_spec_draft_kernel_values_default_auto_and_one_line_error():
    assert SpecConfig().draft_kernel == "auto"
    for kernel in ("auto", "marlin", "tinygemm", "gemlite"):
        assert load_config(RolloutJob, [f"spec.draft_kernel={kernel}"]).spec.draft_kernel == kernel
    with pytest.raises(ConfigError) as exc:
        load_config(RolloutJob, ["spec.draft_kernel=atuo"])
    msg = str(exc.value)
    assert "\n" not in msg and "did you mean 'auto'?" in msg
    assert msg.startswith("spec.draft_kernel: expected one of ('marlin', 'tinygemm', 'gemlite') or 'auto', got 'atuo'")


def _captured_sglang_spec(tmp_path, overrides) -> dict:
    from er_sglang.sglang.engine import SGLangEngine

    started = {}

    class _Captured(SGLangEngine):  # from_config's spec dict, no SGLang started
        def __init__(self, model_path, spec, sglang_args=None):
            started.update(spec=spec)

        def warmup(self, max_new_tokens=12):
            return 0.0

    _Captured.from_config(load_config(RolloutJob, ["engine=sglang", "spec.mode=rtn", f"model.path={tmp_path}",
                                                   *overrides]))
    return started["spec"]


@pytest.mark.parametrize("value, worker", [(None, "marlin"), ("auto", "marlin"), ("marlin", "marlin"),
                                           ("tinygemm", "tinygemm"), ("gemlite", "gemlite")])
def test_sglang_from_config_maps_auto_to_marlin(tmp_path, value, worker):
    overrides = [] if value is None else [f"spec.draft_kernel={value}"]
    assert _captured_sglang_spec(tmp_path, overrides)["draft_kernel"] == worker  # the worker never sees auto


@pytest.mark.parametrize("value, backend, cls", [("auto", "rtn", RtnInt4Linear), ("tinygemm", "rtn", RtnInt4Linear),
                                                 ("marlin", "rtn_int_zero", IntZeroInt4Linear),
                                                 ("gemlite", "rtn_int_zero", IntZeroInt4Linear)])
def test_reference_from_config_builds_the_drafter_of_the_key(tmp_path, monkeypatch, value, backend, cls):
    import transformers

    from er_sglang import models

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda path, dtype: tiny_llama(0))
    monkeypatch.setattr(models, "load_tokenizer", lambda path: None)
    monkeypatch.setattr(models, "model_info", lambda path, tok: SimpleNamespace(stop_token_ids=[0]))
    cfg = load_config(RolloutJob, ["spec.mode=rtn", f"model.path={tmp_path}", "spec.group_size=32",
                                   "spec.drafter_backend=rtn", f"spec.draft_kernel={value}"])
    drafter = ReferenceEngine.from_config(cfg).drafter
    assert drafter.backend == backend
    assert all(type(m) is cls for m in drafter.quantized_linears().values())
    assert not any(isinstance(m, TorchaoInt4Linear) for m in drafter.quantized_linears().values())


# ---- scripts/draft_vocab.py --schemes (draft_vocab_schemes.py): its shared-KV scoring is the engine's drafting -

def test_shared_kv_accept_equals_step_by_step_drafting():
    from transformers import DynamicCache

    from scripts.draft_vocab_schemes import shared_kv_accept

    target = tiny_llama(0)
    drafter = build_drafter(target, group_size=32, backend="rtn", kernel="marlin")
    prompt, out = [1, 5, 9, 2, 7], [3, 8, 4, 4, 11, 2, 9]
    sums, lengths = shared_kv_accept(target, {"d": drafter}, [prompt], [out], 3)
    ids, want = prompt + out, [0.0] * 3
    with torch.no_grad():
        for i in range(len(out)):
            pos = len(prompt) - 1 + i  # the position that emitted out[i]
            p = torch.softmax(target(torch.tensor([ids[:pos + 1]])).logits[0, -1], -1)
            for j in (1, 2, 3):  # the target's KV up to pos - j, the drafter runs the last j tokens
                cache, start = DynamicCache(config=target.config), pos - j + 1
                target(torch.tensor([ids[:start]]), past_key_values=cache, use_cache=True)
                q = torch.softmax(drafter.model(torch.tensor([ids[start:pos + 1]]), past_key_values=cache, use_cache=True,
                                                position_ids=torch.arange(start, pos + 1)[None]).logits[0, -1], -1)
                want[j - 1] += float(torch.minimum(p, q).sum())
    assert lengths == [7] and sums["d"][0] == pytest.approx(want, rel=2e-4)


def test_integer_zero_grid_keeps_its_resolution_on_narrow_groups():
    # a group narrower than 15 * 2^-7 = 0.117 (84% of Qwen2.5-0.5B's): the step must follow the group's range,
    # not torchao's default floor for bf16 scales (2^-7), which cost 0.02 of paired acceptance (benchmarks §9b)
    from er_sglang.sglang.marlin_int4 import dequantize_rtn, quantize_rtn

    w = torch.linspace(-0.015, 0.015, 128).reshape(1, 128)
    q, s, z = quantize_rtn(w)
    assert float(s.max()) < 2**-7 / 3
    assert float((dequantize_rtn(q, s, z).float() - w).abs().max()) <= float(s.max()) * 0.6  # s/2 + bf16 s
