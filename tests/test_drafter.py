"""CPU tests of the int4 self-drafter (er_sglang/drafter.py, er_sglang/int4_linear.py) on tiny random Llama models."""
import pytest
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from er_sglang.drafter import build_drafter
from er_sglang.int4_linear import (
    RtnInt4Linear,
    TorchaoInt4Linear,
    choose_group_size,
    dequantize_rtn,
    quantize_rtn,
    torchao_fits,
)

HAS_TORCHAO = torchao_fits(torch.zeros(16, 128), 128)
BACKENDS = ["rtn", pytest.param("torchao", marks=pytest.mark.skipif(not HAS_TORCHAO, reason="no torchao"))]
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=512,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).float().eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||"""
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def target():
    """Shared by the tests that do not change weights (builds are slow-ish on a busy 2-core CPU)."""
    return tiny_llama()


@pytest.fixture(scope="module")
def drafters(target):
    backends = ["rtn", "torchao"] if HAS_TORCHAO else ["rtn"]
    return {b: build_drafter(target, backend=b) for b in backends}


def test_drafter_quantizes_every_decoder_linear(target, drafters):
    drafter = drafters["rtn"]
    assert type(drafter.model) is LlamaForCausalLM
    assert drafter.num_quantized == 2 * 7
    for i, layer in enumerate(drafter.model.model.layers):
        for name in LINEAR_NAMES:
            block = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
            assert isinstance(getattr(block, name), RtnInt4Linear), (i, name)
    assert not any(isinstance(m, nn.Linear) for m in drafter.model.model.layers.modules())
    assert drafter.group_sizes["model.layers.1.mlp.down_proj"] == 128
    # the target is untouched
    assert isinstance(target.model.layers[0].self_attn.q_proj, nn.Linear)


def test_drafter_shares_embeddings_lm_head_norms_with_target(target, drafters):
    drafter = drafters["rtn"]
    d, t = drafter.model, target
    pairs = [(d.model.embed_tokens.weight, t.model.embed_tokens.weight), (d.lm_head.weight, t.lm_head.weight),
             (d.model.norm.weight, t.model.norm.weight),
             (d.model.rotary_emb.inv_freq, t.model.rotary_emb.inv_freq)]
    for i in range(2):
        pairs += [(d.model.layers[i].input_layernorm.weight, t.model.layers[i].input_layernorm.weight),
                  (d.model.layers[i].post_attention_layernorm.weight,
                   t.model.layers[i].post_attention_layernorm.weight)]
    for a, b in pairs:
        assert a is b and a.data_ptr() == b.data_ptr()
    # embed 512·256 + lm_head 512·256 + 5 norms of 256 (fp32) + inv_freq and original_inv_freq (32 each)
    assert drafter.weight_bytes()["shared_bytes"] == 4 * (2 * 512 * 256 + 5 * 256 + 2 * 32)


def test_drafter_weight_bytes_hand_computed(drafters):
    wb = drafters["rtn"].weight_bytes()
    # per layer q,o 256·256; k,v 128·256; gate,up,down 512·256 -> 589,824 weights; 2 layers
    numel = 2 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 512 * 256)
    assert wb["target_dtype"] == "float32" and wb["target_linear_bytes"] == 4 * numel
    # int4 codes: numel/2 bytes; per group of 128: bf16 scale + bf16 zero = 4 bytes
    assert wb["draft_linear_bytes"] == numel // 2 + numel // 128 * 4
    assert wb["ratio_vs_bf16"] == pytest.approx((0.5 + 4 / 128) / 2)  # 0.265625
    assert wb["ratio"] == pytest.approx((0.5 + 4 / 128) / 4)
    assert wb["draft_cache_bytes"] == 4 * numel  # rtn's fp32 dequantized cache


@pytest.mark.parametrize("backend", BACKENDS)
def test_drafter_requantize_in_place_equals_fresh_build(backend):
    target = tiny_llama()
    drafter = build_drafter(target, backend=backend)
    assert drafter.backend == backend
    packed = {n: m.packed_tensors() for n, m in drafter.quantized_linears().items()}
    ptrs = {n: [t.data_ptr() for t in ts] for n, ts in packed.items()}
    before = {n: [t.clone() for t in ts] for n, ts in packed.items()}
    with torch.no_grad():  # a "training step": new target weights loaded in place
        for p in target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    seconds = drafter.requantize()
    assert seconds > 0
    fresh = build_drafter(target, backend=backend)
    ids = torch.randint(0, 512, (2, 7))
    for name, module in drafter.quantized_linears().items():
        new = module.packed_tensors()
        assert [t.data_ptr() for t in new] == ptrs[name]
        assert not torch.equal(new[0], before[name][0])  # the codes really changed
        for a, b in zip(new, fresh.quantized_linears()[name].packed_tensors()):
            assert torch.equal(a, b), name
    assert torch.equal(drafter.model(input_ids=ids).logits, fresh.model(input_ids=ids).logits)


def test_drafter_requantize_state_dict_refreshes_only_its_linears():
    target = tiny_llama()
    drafter = build_drafter(target, backend="rtn")
    name = "model.layers.0.mlp.up_proj"
    w_new = target.get_submodule(name).weight.detach() + 0.05
    others = {n: m.qweight.clone() for n, m in drafter.quantized_linears().items() if n != name}
    drafter.requantize({f"{name}.weight": w_new})
    assert torch.equal(drafter.quantized_linears()[name].qweight, RtnInt4Linear(w_new, None, 128).qweight)
    for n, q in others.items():
        assert torch.equal(drafter.quantized_linears()[n].qweight, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drafter_runs_on_target_dynamic_cache(backend, target, drafters):
    drafter = drafters[backend]
    prompt = torch.randint(0, 512, (1, 6))
    nxt = torch.randint(0, 512, (1, 4))
    cache = DynamicCache(config=target.config)
    with torch.no_grad():
        target(input_ids=prompt, past_key_values=cache, use_cache=True)
        # 3 draft steps on the target's cache, then crop them away (as the reference engine does)
        for j in range(3):
            out = drafter.model(input_ids=nxt[:, j:j + 1], position_ids=torch.tensor([[6 + j]]),
                                past_key_values=cache, use_cache=True)
            assert out.logits.shape == (1, 1, 512)
        assert cache.get_seq_length() == 9
        cache.crop(-3)
        assert cache.get_seq_length() == 6
        step = target(input_ids=nxt[:, :1], position_ids=torch.tensor([[6]]), past_key_values=cache,
                      use_cache=True).logits[0, -1]
        full = target(input_ids=torch.cat([prompt, nxt[:, :1]], 1)).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drafter_logits_close_to_target(backend, target, drafters):
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        lt, ld = target(input_ids=ids).logits, drafters[backend].model(input_ids=ids).logits
    # random init is a harsh yardstick: with 0.02-std weights the residual stream is made of the
    # quantized layers' outputs (each ~10% off, see the next test), not of the shared embeddings;
    # 17-25% measured (torch 2.11 and 2.13); a broken quantizer gives ~100%
    assert 0 < rel_err(ld, lt) < 0.3


def test_drafter_linear_error_matches_int4_theory():
    # Gaussian weights, group 128: range ~ 2·2.6σ -> step s ~ 0.35σ, RTN error uniform in ±s/2
    # -> rms s/sqrt(12) ~ 0.10σ, so the output of one int4 linear is ~10% off
    torch.manual_seed(2)
    w, x = torch.randn(256, 1024), torch.randn(64, 1024)
    err = rel_err(RtnInt4Linear(w, None, 128)(x), x @ w.T)
    assert 0.09 < err < 0.11, err


def test_drafter_rtn_codes_hand_computed():
    # one group of 16: w = -1 + 0.25·k -> min -1, max 2.75, s = 3.75/15 = 0.25, zero = -1 + 8·0.25 = 1
    w = (-1 + 0.25 * torch.arange(16.0)).reshape(1, 16)
    w[0, 5] = 0.1  # (0.1 + 1) / 0.25 = 4.4 -> code 4 -> w_hat = (4 - 8)·0.25 + 1 = 0
    codes, scales, zeros = quantize_rtn(w, 16)
    assert scales.item() == 0.25 and zeros.item() == 1.0
    expected = torch.arange(16, dtype=torch.uint8)
    expected[5] = 4
    assert torch.equal(codes[0], expected)
    assert dequantize_rtn(codes, scales, zeros)[0, 5].item() == 0.0


def test_drafter_rtn_error_is_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(64, 512) * 0.02 + torch.randn(64, 1) * 0.01  # row offsets: zeros far from 0
    codes, scales, zeros = quantize_rtn(w, 128)
    err = (w.bfloat16().float() - dequantize_rtn(codes, scales, zeros)).abs().reshape(64, 4, 128)
    s = scales.float().unsqueeze(-1)
    # RTN: |w - w_hat| <= s/2; torchao's bf16 arithmetic (rounded w - grid_min, rounded quotient up to
    # 15.5, rounded zero) moves a value by < 1/8 step (0.566 s measured): an off-by-one code would be 1 s
    assert (err <= s * (0.5 + 2 ** -3)).all()
    assert (err > 0.5 * s).float().mean() < 0.05
    assert (err.amax(-1) > 0.4 * s.squeeze(-1)).all()  # and the bound is nearly reached: really 4-bit
    # the grid spans each group's [min, max]: codes 0 and 15 both occur in every group
    cg = codes.reshape(64, 4, 128)
    assert (cg.amin(-1) == 0).all() and (cg.amax(-1) == 15).all()


@pytest.mark.skipif(not HAS_TORCHAO, reason="no torchao")
def test_drafter_rtn_and_torchao_agree_on_dequantized_weights(drafters):
    rtn, tao = drafters["rtn"], drafters["torchao"]
    for name, m in rtn.quantized_linears().items():
        t = tao.quantized_linears()[name]
        assert isinstance(t, TorchaoInt4Linear)
        # torchao's kernel output is bf16; rtn's fp32 w_hat rounded to bf16 must match it exactly
        assert torch.equal(t.dequantize(), m.dequantize().bfloat16().float()), name


def test_drafter_group_size_falls_back_for_hidden_576():
    assert [choose_group_size(k, 128) for k in (576, 1536, 96)] == [64, 128, 32]
    with pytest.raises(ValueError):
        choose_group_size(100, 128)
    # SmolLM2-135M widths: hidden 576 = 9 heads · 64, 3 kv heads, intermediate 1536
    target = tiny_llama(hidden=576, intermediate=1536, layers=1, heads=9, kv_heads=3)
    drafter = build_drafter(target)
    gs = drafter.group_sizes
    assert {gs[f"model.layers.0.self_attn.{n}"] for n in ("q_proj", "k_proj", "v_proj", "o_proj")} == {64}
    assert (gs["model.layers.0.mlp.up_proj"], gs["model.layers.0.mlp.down_proj"]) == (64, 128)
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert rel_err(drafter.model(input_ids=ids).logits, target(input_ids=ids).logits) < 0.3


def test_drafter_bogus_backend_raises():
    with pytest.raises(ValueError, match="auto, torchao, rtn"):
        build_drafter(tiny_llama(layers=1), backend="bogus")
