import math

import pytest
import torch

from orchestrator import grpo


def test_group_advantages_two_groups_by_hand():
    adv = grpo.group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), group_size=4)
    # group 1: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²)/3) = 0.5; group 2: all equal -> 0
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6)
    torch.testing.assert_close(adv[:4], expected)
    assert torch.equal(adv[4:], torch.zeros(4))


def test_group_advantages_all_equal_group_is_zero():
    adv = grpo.group_advantages(torch.tensor([0.3, 0.3, 0.3, 2.0, 0.0, 1.0]), group_size=3)
    assert torch.equal(adv[:3], torch.zeros(3))
    torch.testing.assert_close(adv[3:], torch.tensor([1.0, -1.0, 0.0]) / (1.0 + 1e-6))


def test_group_advantages_without_std_is_centered_reward():
    adv = grpo.group_advantages(torch.tensor([1.0, 0, 0, 0]), group_size=4, norm_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_group_advantages_rejects_ragged_batch():
    with pytest.raises(ValueError, match="group_size"):
        grpo.group_advantages(torch.zeros(5), group_size=2)


def _ratios_to_logp(ratios):
    old = torch.full((len(ratios), len(ratios[0])), -1.0)
    return old + torch.tensor(ratios).log(), old


def test_policy_loss_clipping_by_hand():
    # rows: A=+1 and A=-1, ratios 1.5 / 0.5 / 1.1; the last token of row 2 is masked out.
    logp, old = _ratios_to_logp([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    loss, m = grpo.policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask)
    # A=+1: max(-ρ, -clip ρ) = -1.2 (clipped), -0.5, -1.1; A=-1: max(ρ, clip ρ) = 1.5, 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.1 + 1.5 + 0.8) / 5, abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(2 / 5)
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 1.5 + 0.5) / 5, abs=1e-6)
    expected_kl = -(2 * math.log(1.5) + 2 * math.log(0.5) + math.log(1.1)) / 5
    assert m["approx_kl"].item() == pytest.approx(expected_kl, abs=1e-6)


def test_policy_loss_dual_clip_bounds_negative_advantage():
    logp, old = _ratios_to_logp([[5.0]])
    loss, _ = grpo.policy_loss(logp, old, torch.tensor([-2.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(2.0 * 3.0)  # min(max(2·5, 2·1.2), 2·3)
    loss, _ = grpo.policy_loss(logp, old, torch.tensor([-2.0]), torch.ones(1, 1), clip_ratio_c=None)
    assert loss.item() == pytest.approx(10.0, rel=1e-6)


def test_policy_loss_token_mean_weights_tokens_not_sequences():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    adv = torch.tensor([-1.0, 0.0])  # ratio 1: per-token loss = -A = 1 on seq 1's single token, 0 on seq 2
    token_mean, _ = grpo.policy_loss(logp, logp, adv, mask)
    seq_mean, _ = grpo.policy_loss(logp, logp, adv, mask, agg="seq-mean-token-mean")
    assert token_mean.item() == pytest.approx(1 / 4)
    assert seq_mean.item() == pytest.approx(1 / 2)


def test_policy_loss_global_denom_makes_splits_add_up():
    torch.manual_seed(0)
    logp, old = torch.randn(4, 5), torch.randn(4, 5)
    adv, mask = torch.randn(4), (torch.rand(4, 5) > 0.3).float()
    whole, _ = grpo.policy_loss(logp, old, adv, mask)
    denom = mask.sum()
    parts = [grpo.policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], denom=denom)[0]
             for i in (0, 2)]
    torch.testing.assert_close(parts[0] + parts[1], whole)


def test_policy_loss_gradient_raises_logp_of_positive_advantage():
    logp = torch.zeros(2, 1, requires_grad=True)
    loss, _ = grpo.policy_loss(logp, torch.zeros(2, 1), torch.tensor([1.0, -1.0]), torch.ones(2, 1))
    loss.backward()
    # d loss/d logp = -A·ρ/N at ρ=1: descent raises logp where A > 0, lowers it where A < 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5], [0.5]]))


def test_kl_penalty_low_var_kl_by_hand():
    logp = torch.tensor([0.0, math.log(2.0), 0.0])
    ref = torch.tensor([math.log(2.0), 0.0, 30.0])
    kl = grpo.kl_penalty(logp, ref, "low_var_kl")
    # d = ref - logp: e^d - d - 1 -> 2 - ln2 - 1, 0.5 + ln2 - 1, clamp(e^20 - 21, max 10)
    expected = torch.tensor([1 - math.log(2.0), math.log(2.0) - 0.5, 10.0])
    torch.testing.assert_close(kl, expected)


def test_kl_penalty_k1_and_k2_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(grpo.kl_penalty(logp, ref, "kl"), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(grpo.kl_penalty(logp, ref, "mse"), torch.tensor([0.125, 0.5]))
    with pytest.raises(ValueError, match="kl_type"):
        grpo.kl_penalty(logp, ref, "k4")


def test_entropy_from_logits_uniform_and_peaked():
    ent = grpo.entropy_from_logits(torch.tensor([[0.0, 0, 0, 0], [100.0, 0, 0, 0]]))
    torch.testing.assert_close(ent, torch.tensor([math.log(4.0), 0.0]))


def test_masked_mean_ignores_masked_and_empty_is_zero():
    x = torch.tensor([1.0, 2.0, 100.0])
    assert grpo.masked_mean(x, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(1.5)
    assert grpo.masked_mean(x, torch.zeros(3)).item() == 0.0


def test_grpo_loss_combines_terms_by_hand():
    logp = torch.tensor([[0.0, 0.0]])
    ref = torch.tensor([[math.log(2.0), math.log(2.0)]])
    entropy = torch.tensor([[1.0, 3.0]])
    loss, m = grpo.grpo_loss(logp, logp, torch.tensor([2.0]), torch.ones(1, 2), ref_logp=ref,
                             entropy=entropy, kl_coef=0.5, entropy_coef=0.1)
    kl = 1 - math.log(2.0)
    assert m["train/pg_loss"].item() == pytest.approx(-2.0)
    assert m["train/kl"].item() == pytest.approx(kl, abs=1e-6)
    assert m["train/entropy"].item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(-2.0 + 0.5 * kl - 0.1 * 2.0, abs=1e-6)
    assert set(m) >= {"train/pg_loss", "train/kl", "train/entropy", "train/clip_frac", "train/approx_kl"}


def test_grpo_loss_kl_needs_reference():
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), kl_coef=0.1)
