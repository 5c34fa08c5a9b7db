"""SpecPolicy rules (DESIGN §3 "Policy") pinned with hand-computed cases on fake rooflines."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from er_sglang.policy import SpecPolicy

A100_CONFIG = Path(__file__).resolve().parents[1] / "configs/roofline/a100_tp1_qwen2.5-7b.json"
LADDER = (5, 7, 9, 11)  # the paper's ladder as argmax's candidates: the hand-computed cases below use it


class LinearRoofline:
    """T_T = 1, one draft step 0.1, T_V = 1 + 0.02*B*g  →  speedup = L / (1 + 0.1*g + 0.02*B*g).

    With g = 5: L = 4.5 → on (>= 1.05) iff B <= 27; L = 2 → iff B <= 4; L = 4 → iff B <= 23.
    """

    def __init__(self):
        self.calls = []  # (B, S, g, L) of every speedup call

    def speedup(self, B, S, g, L):
        self.calls.append((B, S, g, L))
        return 1.0 if g == 0 else L / (1.0 + 0.1 * g + 0.02 * B * g)

    def tokens_per_s(self, B, S, g, L):
        return B * (1.0 if g == 0 else L / (1.0 + 0.1 * g + 0.02 * B * g))


class ScriptedRoofline:
    """Speedup per gamma set by the test (ignores B, S, L); tokens/s = B * speedup."""

    def __init__(self, speedups):
        self.sp = dict(speedups)

    def speedup(self, B, S, g, L):
        return 1.0 if g == 0 else self.sp[g]

    def tokens_per_s(self, B, S, g, L):
        return B * self.speedup(B, S, g, L)


def rollout(policy, rate, num_drafted=100):
    """A rollout whose global acceptance is `rate` (as the orchestrator would report it)."""
    policy.end_rollout(num_drafted=num_drafted, num_accepted=round(rate * num_drafted))


def test_policy_no_sd_always_zero_and_needs_no_drafter():
    policy = SpecPolicy("no-sd")
    assert not policy.needs_drafter
    assert [policy.choose_gamma(b, 100.0) for b in (1, 8, 64, 512)] == [0, 0, 0, 0]
    assert SpecPolicy("rtn", gamma=7).needs_drafter


def test_policy_rtn_returns_fixed_gamma():
    policy = SpecPolicy("rtn", gamma=7)
    assert [policy.choose_gamma(b, 4096.0) for b in (1, 32, 256)] == [7, 7, 7]
    policy.observe(7, [7, 0])
    policy.end_rollout()
    assert policy.choose_gamma(512, 8192.0) == 7


def test_policy_rejects_bad_config():
    with pytest.raises(ValueError, match="spec.mode"):
        SpecPolicy("eagle")
    with pytest.raises(ValueError, match="roofline"):
        SpecPolicy("toggle", gamma=7)
    with pytest.raises(ValueError, match="rung"):
        SpecPolicy("adaptive", gamma=6, roofline=LinearRoofline())
    with pytest.raises(ValueError, match="gamma_ladder"):
        SpecPolicy("rtn", gamma=5, gamma_ladder=(7, 5))


def test_policy_toggle_off_above_boundary_guard_then_stays_on():
    policy = SpecPolicy("toggle", gamma=5, roofline=LinearRoofline())
    assert policy.choose_gamma(20, 512.0) == 0  # 4.5/3.5 = 1.29 pays, but the batch never exceeded 32
    assert policy.choose_gamma(10, 512.0) == 0  # still ramping up
    assert policy.choose_gamma(40, 512.0) == 0  # exceeded 32; 4.5/5.5 = 0.82
    assert policy.choose_gamma(28, 512.0) == 0  # 4.5/4.3 = 1.047 < 1.05
    assert policy.choose_gamma(27, 512.0) == 5  # 4.5/4.2 = 1.071
    assert policy.choose_gamma(60, 512.0) == 5  # once on, on for the rollout
    policy.end_rollout()
    assert policy.choose_gamma(10, 512.0) == 0  # new rollout: guard and on-flag reset


def test_policy_toggle_guard_needs_batch_strictly_above_rampup():
    policy = SpecPolicy("toggle", gamma=5, roofline=LinearRoofline())
    policy.choose_gamma(32, 512.0)
    assert policy.choose_gamma(10, 512.0) == 0
    policy.choose_gamma(33, 512.0)
    assert policy.choose_gamma(10, 512.0) == 5


def test_policy_toggle_small_rollout_satisfies_guard_when_declared():
    policy = SpecPolicy("toggle", gamma=5, roofline=LinearRoofline())
    policy.begin_rollout(num_seqs=16)  # can never exceed 32: no fill-up phase to wait for
    assert policy.choose_gamma(10, 512.0) == 5
    policy.begin_rollout(num_seqs=100)
    assert policy.choose_gamma(10, 512.0) == 0
    policy.begin_rollout()  # unknown size: the paper's strict guard
    assert policy.choose_gamma(10, 512.0) == 0


def test_policy_toggle_uses_previous_rollout_accept_len():
    roofline = LinearRoofline()
    policy = SpecPolicy("toggle", gamma=5, roofline=roofline, rampup_batch=0)
    assert policy.choose_gamma(20, 512.0) == 5  # cold start L = 4.5
    assert roofline.calls[-1] == (20, 512.0, 5, 4.5)
    policy.observe(5, [1, 1, 2, 0])  # L = mean(accepted + 1) = 8/4 = 2.0
    policy.end_rollout()
    assert policy.choose_gamma(5, 512.0) == 0  # 2/(1.5+0.5) = 1.0
    assert roofline.calls[-1][3] == pytest.approx(2.0)
    assert policy.choose_gamma(4, 512.0) == 5  # 2/(1.5+0.4) = 1.053


def test_policy_toggle_global_counts_override_own():
    policy = SpecPolicy("toggle", gamma=5, roofline=LinearRoofline(), rampup_batch=0)
    policy.choose_gamma(1, 512.0)
    policy.observe(5, [5, 5, 5])  # own L would be 6
    policy.end_rollout(num_drafted=100, num_accepted=60)  # global a = 0.6 → L = 1 + 5*0.6 = 4.0
    assert policy.prev_accept_len(5) == pytest.approx(4.0)
    assert policy.choose_gamma(24, 512.0) == 0  # 4/3.9 = 1.026
    assert policy.choose_gamma(23, 512.0) == 5  # 4/3.8 = 1.053


def test_policy_adaptive_up_after_two_high_rollouts():
    policy = SpecPolicy("adaptive", gamma=7, roofline=LinearRoofline())
    rollout(policy, 0.95)
    assert policy.gamma == 7
    rollout(policy, 0.95)
    assert policy.gamma == 9
    rollout(policy, 0.95)  # the streak restarted after the move
    assert policy.gamma == 9
    rollout(policy, 0.95)
    assert policy.gamma == 11


def test_policy_adaptive_broken_streak_does_not_move():
    policy = SpecPolicy("adaptive", gamma=7, roofline=LinearRoofline())
    for rate in (0.95, 0.90, 0.95):
        rollout(policy, rate)
    assert policy.gamma == 7
    rollout(policy, 0.94)  # a >= 0.94 counts: second in a row
    assert policy.gamma == 9


def test_policy_adaptive_down_after_two_low_rollouts():
    policy = SpecPolicy("adaptive", gamma=7, roofline=LinearRoofline())
    rollout(policy, 0.80)
    rollout(policy, 0.85)  # a <= 0.85 counts
    assert policy.gamma == 5


def test_policy_adaptive_clamps_at_ladder_ends():
    top = SpecPolicy("adaptive", gamma=11, roofline=LinearRoofline())
    for rate in (0.95, 0.95, 0.80):
        rollout(top, rate)
    assert top.gamma == 11  # clamped; streaks reset, so one low rollout is not enough yet
    rollout(top, 0.80)
    assert top.gamma == 9
    bottom = SpecPolicy("adaptive", gamma=5, roofline=LinearRoofline())
    for rate in (0.80, 0.80, 0.80, 0.80):
        rollout(bottom, rate)
    assert bottom.gamma == 5


def test_policy_adaptive_global_counts_override_own_and_own_used_without():
    policy = SpecPolicy("adaptive", gamma=7, roofline=LinearRoofline())
    for _ in range(2):
        policy.observe(7, [7, 7, 7])  # own acceptance 1.0 ...
        policy.end_rollout(num_drafted=1000, num_accepted=800)  # ... but globally 0.8
    assert policy.gamma == 5
    for _ in range(2):
        policy.observe(5, [5, 5, 4])  # own a = 14/15 = 0.933 < 0.94: no move
        policy.end_rollout()
    assert policy.gamma == 5
    for _ in range(2):
        policy.observe(5, [5, 5, 5])  # own a = 1.0
        policy.end_rollout()
    assert policy.gamma == 7


def test_policy_toggle_has_no_ladder():
    policy = SpecPolicy("toggle", gamma=7, roofline=LinearRoofline())
    for rate in (0.95, 0.95, 0.95):
        rollout(policy, rate)
    assert policy.gamma == 7


def test_policy_argmax_alpha_mle_by_hand():
    policy = SpecPolicy("argmax", argmax_gammas=LADDER, roofline=LinearRoofline(), prior_strength=0)
    policy.observe(4, [4, 2, 0])  # 6 accepted; rejections at the 2 and 0 steps
    assert policy.alpha_hat() == pytest.approx(6 / 8)
    with_prior = SpecPolicy("argmax", argmax_gammas=LADDER, roofline=LinearRoofline(), prior_alpha=0.9, prior_strength=10)
    with_prior.observe(4, torch.tensor([4, 2, 0]))
    assert with_prior.alpha_hat() == pytest.approx((9 + 6) / (10 + 8))


def test_policy_argmax_prior_carried_across_rollouts():
    policy = SpecPolicy("argmax", argmax_gammas=LADDER, roofline=LinearRoofline(), prior_alpha=0.9, prior_strength=10)
    policy.observe(4, [4, 2, 0])
    policy.end_rollout()
    assert policy.alpha_hat() == pytest.approx(15 / 18)  # new rollout starts from the last posterior
    policy.observe(4, [4, 4])
    assert policy.alpha_hat() == pytest.approx((10 * 15 / 18 + 8) / (10 + 8))
    policy.end_rollout()  # a rollout with no verify steps leaves the prior alone
    policy.end_rollout()
    assert policy.alpha_hat() == pytest.approx((10 * 15 / 18 + 8) / 18)


def test_policy_argmax_picks_gamma_maximizing_tokens_per_s():
    # alpha = 0.75, B = 1: L(g) = (1 - 0.75^(g+1))/0.25, denominators 1 + 0.12*g:
    # g=5: 3.2881/1.60 = 2.055; g=7: 3.5996/1.84 = 1.956; g=9: 3.7747/2.08 = 1.815; g=11: 3.8733/2.32 = 1.670
    low = SpecPolicy("argmax", argmax_gammas=LADDER, roofline=LinearRoofline(), prior_strength=0)
    low.observe(4, [4, 2, 0])
    assert low.choose_gamma(1, 512.0) == 5
    # alpha = 19/20 = 0.95: g=5: 5.2982/1.60 = 3.311; g=7: 6.7316/1.84 = 3.659;
    # g=9: 8.0253/2.08 = 3.858; g=11: 9.1928/2.32 = 3.962
    high = SpecPolicy("argmax", argmax_gammas=LADDER, roofline=LinearRoofline(), prior_strength=0)
    high.observe(11, [11, 8])
    assert high.choose_gamma(1, 512.0) == 11


def test_policy_argmax_zero_when_no_gamma_beats_ar_and_on_when_batch_shrinks():
    policy = SpecPolicy("argmax", argmax_gammas=LADDER, roofline=LinearRoofline(), prior_strength=0)
    policy.observe(4, [4, 2, 0])  # alpha = 0.75
    # B = 40, g = 5: 3.2881/(1.5 + 4) = 0.598; larger g only worse
    assert [policy.choose_gamma(40, 512.0) for _ in range(10)] == [0] * 10
    assert policy.choose_gamma(1, 512.0) == 5  # the tail: speedup 2.055
    assert policy.choose_gamma(40, 512.0) == 0  # batch grew: predicted loss → off at once (inside dwell)


def test_policy_argmax_hysteresis_prevents_flapping():
    roofline = ScriptedRoofline({5: 1.50, 7: 1.40, 9: 0.5, 11: 0.5})
    policy = SpecPolicy("argmax", argmax_gammas=LADDER, roofline=roofline, hysteresis=0.03, min_dwell_steps=8)
    assert policy.choose_gamma(4, 512.0) == 5
    picks = []
    for step in range(20):
        roofline.sp[7] = 1.52 if step % 2 else 1.49  # 7 at most 1.3% better than 5
        picks.append(policy.choose_gamma(4, 512.0))
    assert picks == [5] * 20
    roofline.sp[7] = 1.56  # 4% better
    assert policy.choose_gamma(4, 512.0) == 7
    roofline.sp[5] = 1.60  # 2.6% better than 7: within hysteresis
    assert [policy.choose_gamma(4, 512.0) for _ in range(12)] == [7] * 12


def test_policy_argmax_dwell_holds_choice():
    roofline = ScriptedRoofline({5: 1.50, 7: 1.40, 9: 0.5, 11: 0.5})
    policy = SpecPolicy("argmax", argmax_gammas=LADDER, roofline=roofline, min_dwell_steps=8)
    assert policy.choose_gamma(4, 512.0) == 5  # step 1: switch 0 → 5
    roofline.sp[7] = 2.0
    assert [policy.choose_gamma(4, 512.0) for _ in range(7)] == [5] * 7  # steps 2..8
    assert policy.choose_gamma(4, 512.0) == 7  # step 9: 5 was held 8 steps


def test_policy_argmax_escapes_predicted_loss_inside_dwell():
    roofline = ScriptedRoofline({5: 1.50, 7: 1.40, 9: 0.5, 11: 0.5})
    policy = SpecPolicy("argmax", argmax_gammas=LADDER, roofline=roofline, min_dwell_steps=8)
    assert policy.choose_gamma(4, 512.0) == 5
    roofline.sp.update({5: 0.95, 7: 1.2})
    assert policy.choose_gamma(4, 512.0) == 7  # 5 now loses: switch at once to the best
    roofline.sp.update({7: 0.9, 5: 0.9})
    assert policy.choose_gamma(4, 512.0) == 0  # nothing beats AR


def test_policy_observe_validates_counts():
    policy = SpecPolicy("rtn", gamma=4)
    with pytest.raises(ValueError, match="0..4"):
        policy.observe(4, [5])
    with pytest.raises(ValueError, match="gamma=0"):
        policy.observe(0, [0])
    with pytest.raises(ValueError, match="both"):
        policy.end_rollout(num_drafted=10)


def test_policy_state_dict_round_trip():
    policy = SpecPolicy("adaptive", gamma=7, roofline=LinearRoofline(), prior_strength=10)
    rollout(policy, 0.95)  # up-streak 1
    policy.observe(7, [7, 3])
    policy.end_rollout()  # own a = 10/14 = 0.714: down-streak 1; L_prev[7] = 1 + 10/2 = 6
    state = json.loads(json.dumps(policy.state_dict()))
    restored = SpecPolicy("adaptive", gamma=5, roofline=LinearRoofline(), prior_strength=10)
    restored.load_state_dict(state)
    assert restored.gamma == 7
    assert restored.prev_accept_len(7) == pytest.approx(6.0)
    assert restored.alpha_hat() == pytest.approx(policy.alpha_hat())
    assert restored.state_dict() == policy.state_dict()
    rollout(restored, 0.80)  # the restored down-streak completes
    assert restored.gamma == 5


def test_policy_from_config_reads_spec_section():
    cfg = SimpleNamespace(mode="adaptive", gamma=5, gamma_ladder=[5, 7, 9, 11], margin=0.1,
                          rampup_batch=16, hysteresis=None)
    policy = SpecPolicy.from_config(cfg, LinearRoofline())
    assert (policy.mode, policy.gamma, policy.gamma_ladder) == ("adaptive", 5, (5, 7, 9, 11))
    assert (policy.margin, policy.rampup_batch, policy.hysteresis, policy.min_dwell_steps) == (0.1, 16, 0.03, 8)
    stats = policy.stats()
    assert stats["spec/rung"] == 0 and stats["spec/accept_len_prev"] == 4.5


@pytest.mark.skipif(not A100_CONFIG.exists(), reason="A100 roofline config missing")
def test_policy_toggle_a100_config_boundary():
    from er_sglang.roofline import Roofline, RooflineParams

    roofline = Roofline(RooflineParams.from_json(A100_CONFIG))
    assert roofline.speedup(16, 2048, 7, 6.0) == pytest.approx(1.148, abs=1e-3)
    assert roofline.speedup(24, 2048, 7, 6.0) == pytest.approx(1.037, abs=1e-3)
    policy = SpecPolicy("toggle", gamma=7, roofline=roofline)  # cold start L(7) = 6
    assert policy.choose_gamma(64, 2048.0) == 0  # ramped up; compute-bound
    assert policy.choose_gamma(24, 2048.0) == 0
    assert policy.choose_gamma(16, 2048.0) == 7
    argmax = SpecPolicy("argmax", argmax_gammas=LADDER, roofline=roofline)
    assert argmax.choose_gamma(64, 2048.0) == 0
    assert argmax.choose_gamma(1, 2048.0) > 0


def test_policy_argmax_default_candidates_pick_a_small_gamma():
    # alpha = 0.75, B = 1, tps(g) = L(g) / (1 + 0.12 g): g=1 1.75/1.12 = 1.5625; g=2 2.3125/1.24 = 1.8649;
    # g=3 2.7344/1.36 = 2.0106; g=4 3.0508/1.48 = 2.0613; g=5 3.2881/1.60 = 2.0551; g=7 3.5995/1.84 = 1.9563
    policy = SpecPolicy("argmax", roofline=LinearRoofline(), prior_strength=0)
    assert policy.argmax_gammas == (1, 2, 3, 4, 5, 7)
    policy.observe(4, [4, 2, 0])
    assert policy.choose_gamma(1, 512.0) == 4
    with pytest.raises(ValueError, match="argmax_gammas"):
        SpecPolicy("argmax", roofline=LinearRoofline(), argmax_gammas=(3, 1))


def test_policy_argmax_probe_remeasures_after_plain_streak():
    # alpha_hat = 0: L = 1 for every g, tps(g) = 1 / (1 + 0.12 g) < 1 -> plain. At the prior alpha 0.9 the
    # smallest g would pay at B = 1 (L(1) = 1.9: 1.9 / 1.12 = 1.70), so every 4th plain step is a g = 1 probe,
    # left at once on the next step (predicted loss).
    policy = SpecPolicy("argmax", roofline=LinearRoofline(), prior_strength=0, probe_every=3)
    policy.observe(1, [0, 0, 0, 0])
    assert [policy.choose_gamma(1, 512.0) for _ in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]
    assert policy.stats()["spec/num_probes"] == 2
    # B = 40: g = 1 would not pay even at the prior (1.9 / (1.1 + 0.8) = 1.0, not > 1): no probe
    assert [policy.choose_gamma(40, 512.0) for _ in range(8)] == [0] * 8
    off = SpecPolicy("argmax", roofline=LinearRoofline(), prior_strength=0, probe_every=0)
    off.observe(1, [0, 0, 0, 0])
    assert [off.choose_gamma(1, 512.0) for _ in range(8)] == [0] * 8
