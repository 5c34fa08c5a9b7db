"""The verifier preserves the target distribution, and the classic bugs are caught."""
import pytest
import torch

from er_sglang.sampling import probs_from_logits, verify, verify_greedy
from tests.stats import chi2_pvalue

# p and q differ a lot; token 3 has p = 0 < q (must never be emitted), token 4 has q = 0 < p
P1 = torch.tensor([0.45, 0.25, 0.20, 0.00, 0.10])
Q1 = torch.tensor([0.10, 0.10, 0.30, 0.50, 0.00])
P2 = torch.tensor([0.05, 0.60, 0.05, 0.20, 0.10])
Q2 = torch.tensor([0.40, 0.10, 0.10, 0.30, 0.10])
P3 = torch.tensor([0.30, 0.10, 0.20, 0.20, 0.20])


def _verify_resample_from_p(draft_tokens, draft_probs, target_probs, generator=None):
    """Classic bug: on rejection resample from p instead of the residual max(p - q, 0)."""
    tokens, n = verify(draft_tokens, draft_probs, target_probs, generator)
    rows = torch.arange(len(n))
    rejected = n < draft_tokens.shape[1]
    fresh = torch.multinomial(target_probs[rows, n], 1, generator=generator).squeeze(-1)
    tokens[rows[rejected], n[rejected]] = fresh[rejected]
    return tokens, n


def _verify_accept_u_le_p(draft_tokens, draft_probs, target_probs, generator=None):
    """Classic bug: accept with u <= p(x) instead of u < p(x)/q(x)."""
    q_one = torch.where(draft_probs > 0, torch.ones_like(draft_probs), draft_probs)
    return verify(draft_tokens, q_one * draft_probs.sum(-1, keepdim=True), target_probs, generator)


def _run(verify_fn, num=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.stack([Q1, Q2]).expand(num, 2, 5).contiguous()
    p = torch.stack([P1, P2, P3]).expand(num, 3, 5).contiguous()
    draft = torch.stack([torch.multinomial(Q1, num, True, generator=g),
                         torch.multinomial(Q2, num, True, generator=g)], 1)
    return verify_fn(draft, q, p, g)


def _first_two_pvalues(tokens, n):
    first = torch.bincount(tokens[:, 0], minlength=5)
    second = torch.bincount(tokens[n >= 1, 1], minlength=5)
    return chi2_pvalue(first, P1), chi2_pvalue(second, P2)


def test_verify_preserves_target_distribution():
    tokens, n = _run(verify)
    p_first, p_second = _first_two_pvalues(tokens, n)
    assert p_first > 1e-4 and p_second > 1e-4
    assert not (tokens[:, 0] == 3).any()  # p1(3) = 0: never emitted


def test_verify_catches_resampling_from_p():
    tokens, n = _run(_verify_resample_from_p)
    assert min(_first_two_pvalues(tokens, n)) < 1e-6


def test_verify_catches_accepting_with_u_le_p():
    tokens, n = _run(_verify_accept_u_le_p)
    assert min(_first_two_pvalues(tokens, n)) < 1e-6


def test_verify_bonus_token_distribution():
    # q = p everywhere -> every draft is accepted and the bonus comes from p3
    num = 100_000
    g = torch.Generator().manual_seed(1)
    p = torch.stack([P1, P2, P3]).expand(num, 3, 5).contiguous()
    draft = torch.stack([torch.multinomial(P1, num, True, generator=g),
                         torch.multinomial(P2, num, True, generator=g)], 1)
    tokens, n = verify(draft, p[:, :2].clone(), p, g)
    assert (n == 2).all()
    assert chi2_pvalue(torch.bincount(tokens[:, 2], minlength=5), P3) > 1e-4


def test_verify_layout_and_zero_probabilities():
    # row 0: draft token has p = 0 -> rejected at once; row 1: q(x) = 0 but p(x) > 0 -> accepted
    p = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]])
    q = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])
    draft = torch.tensor([[0], [0]])
    tokens, n = verify(draft, q, p)
    assert n.tolist() == [0, 1]
    assert tokens.tolist() == [[1, -1], [0, 2]]


def test_verify_greedy_accepts_matching_prefix():
    logits = torch.tensor([[[0.0, 9.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 9.0]]])  # argmax 1, 0, 2
    tokens, n = verify_greedy(torch.tensor([[1, 2]]), logits)
    assert n.tolist() == [1] and tokens.tolist() == [[1, 0, -1]]
    tokens, n = verify_greedy(torch.tensor([[1, 0]]), logits)
    assert n.tolist() == [2] and tokens.tolist() == [[1, 0, 2]]


def test_verify_with_one_hot_probs_equals_greedy():
    logits = torch.randn(64, 4, 11, generator=torch.Generator().manual_seed(3))
    draft = logits[:, :3].argmax(-1)
    draft[::3, 1] = (draft[::3, 1] + 1) % 11  # force some mismatches
    one_hot = probs_from_logits(logits, temperature=0.0)
    got = verify(draft, one_hot[:, :3], one_hot)
    want = verify_greedy(draft, logits)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("top_p,kept", [(1.0, 4), (0.5, 1), (0.75, 2)])
def test_probs_from_logits_top_p_keeps_smallest_prefix(top_p, kept):
    probs = probs_from_logits(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), 1.0, top_p)
    assert int((probs > 0).sum()) == kept
    assert probs.sum().item() == pytest.approx(1.0)
