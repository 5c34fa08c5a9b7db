"""Reduced draft vocabulary (spec.draft_vocab, er_sglang/draft_vocab.py): still lossless, q = 0 off the
subset, deterministic subset, refresh on weight updates, one-line config errors."""
import json

import pytest
import torch

from er_sglang.cli import main as er_rollout
from er_sglang.config import ConfigError, RolloutJob, load_config
from er_sglang.draft_vocab import DraftVocab, SubsetHead, select_draft_vocab
from er_sglang.drafter import build_drafter
from er_sglang.engine import SamplingParams
from er_sglang.policy import SpecPolicy
from er_sglang.reference import ReferenceEngine
from er_sglang.sampling import scatter_probs, verify
from tests.stats import chi2_pvalue
from tests.test_reference import PROMPT, _exact_marginals
from tests.tiny import ModelDrafter, tiny_llama

# ---- the verifier with a subset proposal -------------------------------------------------------------
IDS = torch.tensor([0, 2, 4])  # the draft's subset of a 6-token vocabulary
P1 = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.05, 0.25])  # 0.80 of p1 lies off the subset
P2 = torch.tensor([0.20, 0.10, 0.30, 0.10, 0.10, 0.20])  # 0.40 off
P3 = torch.tensor([0.10, 0.20, 0.10, 0.20, 0.20, 0.20])
Q1 = torch.tensor([0.50, 0.30, 0.20])  # over IDS
Q2 = torch.tensor([0.20, 0.20, 0.60])


def _run_subset(verify_fn, q_passed=None, num=200_000, seed=0):
    """Drafts x_i ~ Q_i over IDS; verify_fn gets q over the 6 tokens (scatter_probs) unless q_passed is given."""
    g = torch.Generator().manual_seed(seed)
    draft = torch.stack([IDS[torch.multinomial(Q1, num, True, generator=g)],
                         IDS[torch.multinomial(Q2, num, True, generator=g)]], 1)
    q = scatter_probs(torch.stack([Q1, Q2]), IDS, 6) if q_passed is None else q_passed
    p = torch.stack([P1, P2, P3]).expand(num, 3, 6).contiguous()
    tokens, n = verify_fn(draft, q.expand(num, 2, 6).contiguous(), p, g)
    first = torch.bincount(tokens[:, 0], minlength=6)
    second = torch.bincount(tokens[n >= 1, 1], minlength=6)
    return chi2_pvalue(first, P1), chi2_pvalue(second, P2)


def _verify_in_subset_space(draft_tokens, draft_probs, target_probs, generator=None):
    """Bug: verify in the subset's coordinates (p restricted to the draft's support and renormalized)."""
    support = (draft_probs.sum(1, keepdim=True) > 0).float()
    p = target_probs * support
    return verify(draft_tokens, draft_probs, p / p.sum(-1, keepdim=True), generator)


def test_verify_subset_draft_preserves_target_distribution():
    assert min(_run_subset(verify)) > 1e-4


def test_verify_subset_draft_catches_subset_space_verify():
    assert min(_run_subset(_verify_in_subset_space)) < 1e-6


def test_verify_subset_draft_catches_q_not_the_sampled_one():
    # tokens come from the subset q, but the verifier is handed the full-vocabulary softmax (mass off IDS)
    wrong = 0.5 * scatter_probs(torch.stack([Q1, Q2]), IDS, 6) + 0.5 / 6
    assert min(_run_subset(verify, q_passed=wrong)) < 1e-6


def test_scatter_probs_zero_off_subset():
    q = scatter_probs(torch.tensor([[0.25, 0.75]]), torch.tensor([3, 1]), 5)
    assert q.tolist() == [[0.0, 0.75, 0.0, 0.25, 0.0]]


# ---- the reference engine with a reduced draft head -------------------------------------------------
def _subset_engine(ids, verify_fn=verify, drafter=None, target=None):
    """rtn gamma=2 engine whose draft head scores `ids` of tiny_llama's 32 tokens (counts pin the subset)."""
    target = target or tiny_llama(0)
    drafter = drafter or ModelDrafter(tiny_llama(seed=7))
    vocab = DraftVocab(32, len(ids))
    counts = torch.zeros(32, dtype=torch.int64)
    counts[ids] = 10**9  # outweighs every prompt token the engine counts
    vocab.load_state_dict({"counts": counts, "is_stale": True})
    return ReferenceEngine(target, SpecPolicy(mode="rtn", gamma=2), drafter, verify_fn=verify_fn,
                           draft_vocab=vocab)


def _subset_sd_pvalues(ids, exact, verify_fn, num=3000):
    engine = _subset_engine(ids, verify_fn)
    outs = engine.generate([PROMPT] * num, SamplingParams(max_new_tokens=3, seed=11))
    assert engine.draft_vocab.ids.tolist() == sorted(ids)
    tokens = torch.tensor([r.output_ids for r in outs])
    return [chi2_pvalue(torch.bincount(tokens[:, k], minlength=32), exact[k]) for k in (1, 2)]


@pytest.fixture(scope="module")
def low_mass():
    """(the 8 tokens the target is least likely to emit at output positions 1-2, exact marginals)."""
    exact = _exact_marginals(tiny_llama(0), PROMPT, 3)
    return sorted((exact[1] + exact[2]).argsort()[:8].tolist()), exact


def test_reference_subset_draft_preserves_target_distribution(low_mass):
    ids, exact = low_mass
    assert 1.0 - float(exact[1][ids].sum()) > 0.8  # the case that needs the residual: most mass off the subset
    assert min(_subset_sd_pvalues(ids, exact, verify)) > 1e-4


def test_reference_subset_draft_catches_subset_space_verify(low_mass):
    # under the bug no output token 1 lies off the subset, where the target has > 0.8 of its mass
    assert min(_subset_sd_pvalues(*low_mass, _verify_in_subset_space, num=400)) < 1e-6


def test_reference_subset_draft_q_zero_off_subset_sums_to_one():
    seen = []

    def recording_verify(draft_tokens, draft_probs, target_probs, generator=None):
        seen.append((draft_tokens, draft_probs))
        return verify(draft_tokens, draft_probs, target_probs, generator)

    target = tiny_llama(0)
    drafter = build_drafter(target, group_size=32, backend="rtn")
    ids = [0, 3, 5, 8, 13, 21, 30, 31]
    engine = _subset_engine(ids, recording_verify, drafter=drafter, target=target)
    engine.generate([PROMPT, [3, 4]], SamplingParams(max_new_tokens=8, seed=2))
    off = torch.ones(32, dtype=torch.bool)
    off[ids] = False
    assert seen
    for draft_tokens, q in seen:
        assert torch.all(q[..., off] == 0.0)  # exactly zero, not small
        assert torch.allclose(q.sum(-1), torch.ones(q.shape[:-1]), atol=1e-6)
        assert torch.isin(draft_tokens, torch.tensor(ids)).all()
    # the head's logits are the full head's at those ids, from K gathered rows
    head = drafter.model.get_output_embeddings()
    assert isinstance(head, SubsetHead) and tuple(head.weight.shape) == (8, 64)
    hidden = torch.randn(4, 64)
    assert torch.allclose(head(hidden), target.lm_head(hidden)[:, ids], atol=1e-5)
    assert drafter.weight_bytes()["draft_head_bytes"] == 8 * 64 * 4


# ---- the subset: determinism and refresh -------------------------------------------------------------
def test_select_draft_vocab_ties_to_lower_id_and_always_included():
    counts = torch.tensor([5, 3, 0, 3, 9, 3, 0, 1])
    # forced 6 (count 0); then by count: 4 (9), 0 (5), then 1, 3, 5 tie at 3 -> lower ids first
    assert select_draft_vocab(counts, 4, always=[6]).tolist() == [0, 1, 4, 6]
    assert select_draft_vocab(counts, 5, always=[6]).tolist() == [0, 1, 3, 4, 6]
    assert select_draft_vocab(counts, 8).tolist() == list(range(8))
    assert select_draft_vocab(counts + 0.5 * (torch.arange(8) == 5), 5, always=[6]).tolist() == [0, 1, 4, 5, 6]
    with pytest.raises(ValueError, match="spec.draft_vocab"):
        select_draft_vocab(counts, 1, always=[6, 7])


def test_draft_vocab_refreshes_on_first_generate_and_after_weight_update():
    target = tiny_llama(0)
    drafter = build_drafter(target, group_size=32, backend="rtn")
    engine = ReferenceEngine(target, SpecPolicy(mode="rtn", gamma=2), drafter,
                             draft_vocab=DraftVocab(32, 6, always=[0], soft=False))
    params = SamplingParams(max_new_tokens=4, seed=1)
    engine.generate([[3, 3, 3, 4, 4, 5]], params)
    # cold start: the prompt's counts only; 0 forced, then 3 (3), 4 (2), 5 (1), then 1, 2 (count 0, lower ids)
    assert engine.draft_vocab.ids.tolist() == [0, 1, 2, 3, 4, 5]
    engine.generate([[7] * 30], params)
    assert engine.draft_vocab.ids.tolist() == [0, 1, 2, 3, 4, 5]  # no weight update: the subset stays
    new_state = {k: v + 0.05 * torch.randn_like(v) for k, v in target.state_dict().items()}
    engine.update_weights(new_state)
    head = drafter.model.get_output_embeddings()
    assert torch.equal(head.weight, target.lm_head.weight[head.ids])  # rows re-gathered with the weights
    out = engine.generate([[9] * 40], params)[0].output_ids
    ids = engine.draft_vocab.ids
    assert 7 in ids and 9 in ids and engine.draft_vocab.num_refresh == 2
    # rebuilt from every count up to this call's prompts (its outputs were counted after the refresh)
    at_refresh = engine.draft_vocab.counts - torch.bincount(torch.tensor(out), minlength=32)
    assert torch.equal(ids, select_draft_vocab(at_refresh, 6, [0]))
    assert torch.equal(head.ids, ids) and torch.equal(head.weight, target.lm_head.weight[ids])


# ---- config validation ---------------------------------------------------------------------------------
def test_config_draft_vocab_negative_is_one_line_error(capsys):
    with pytest.raises(ConfigError, match=r"^spec.draft_vocab: expected an int >= 0"):
        load_config(RolloutJob, ["spec.draft_vocab=-1"])
    with pytest.raises(ConfigError, match=r"^spec.draft_vocab_counts: expected one of"):
        load_config(RolloutJob, ["spec.draft_vocab_counts=sampled"])
    assert er_rollout(["spec.draft_vocab=-5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: spec.draft_vocab: expected an int >= 0")


def test_config_draft_vocab_above_vocab_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 32}))
    cfg = load_config(RolloutJob, [f"model.path={tmp_path}", "spec.draft_vocab=32"])
    assert cfg.spec.draft_vocab == 32
    with pytest.raises(ConfigError, match=r"^spec.draft_vocab: expected an int in \[0, 32\]"):
        load_config(RolloutJob, [f"model.path={tmp_path}", "spec.draft_vocab=33"])
    # a model not on disk yet is checked when the engine builds its DraftVocab
    with pytest.raises(ValueError, match=r"^spec.draft_vocab: expected an int in \[0, 32\]"):
        DraftVocab(32, 33)


def test_draft_vocab_soft_counts_sum_target_probs_over_emitted_positions():
    target = tiny_llama(0)
    engine = ReferenceEngine(target, SpecPolicy(mode="rtn", gamma=2), ModelDrafter(tiny_llama(seed=7)),
                             draft_vocab=DraftVocab(32, 6, always=[0]))
    prompts = [[3, 3, 3, 4, 4, 5], [9, 9]]
    engine.generate(prompts, SamplingParams(max_new_tokens=7, seed=4))
    counts = engine.draft_vocab.counts
    assert counts.dtype == torch.float64 and engine.draft_vocab.ids.tolist() == [0, 1, 3, 4, 5, 9]
    # 1 per prompt token + one distribution (summing to 1) per emitted position: the prefill's first token
    # of each row and num_accepted + 1 per row per verify step
    emitted = len(prompts) + engine.stats().num_emitted
    assert counts.sum().item() == pytest.approx(8 + emitted, abs=1e-6)
    assert bool((counts > 0).all())  # at T=1 every token gets some mass, sampled or not


def test_drafter_requantize_bucket_regathers_subset_head():
    target = tiny_llama(0)
    drafter = build_drafter(target, group_size=32, backend="rtn")
    engine = _subset_engine([1, 2, 3, 4], drafter=drafter, target=target)
    engine.generate([PROMPT], SamplingParams(max_new_tokens=2, seed=0))
    new = torch.randn_like(target.lm_head.weight)
    drafter.requantize({"model.norm.weight": target.model.norm.weight})  # a bucket without the head: kept
    assert torch.equal(drafter.model.get_output_embeddings().weight, target.lm_head.weight[1:5])
    drafter.requantize({"lm_head.weight": new})  # a bucket with it: rows from the sent tensor
    assert torch.equal(drafter.model.get_output_embeddings().weight, new[1:5])
