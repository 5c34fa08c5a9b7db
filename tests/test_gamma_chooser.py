"""GammaChooser: the GPU worker's per-step gamma (policy answer, snapped to built states, 0 above B_max)."""
from __future__ import annotations

import os

from er_sglang.policy import SpecPolicy
from er_sglang.roofline import Roofline, RooflineParams, expected_accept_len
from er_sglang.sglang.gamma import GammaChooser, candidate_gammas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A100 = os.path.join(ROOT, "configs", "roofline", "a100_tp1_qwen2.5-7b.json")
BS = [1, 2, 4, 8, 16, 32, 64, 128]


class _Fixed:
    """A policy that always answers `gamma` (and has no roofline)."""

    def __init__(self, gamma):
        self.gamma = gamma
        self.roofline = None

    def choose_gamma(self, batch, mean_seq):
        return self.gamma


def _spec(mode="argmax", gamma=3, ladder=(1, 3, 5), **kw):
    return {"mode": mode, "gamma": gamma, "gamma_ladder": list(ladder), "policy": {"argmax_gammas": [1, 3, 5]},
            **kw}


def test_gamma_chooser_snaps_down_to_built_states():
    ch = GammaChooser(_Fixed(4), _spec())
    ch.served_bs = {1: 64, 3: 64, 5: 64}
    assert ch.candidates == [0, 1, 3, 5]
    assert ch.choose(8, 512.0) == 3  # 4 is not a built state: the largest one below it
    ch.policy = _Fixed(9)
    assert ch.choose(8, 512.0) == 5


def test_gamma_chooser_plain_decode_above_served_batch():
    ch = GammaChooser(_Fixed(3), _spec())
    ch.served_bs = {1: 64, 3: 16, 5: 8}
    assert ch.choose(16, 512.0) == 3
    assert ch.choose(17, 512.0) == 0  # no gamma=3 graphs above B=16: plain decode, not an eager verify


def test_gamma_chooser_forced_gamma_wins_over_policy():
    ch = GammaChooser(_Fixed(5), _spec())
    ch.served_bs = {1: 64, 3: 64, 5: 64}
    ch.forced = 1
    assert ch.choose(4, 100.0) == 1
    ch.forced = 0
    assert ch.choose(4, 100.0) == 0


def test_gamma_chooser_bs_max_from_config_and_rtn():
    assert GammaChooser(_Fixed(3), _spec(bs_max=24)).bs_max(3, BS) == 24
    assert GammaChooser(_Fixed(3), _spec(mode="rtn")).bs_max(3, BS) == 128  # rtn speculates at every B
    assert GammaChooser(_Fixed(3), _spec()).bs_max(0, BS) == 128  # gamma = 0 is always available
    assert candidate_gammas("rtn", 3, (1, 3, 5)) == [3]
    assert candidate_gammas("toggle", 3, (1, 3, 5)) == [0, 3]
    assert candidate_gammas("adaptive", 5, (5, 7, 9)) == [0, 5, 7, 9]
    assert candidate_gammas("argmax", 5, (5, 7, 9)) == [0, 1, 2, 3, 4, 5, 7]  # argmax: its own small set


def test_gamma_chooser_bs_max_is_the_roofline_boundary():
    """B_max(gamma) = the largest captured B where gamma still wins at alpha = 0.95: speedup > 1 there and
    <= 1 at the next captured B."""
    roof = Roofline(RooflineParams.from_json(A100))
    policy = SpecPolicy(mode="argmax", gamma=3, gamma_ladder=(1, 3, 5), roofline=roof, argmax_gammas=(1, 3, 5))
    ch = GammaChooser(policy, _spec())
    for g in (1, 3, 5):
        b = ch.bs_max(g, BS)
        acc = expected_accept_len(ch.BS_MAX_ALPHA, g)
        assert b in BS and roof.speedup(b, ch.BS_MAX_SEQ, g, acc) > 1.0
        bigger = [x for x in BS if x > b]
        if bigger:
            assert roof.speedup(bigger[0], ch.BS_MAX_SEQ, g, acc) <= 1.0
