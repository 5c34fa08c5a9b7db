"""The SGLang worker's draft head (spec.draft_vocab / spec.draft_head, er_sglang/sglang/draft_head.py), device only.

One engine per head: a K = 256 subset with a bf16 (shared) head, a K = 200 subset with an int4 head (rows padded
to Marlin's 256), a K = 192 subset with an int8 head and the full int8 head (four engine starts; one alone:
`-k k200-int4`). Each is lossless at T = 1 (same marginals as plain decoding on the same engine), puts q = 0 off
its subset through the installed path, and after a weight update holds the new lm_head rows (shared) or their
fresh Marlin quantization (int8, int4).
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("sglang")

from er_sglang.engine import SamplingParams
from er_sglang.sglang.engine import SGLangEngine

from .conftest import small_engine_args
from .test_sglang_engine import (
    PROMPT,
    ROOFLINE,
    _contingency_pvalue,
    _perturbed_state_dict,
    _sample_tokens,
    record,
)

pytestmark = pytest.mark.gpu
EOS = 31999  # the tiny model's eos: always in the subset


HEADS = [(256, "shared"), (200, "int4"), (192, "int8"), (0, "int8")]  # (spec.draft_vocab, spec.draft_head)


@pytest.fixture(scope="module", params=HEADS, ids=lambda p: f"k{p[0]}-{p[1]}")
def head_eng(request, tiny_path):
    k, quant = request.param
    spec = {"mode": "argmax", "gamma": 3, "gamma_ladder": [3], "roofline": ROOFLINE, "bs_max": 16,
            "policy": {"argmax_gammas": [3]}, "draft_vocab": k, "draft_head": quant}
    e = SGLangEngine(tiny_path, spec, small_engine_args(max_running_requests=16, cuda_graph_max_bs_decode=16))
    yield k, quant, e
    e.shutdown()


def test_draft_head_output_distribution_equals_ar(head_eng):
    """Tokens 2..4 have the same marginals with gamma = 0 (the target alone) and gamma = 3 (this draft head)."""
    k, quant, eng = head_eng
    n, pos = 1536, 4
    eng.stats(reset=True)
    ar = _sample_tokens(eng, 0, n, pos)
    sd = _sample_tokens(eng, 3, n, pos)
    st = eng.stats(reset=True)
    eng.rpc("set_gamma", gamma=-1)
    pvals = [_contingency_pvalue([o[j] for o in ar], [o[j] for o in sd]) for j in range(1, pos)]
    record(f"draft_head_distribution_k{k}_{quant}", {"pvalues_pos1_3": pvals, "sd_accept_rate": st.accept_rate,
                                                     "gamma_hist": st.gamma_hist})
    assert 3 in st.gamma_hist and st.num_drafted > 0  # the draft head really drafted
    assert min(pvals) > 1e-3, pvals
    if k == 0:  # a full quantized head: the int4 linears' acceptance on this peaked model, not the subset's ~0
        assert st.accept_rate >= 0.3, st.accept_rate


def test_draft_head_q_zero_off_subset(head_eng):
    k, quant, eng = head_eng
    eng.generate([PROMPT], SamplingParams(max_new_tokens=4), ignore_eos=True)  # at least one refresh
    check = eng.rpc("draft_check")
    record(f"draft_head_check_k{k}_{quant}", {key: v for key, v in check.items() if key != "head_ids"})
    assert check["head_quant"] == quant and check["head_is_subset"] == (k > 0)
    assert check["all_equal"] and check["head_equal"] and check["head_num_refresh"] >= 1
    assert check["head_q_off_max"] == 0.0  # exactly zero, not small
    assert check["head_logits_rel_err"] < 2e-2  # the draft logits are hidden @ W_hat[ids]^T (bf16 output)
    if k:
        ids = check["head_ids"]
        assert len(ids) == k and ids == sorted(set(ids)) and EOS in ids
        assert set(PROMPT) <= set(ids)  # counted prompt tokens rank above the zero-count fill (lowest ids)


def test_draft_head_follows_weight_update(head_eng, tiny_path):
    k, _, eng = head_eng
    before = eng.rpc("draft_check")
    orig, new = _perturbed_state_dict(tiny_path, 0.5)
    try:
        eng.update_weights(new)
        eng.generate([PROMPT, [20000] * 40], SamplingParams(max_new_tokens=8), ignore_eos=True)  # refresh point
        after = eng.rpc("draft_check")
        assert after["all_equal"] and after["head_equal"]  # rows = the new lm_head's / its fresh quantization
        assert after["head_num_refresh"] > before["head_num_refresh"]
        assert after["head_q_off_max"] == 0.0
        if k:
            assert 20000 in after["head_ids"]  # the new subset counts the prompts served since the last one
    finally:
        eng.update_weights(orig)
