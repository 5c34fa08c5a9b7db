"""Quantized draft head (spec.draft_head, er_sglang/draft_vocab.py SubsetHead + int4_linear.quantize_head): shapes and
bytes, the codes are torchao's / the draft linears', re-quantized after weight updates, q changes, still lossless,
one-line config errors."""
import pytest
import torch

from er_sglang.cli import main as er_rollout
from er_sglang.config import ConfigError, RolloutJob, load_config
from er_sglang.draft_vocab import SubsetHead, install_subset_head, subset_ids
from er_sglang.drafter import build_drafter
from er_sglang.engine import SamplingParams
from er_sglang.int4_linear import Int8Linear, RtnInt4Linear, dequantize_rtn, quantize_rtn
from er_sglang.sampling import verify
from tests.stats import chi2_pvalue
from tests.test_draft_vocab import _subset_engine
from tests.test_reference import PROMPT, _exact_marginals
from tests.tiny import tiny_llama


def _drafter(head, seed=0):
    target = tiny_llama(seed)
    return target, build_drafter(target, group_size=32, backend="rtn", head=head)


def test_draft_head_shared_is_the_targets_head():
    target, drafter = _drafter("shared")
    assert drafter.model.get_output_embeddings().weight is target.lm_head.weight
    assert drafter.weight_bytes()["draft_head_bytes"] == 0


@pytest.mark.parametrize("quant, cls, head_bytes", [
    ("int8", Int8Linear, 32 * 64 + 32 * 4),  # int8 codes + fp32 scale per row
    ("int4", RtnInt4Linear, 32 * 32 + 2 * 32 * 2 * 2),  # packed nibbles + bf16 scales, zeros per (row, group of 32)
])
def test_draft_head_quantized_full_head_shapes_and_bytes(quant, cls, head_bytes):
    target, drafter = _drafter(quant)
    head = drafter.model.get_output_embeddings()
    assert isinstance(head, SubsetHead) and isinstance(head.linear, cls) and head.weight is None
    assert not head.is_subset and subset_ids(drafter.model) is None  # every id: q is over the whole vocabulary
    assert head(torch.randn(3, 5, 64)).shape == (3, 5, 32)
    assert drafter.weight_bytes()["draft_head_bytes"] == head_bytes
    assert target.get_output_embeddings() is target.lm_head  # the target keeps its own head


def test_draft_head_int8_codes_are_per_row_symmetric():
    target, drafter = _drafter("int8")
    head = drafter.model.get_output_embeddings().linear
    w = target.lm_head.weight.detach()
    scales = w.abs().amax(1) / 127.5  # torchao's symmetric int8: max|w| over (127 - -128) / 2
    assert torch.allclose(head.scales, scales, rtol=1e-6)
    codes = torch.clamp(torch.round(w / head.scales[:, None]), -128, 127)
    off = (head.qweight.float() - codes).abs()  # torchao multiplies by 1/s: a tie may round the other way
    assert head.qweight.dtype == torch.int8 and off.max() <= 1 and (off == 0).float().mean() > 0.99
    assert (head.dequantize() - w).abs().max() <= scales.max() / 2 + 1e-6


def test_draft_head_int4_equals_the_draft_linears_rtn():
    target, drafter = _drafter("int4")
    head = drafter.model.get_output_embeddings().linear
    codes, scales, zeros = quantize_rtn(target.lm_head.weight.detach(), 32)
    assert head.group_size == 32 and torch.equal(head.scales, scales) and torch.equal(head.zeros, zeros)
    assert torch.equal(head.dequantize(), dequantize_rtn(codes, scales, zeros))


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_draft_head_quantized_changes_q(quant):
    target, drafter = _drafter(quant)
    hidden = torch.randn(16, 64)
    exact, draft = target.lm_head(hidden), drafter.model.get_output_embeddings()(hidden)
    assert not torch.equal(exact, draft)
    assert (draft - exact).abs().max() < (0.05 if quant == "int8" else 0.6) * exact.abs().max()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_draft_head_subset_keeps_quantization(quant):
    target, drafter = _drafter(quant)
    ids = torch.tensor([1, 4, 9, 16, 20, 25, 30, 31])
    head = install_subset_head(drafter.model, ids)
    assert head.quant == quant and head.is_subset and torch.equal(subset_ids(drafter.model), ids)
    assert head(torch.randn(2, 64)).shape == (2, 8)
    fresh = type(head.linear)(target.lm_head.weight.detach()[ids], None, head.linear.group_size)
    assert torch.equal(head.linear.dequantize(), fresh.dequantize())  # the K gathered rows, quantized
    assert drafter.check()["head_equal"]


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_draft_head_requantized_after_weight_update(quant):
    target, drafter = _drafter(quant)
    engine = _subset_engine([2, 3, 5, 7, 11, 13], drafter=drafter, target=target)
    engine.generate([PROMPT], SamplingParams(max_new_tokens=3, seed=0))
    head = drafter.model.get_output_embeddings()
    assert head.quant == quant and head.is_subset and engine.draft_check()["ok"]
    storages = [t.data_ptr() for t in head.linear.packed_tensors()]
    with torch.no_grad():
        target.lm_head.weight.add_(0.3 * torch.randn_like(target.lm_head.weight))
    assert not drafter.check()["head_equal"] and not engine.draft_check()["ok"]  # the check sees a stale head
    new_state = {k: v + 0.05 * torch.randn_like(v) for k, v in target.state_dict().items()}
    engine.update_weights(new_state)
    assert drafter.check()["head_equal"] and engine.draft_check()["ok"]
    rows = new_state["lm_head.weight"][head.ids]
    fresh = type(head.linear)(rows, None, head.linear.group_size)
    assert torch.equal(head.linear.dequantize(), fresh.dequantize())
    assert [t.data_ptr() for t in head.linear.packed_tensors()] == storages  # in place: CUDA graphs stay valid
    drafter.requantize({"lm_head.weight": 2 * rows.new_ones(32, 64)})  # a bucket holding the head: its rows
    assert torch.allclose(head.linear.dequantize(), torch.full((6, 64), 2.0), atol=1e-2)


def _quantized_sd_pvalues(quant, ids, exact, num=3000):
    target = tiny_llama(0)
    drafter = build_drafter(target, group_size=32, backend="rtn", head=quant)
    engine = _subset_engine(ids, verify, drafter=drafter, target=target)
    outs = engine.generate([PROMPT] * num, SamplingParams(max_new_tokens=3, seed=11))
    assert drafter.model.get_output_embeddings().quant == quant
    tokens = torch.tensor([r.output_ids for r in outs])
    return [chi2_pvalue(torch.bincount(tokens[:, k], minlength=32), exact[k]) for k in (1, 2)]


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_draft_head_quantized_subset_preserves_target_distribution(quant):
    exact = _exact_marginals(tiny_llama(0), PROMPT, 3)
    ids = sorted((exact[1] + exact[2]).argsort()[:8].tolist())  # low-mass ids: the residual does most of the work
    assert min(_quantized_sd_pvalues(quant, ids, exact)) > 1e-4


def test_draft_head_quantized_full_head_preserves_target_distribution():
    exact = _exact_marginals(tiny_llama(0), PROMPT, 3)
    assert min(_quantized_sd_pvalues("int4", list(range(32)), exact)) > 1e-4


def test_config_draft_head_bad_value_is_one_line_error(capsys):
    assert load_config(RolloutJob, ["spec.draft_head=int4"]).spec.draft_head == "int4"
    assert load_config(RolloutJob, []).spec.draft_head == "shared"
    with pytest.raises(ConfigError, match=r"^spec.draft_head: expected one of \('shared', 'int8', 'int4'\), "
                                          r"got 'int3'; did you mean 'int8'\?"):
        load_config(RolloutJob, ["spec.draft_head=int3"])
    assert er_rollout(["spec.draft_head=fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: spec.draft_head: expected one of")


def test_config_draft_head_sglang_refuses_soft_counts_and_passes_the_keys_to_the_worker(tmp_path):
    with pytest.raises(ConfigError, match=r"^spec.draft_vocab_counts: 'soft' runs on engine=reference only"):
        load_config(RolloutJob, ["engine=sglang", "spec.mode=argmax", "spec.draft_vocab=16384"])
    assert load_config(RolloutJob, ["spec.draft_head=int8", "spec.draft_vocab=16384"]).spec.draft_head == "int8"
    assert load_config(RolloutJob, ["engine=sglang", "spec.mode=no-sd", "spec.draft_head=int8"]).engine == "sglang"
    from er_sglang.sglang.engine import SGLangEngine

    started = {}

    class _Captured(SGLangEngine):  # from_config's spec dict, no SGLang started
        def __init__(self, model_path, spec, sglang_args=None):
            started.update(spec=spec, path=model_path)

        def warmup(self, max_new_tokens=12):
            return 0.0

    for head in ("int8", "int4"):
        cfg = load_config(RolloutJob, ["engine=sglang", "spec.mode=argmax", f"spec.draft_head={head}",
                                       f"model.path={tmp_path}"])
        _Captured.from_config(cfg)
        assert started["spec"]["draft_head"] == head and started["spec"]["draft_vocab"] == 0
        assert "draft_vocab_always" not in started["spec"]  # no tokenizer loaded without a subset


# ---- the SGLang worker's draft head (er_sglang/sglang/draft_head.py): its plain-torch path on CPU ----------------
class _Processor:
    """The two LogitsProcessor members DraftHead uses; the target's lm_head matmul as SGLang computes it."""

    vocab_size, final_logit_softcapping, do_tensor_parallel_all_gather = 30, None, False

    def _compute_lm_head(self, hidden_states, lm_head, embedding_bias=None):
        return torch.matmul(hidden_states, lm_head.weight.T)


class _Req:
    def __init__(self, prompt, output, done):
        self.origin_input_ids, self.output_ids, self.done = prompt, output, done

    def finished(self):
        return self.done


def _sglang_head(k):
    from er_sglang.sglang.draft_head import DraftHead

    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(16, 32, bias=False)  # 32 rows: V = 30 padded, as SGLang pads
    model.logits_processor = _Processor()
    return model, DraftHead(model, k, "shared", always=[29])


def test_sglang_draft_head_logits_minus_inf_off_subset_and_target_untouched():
    from er_sglang.sglang.marlin_int4 import draft_mode

    model, head = _sglang_head(4)
    head.observe([_Req([5, 5, 7], [9, 9, 9], True), _Req([5, 11], [12], False)])
    head.refresh()
    # 29 forced; counts 5: 3, 9: 3, 7: 1, 11: 1 -> 5, 9 then 7 (ties to the lower id); 12 (unfinished) not counted
    assert head.ids.tolist() == [5, 7, 9, 29]
    hidden = torch.randn(3, 16)
    lp = model.logits_processor
    assert torch.equal(lp._compute_lm_head(hidden, model.lm_head), hidden @ model.lm_head.weight.T)  # target path
    with draft_mode():
        logits = lp._compute_lm_head(hidden, model.lm_head)
    assert logits.shape == (3, 32)
    off = torch.ones(32, dtype=torch.bool)
    off[[5, 7, 9, 29]] = False
    assert bool(torch.isinf(logits[:, off]).all()) and torch.softmax(logits, -1)[:, off].max() == 0.0
    assert torch.allclose(logits[:, [5, 7, 9, 29]], (hidden @ model.lm_head.weight.T)[:, [5, 7, 9, 29]], atol=1e-5)


def test_sglang_draft_head_refresh_in_place_after_weight_update():
    model, head = _sglang_head(4)
    head.refresh()
    ptrs = (head.ids.data_ptr(), head.weight.data_ptr())
    assert head.check()["head_equal"]
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert not head.check()["head_equal"]  # stale rows are seen
    head.observe([_Req([3, 3, 3, 3], [], True)])
    head.refresh()
    check = head.check()
    assert check["head_equal"] and check["head_q_off_max"] == 0.0 and check["head_logits_rel_err"] < 1e-5
    assert 3 in head.ids.tolist() and (head.ids.data_ptr(), head.weight.data_ptr()) == ptrs  # graphs stay valid
    assert torch.equal(head.weight, model.lm_head.weight[head.ids])


def test_sglang_int8_head_packs_as_gptq_pack_rows():
    """Marlin's 8-bit operand: (q + 128) [K, N] packed 4 per int32 along K, as SGLang's quantization/utils.py
    pack_rows does (q_res |= q_w[i::4, :] << 8 * i)."""
    from er_sglang.sglang.draft_head import _int8_rtn, _pack_int8_gptq

    rows = torch.randn(64, 128).to(torch.bfloat16)
    codes, scales = _int8_rtn(rows)
    assert codes.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (64,)
    q_w = (codes.to(torch.int64) + 128).t()  # [K, N] in 0..255
    want = torch.zeros(128 // 4, 64, dtype=torch.int64)
    for i in range(4):
        want |= q_w[i::4, :] << (8 * i)
    assert torch.equal(_pack_int8_gptq(codes), torch.where(want >= 2**31, want - 2**32, want).to(torch.int32))


def test_sglang_quantized_head_pads_rows_and_slices_logits(monkeypatch):
    """The Marlin calls replaced by plain matmuls over the packed rows: K = 5 rows padded to 64 for the kernel,
    the padding's logits dropped, refresh in place."""
    import er_sglang.sglang.draft_head as dh

    def pack(quant, rows):
        assert rows.shape[0] % dh.MARLIN_N == 0
        return {"qweight": rows.clone(), "scales": rows[:, :1].clone()}

    monkeypatch.setattr(dh, "_marlin_pack", pack)
    monkeypatch.setattr(dh, "_marlin_buffers", pack)
    monkeypatch.setattr(dh, "_int8_apply", lambda b, h: h @ b["qweight"].T)
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(128, 32, bias=False)
    model.logits_processor = _Processor()
    head = dh.DraftHead(model, 5, "int8", always=[29])
    head.observe([_Req([3, 3, 8, 8, 8], [], True)])
    head.refresh()
    assert head.ids.tolist() == [0, 1, 3, 8, 29] and head.packed["qweight"].shape == (64, 128)
    assert torch.equal(head.packed["qweight"][:5], model.lm_head.weight[head.ids])
    assert not head.packed["qweight"][5:].any()  # zero padding
    hidden = torch.randn(2, 128)
    logits = head.logits(hidden)
    assert logits.shape == (2, 32) and torch.isinf(logits).sum() == 2 * 27
    assert torch.allclose(logits[:, head.ids], hidden @ model.lm_head.weight[head.ids].T, atol=1e-5)
