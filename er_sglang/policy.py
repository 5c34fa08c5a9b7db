"""SpecPolicy: the draft length gamma for each decode step (0 = plain decoding) and acceptance tracking.

Modes (DESIGN §3 "Policy"; the first four are EfficientRollout's, `argmax` is ours):
  no-sd     gamma = 0 always (AR baseline; no drafter is built).
  rtn       gamma = the fixed `gamma` on every step.
  toggle    SD on iff speedup(B, S, gamma, L_prev) >= 1 + margin, not before the active batch has once
            exceeded `rampup_batch` in this rollout; once on, on for the rest of the rollout.
  adaptive  toggle + the gamma ladder, moved once per rollout from the rollout's acceptance rate.
  argmax    every step, gamma in {0} U argmax_gammas (default {1, 2, 3, 4, 5, 7}: with an int4 draft at
            r ~ 0.3-0.7 and alpha <= 0.9 the best gamma is small; the paper's ladder stays for adaptive)
            maximizing predicted tokens/s, with the per-token acceptance alpha estimated within the
            rollout (geometric model, Beta prior carried across rollouts); hysteresis + dwell against
            flapping; both directions. Exploration: after probe_every plain steps in a row that only
            acceptance keeps plain (the smallest gamma would win at the configured prior alpha), one
            probe step at the smallest gamma re-measures alpha, so one bad rollout cannot pin gamma = 0.

The engine calls, per rollout:  [begin_rollout(n)] → per step choose_gamma(B, S) → observe(gamma, acc)
after each verify → end_rollout([global counts]).  `roofline` is any object with
speedup(B, S, gamma, accept_len) and tokens_per_s(B, S, gamma, accept_len) (er_sglang.roofline.Roofline).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from er_sglang.roofline import COLD_START_ACCEPT_LEN, accept_len_for_gamma, expected_accept_len

MODES = ("no-sd", "rtn", "toggle", "adaptive", "argmax")
ARGMAX_GAMMAS = (1, 2, 3, 4, 5, 7)  # argmax's default candidates (plus 0)
ROOFLINE_MODES = ("toggle", "adaptive", "argmax")


class SpecPolicy:
    """Decides gamma per decode step; see the module docstring for the rules of each mode."""

    def __init__(self, mode: str = "no-sd", gamma: int = 7, gamma_ladder: Sequence[int] = (5, 7, 9, 11),
                 roofline=None, margin: float = 0.05, rampup_batch: int = 32,
                 ladder_up: float = 0.94, ladder_down: float = 0.85, ladder_patience: int = 2,
                 cold_start_accept_len: dict[int, float] | None = None,
                 hysteresis: float = 0.03, min_dwell_steps: int = 8,
                 prior_alpha: float = 0.9, prior_strength: float = 256.0,
                 argmax_gammas: Sequence[int] = ARGMAX_GAMMAS, probe_every: int = 256):
        if mode not in MODES:
            raise ValueError(f"spec.mode={mode!r}: allowed {MODES}")
        ladder = tuple(int(g) for g in gamma_ladder)
        if not ladder or any(g <= 0 for g in ladder) or list(ladder) != sorted(set(ladder)):
            raise ValueError(f"spec.gamma_ladder={ladder}: need distinct positive ints, ascending")
        if mode != "no-sd" and int(gamma) <= 0:
            raise ValueError(f"spec.gamma={gamma}: must be > 0 for mode {mode!r}")
        if mode == "adaptive" and int(gamma) not in ladder:
            raise ValueError(f"spec.gamma={gamma}: adaptive starts on a rung of spec.gamma_ladder={ladder}")
        if mode in ROOFLINE_MODES and roofline is None:
            raise ValueError(f"spec.mode={mode!r} needs a roofline (configs/roofline/*.json)")
        if not 0.0 <= ladder_down < ladder_up <= 1.0 or ladder_patience < 1:
            raise ValueError("spec ladder: need 0 <= ladder_down < ladder_up <= 1 and ladder_patience >= 1")
        if cold_start_accept_len is not None and not cold_start_accept_len:
            raise ValueError("spec.cold_start_accept_len: need at least one gamma: L entry")
        cands = tuple(int(g) for g in argmax_gammas)
        if not cands or any(g <= 0 for g in cands) or list(cands) != sorted(set(cands)):
            raise ValueError(f"spec.argmax_gammas={cands}: need distinct positive ints, ascending")
        if probe_every < 0:
            raise ValueError(f"spec.probe_every={probe_every}: need an int >= 0 (0 = no probes)")
        if not 0.0 < prior_alpha < 1.0 or prior_strength < 0 or hysteresis < 0 or min_dwell_steps < 0:
            raise ValueError("spec argmax: need 0 < prior_alpha < 1, prior_strength >= 0, "
                             "hysteresis >= 0, min_dwell_steps >= 0")
        self.mode = mode
        self.gamma = int(gamma)  # fixed gamma (rtn/toggle); current rung (adaptive)
        self.gamma_ladder = ladder
        self.roofline = roofline
        self.margin = float(margin)
        self.rampup_batch = int(rampup_batch)
        self.ladder_up, self.ladder_down, self.ladder_patience = ladder_up, ladder_down, int(ladder_patience)
        self.cold_start_accept_len = dict(COLD_START_ACCEPT_LEN if cold_start_accept_len is None
                                          else cold_start_accept_len)
        self.hysteresis = float(hysteresis)
        self.min_dwell_steps = int(min_dwell_steps)
        self.prior_strength = float(prior_strength)
        self.argmax_gammas = cands
        self.probe_every = int(probe_every)
        self.prior_alpha0 = float(prior_alpha)  # the configured prior: what a probe bets on
        # Carried across rollouts (state_dict).
        self.alpha_prior = float(prior_alpha)  # argmax: previous rollouts' posterior mean of alpha
        self.accept_len_prev: dict[int, float] = {}  # gamma -> L of the latest rollout that ran it
        self.num_up_streak = 0
        self.num_down_streak = 0
        self.accept_rate_prev: float | None = None
        self._reset_rollout()

    @classmethod
    def from_config(cls, spec_cfg, roofline=None) -> SpecPolicy:
        """Build from a config object (e.g. the `spec:` section); missing attributes take the defaults."""
        kwargs = {}
        for name in ("mode", "gamma", "margin", "rampup_batch", "ladder_up", "ladder_down",
                     "ladder_patience", "hysteresis", "min_dwell_steps", "prior_alpha", "prior_strength",
                     "probe_every"):
            if getattr(spec_cfg, name, None) is not None:
                kwargs[name] = getattr(spec_cfg, name)
        for name in ("gamma_ladder", "argmax_gammas"):
            if getattr(spec_cfg, name, None) is not None:
                kwargs[name] = tuple(int(g) for g in getattr(spec_cfg, name))
        return cls(roofline=roofline, **kwargs)

    @property
    def needs_drafter(self) -> bool:
        return self.mode != "no-sd"

    # ---- per rollout -------------------------------------------------------------------------------
    def _reset_rollout(self) -> None:
        self.is_on = False  # toggle/adaptive: SD switched on in this rollout
        self.is_ramped = self.rampup_batch <= 0  # toggle: the batch has once exceeded rampup_batch
        self.current_gamma = 0  # last returned gamma
        self.num_dwell_steps = 0  # argmax: steps the current choice has been held
        self.num_plain_streak = 0  # argmax: plain steps in a row that only acceptance kept plain
        self.num_probes = 0
        self.is_dwell_free = True  # argmax: the rollout's initial AR choice is not a switch
        self.num_seq_steps: dict[int, int] = {}  # gamma -> verified sequence-steps
        self.num_accepted_by_gamma: dict[int, int] = {}
        self.num_drafted = 0
        self.num_accepted = 0
        self.num_rejected = 0  # sequence-steps that ended on a rejection (accepted < gamma)

    def begin_rollout(self, num_seqs: int | None = None) -> None:
        """Start a rollout of `num_seqs` sequences (optional; end_rollout already resets).

        Ramp-up guard for rollouts that cannot ramp: the paper's guard ("not before the batch once
        exceeded 32") would forbid SD for a whole rollout of <= rampup_batch sequences. When the engine
        says the rollout has num_seqs <= rampup_batch, the guard counts as satisfied from the start (there
        is no fill-up phase to wait for). Without this call the guard follows the paper strictly. We do
        not infer it from the first observed batch: chunked prefill makes early decode batches small
        exactly when a large rollout is still filling up.
        """
        self._reset_rollout()
        if num_seqs is not None and num_seqs <= self.rampup_batch:
            self.is_ramped = True

    def end_rollout(self, num_drafted: int | None = None, num_accepted: int | None = None) -> None:
        """Close the rollout: update L_prev, the ladder (adaptive), the alpha prior (argmax); reset.

        num_drafted / num_accepted: GLOBAL token counts over all engines (the orchestrator's sum); they
        replace this policy's own counts for the acceptance rate a = accepted / drafted and, in the
        fixed-gamma modes, for L_prev[gamma] = 1 + gamma * a (every verify drafts gamma per sequence).
        argmax's alpha prior always uses own counts (the global sums carry no rejection count).
        A rollout that drafted nothing leaves L_prev, the ladder streaks and the prior unchanged.
        """
        if (num_drafted is None) != (num_accepted is None):
            raise ValueError("end_rollout: pass both num_drafted and num_accepted, or neither")
        if num_drafted is not None:
            if not 0 <= num_accepted <= num_drafted:
                raise ValueError(f"end_rollout: need 0 <= num_accepted={num_accepted} <= num_drafted={num_drafted}")
            drafted, accepted = int(num_drafted), int(num_accepted)
        else:
            drafted, accepted = self.num_drafted, self.num_accepted
        if drafted > 0:
            rate = accepted / drafted
            self.accept_rate_prev = rate
            if num_drafted is not None and self.mode != "argmax":
                self.accept_len_prev[self.gamma] = 1.0 + self.gamma * rate
            else:
                for g, n in self.num_seq_steps.items():
                    self.accept_len_prev[g] = 1.0 + self.num_accepted_by_gamma[g] / n
            if self.mode == "adaptive":
                self._step_ladder(rate)
        if self.num_accepted + self.num_rejected > 0:
            self.alpha_prior = self.alpha_hat()
        self._reset_rollout()

    def _step_ladder(self, rate: float) -> None:
        """Ladder rule: a >= ladder_up for ladder_patience rollouts in a row → one rung up; a <= ladder_down
        likewise → one rung down; anything in between breaks both streaks. Streaks reset after a decision
        (also when the move is clamped at a ladder end)."""
        self.num_up_streak = self.num_up_streak + 1 if rate >= self.ladder_up else 0
        self.num_down_streak = self.num_down_streak + 1 if rate <= self.ladder_down else 0
        rung = self.gamma_ladder.index(self.gamma)
        if self.num_up_streak >= self.ladder_patience:
            rung = min(rung + 1, len(self.gamma_ladder) - 1)
        elif self.num_down_streak >= self.ladder_patience:
            rung = max(rung - 1, 0)
        else:
            return
        self.gamma = self.gamma_ladder[rung]
        self.num_up_streak = self.num_down_streak = 0

    # ---- per step ----------------------------------------------------------------------------------
    def choose_gamma(self, batch: int, mean_seq: float) -> int:
        """gamma for the next decode step with `batch` active sequences of mean context `mean_seq` tokens."""
        if batch <= 0 or self.mode == "no-sd":
            gamma = 0
        elif self.mode == "rtn":
            gamma = self.gamma
        elif self.mode in ("toggle", "adaptive"):
            gamma = self._choose_toggle(batch, mean_seq)
        else:
            gamma = self._choose_argmax(batch, mean_seq)
        self.current_gamma = gamma
        return gamma

    def prev_accept_len(self, gamma: int) -> float:
        """L used by toggle: the latest measured L for gamma, else the cold-start table (a gamma the table
        lacks gets the per-token alpha of the nearest listed gamma, roofline.accept_len_for_gamma)."""
        if gamma in self.accept_len_prev:
            return self.accept_len_prev[gamma]
        return accept_len_for_gamma(self.cold_start_accept_len, gamma)

    def _choose_toggle(self, batch: int, mean_seq: float) -> int:
        """Toggle: once the batch has exceeded rampup_batch (strictly), turn on the first step with
        speedup(B, S, gamma, L_prev) >= 1 + margin, then stay on for the rollout."""
        if batch > self.rampup_batch:
            self.is_ramped = True
        if not self.is_on and self.is_ramped:
            speedup = self.roofline.speedup(batch, mean_seq, self.gamma, self.prev_accept_len(self.gamma))
            self.is_on = speedup >= 1.0 + self.margin
        return self.gamma if self.is_on else 0

    def _choose_argmax(self, batch: int, mean_seq: float) -> int:
        """Argmax: tps(g) = roofline.tokens_per_s(B, S, g, L(alpha_hat, g)) for g in {0} U argmax_gammas.

        Keep the current g unless best's tps >= (1 + hysteresis) * tps(current) and the current g has been
        held >= min_dwell_steps steps. Exception: if the current g > 0 predicts a loss (tps(g) < tps(0)),
        switch at once to the best choice (0 when no g beats AR). Ties go to the smaller g. Then the probe
        (module docstring): one step at the smallest g after probe_every plain steps that only alpha kept
        plain; the next step leaves it at once if it still predicts a loss.
        """
        alpha = self.alpha_hat()
        tps = {0: self.roofline.tokens_per_s(batch, mean_seq, 0, 1.0)}
        for g in self.argmax_gammas:
            tps[g] = self.roofline.tokens_per_s(batch, mean_seq, g, expected_accept_len(alpha, g))
        best = max(tps, key=lambda g: (tps[g], -g))
        cur = self.current_gamma if self.current_gamma in tps else 0
        is_loss = cur > 0 and tps[cur] < tps[0]
        is_held = self.is_dwell_free or self.num_dwell_steps >= self.min_dwell_steps
        is_better = tps[best] >= (1.0 + self.hysteresis) * tps[cur]
        if best != cur and (is_loss or (is_held and is_better)):
            cur, self.num_dwell_steps, self.is_dwell_free = best, 0, False
        self.num_dwell_steps += 1
        return self._maybe_probe(cur, batch, mean_seq, tps[0])

    def _maybe_probe(self, cur: int, batch: int, mean_seq: float, tps_plain: float) -> int:
        g = self.argmax_gammas[0]
        pays_at_prior = self.roofline.tokens_per_s(
            batch, mean_seq, g, expected_accept_len(self.prior_alpha0, g)) > tps_plain
        if cur != 0 or self.probe_every == 0 or not pays_at_prior:
            self.num_plain_streak = 0
            return cur
        self.num_plain_streak += 1
        if self.num_plain_streak <= self.probe_every:
            return 0
        self.num_plain_streak = 0
        self.num_probes += 1
        return g

    # ---- acceptance ----------------------------------------------------------------------------------
    def observe(self, gamma: int, accepted) -> None:
        """Record one verify step: accepted[i] in 0..gamma = drafts accepted for active sequence i.

        accepted: Sequence[int] or a 1-D integer tensor/array of shape [B] (moved to CPU here).
        """
        if gamma <= 0:
            raise ValueError(f"observe: gamma={gamma} must be > 0 (plain steps draft nothing)")
        if hasattr(accepted, "detach"):
            accepted = accepted.detach().cpu()
        acc = np.asarray(accepted, dtype=np.int64).reshape(-1)
        if acc.size and (acc.min() < 0 or acc.max() > gamma):
            raise ValueError(f"observe: accepted counts must lie in 0..{gamma}, got {acc.tolist()}")
        n, s = int(acc.size), int(acc.sum())
        self.num_seq_steps[gamma] = self.num_seq_steps.get(gamma, 0) + n
        self.num_accepted_by_gamma[gamma] = self.num_accepted_by_gamma.get(gamma, 0) + s
        self.num_drafted += gamma * n
        self.num_accepted += s
        self.num_rejected += int((acc < gamma).sum())  # each rejection-terminated step rejects one token

    def alpha_hat(self) -> float:
        """Per-token acceptance, posterior mean under a geometric model with a Beta prior:

        alpha_hat = (k * alpha_prior + sum accepted) / (k + sum accepted + sum [accepted < gamma]),
        k = prior_strength pseudo-tokens. With k = 0 this is the MLE sum acc / (sum acc + #rejections).
        alpha_prior is the previous rollout's alpha_hat (so older rollouts decay geometrically).
        """
        num = self.prior_strength * self.alpha_prior + self.num_accepted
        den = self.prior_strength + self.num_accepted + self.num_rejected
        return num / den if den > 0 else self.alpha_prior

    # ---- checkpoint / logging ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Cross-rollout state (JSON-safe): current rung gamma, ladder streaks, L_prev per gamma, alpha prior."""
        return {"gamma": self.gamma, "num_up_streak": self.num_up_streak,
                "num_down_streak": self.num_down_streak,
                "accept_len_prev": {str(g): v for g, v in self.accept_len_prev.items()},
                "accept_rate_prev": self.accept_rate_prev, "alpha_prior": self.alpha_prior}

    def load_state_dict(self, state: dict) -> None:
        gamma = int(state["gamma"])
        if self.mode == "adaptive" and gamma not in self.gamma_ladder:
            raise ValueError(f"load_state_dict: gamma={gamma} is not a rung of {self.gamma_ladder}")
        if self.mode != "no-sd":
            self.gamma = gamma
        self.num_up_streak = int(state["num_up_streak"])
        self.num_down_streak = int(state["num_down_streak"])
        self.accept_len_prev = {int(g): float(v) for g, v in state["accept_len_prev"].items()}
        self.accept_rate_prev = state.get("accept_rate_prev")
        self.alpha_prior = float(state["alpha_prior"])
        self._reset_rollout()

    def stats(self) -> dict:
        """Small dict for logging (keys `spec/...`); nan where not applicable."""
        rung = self.gamma_ladder.index(self.gamma) if self.gamma in self.gamma_ladder else -1
        rate = self.accept_rate_prev
        return {"spec/gamma": self.current_gamma, "spec/gamma_rung": self.gamma, "spec/rung": rung,
                "spec/alpha_hat": self.alpha_hat(),
                "spec/accept_len_prev": self.prev_accept_len(self.gamma) if self.gamma > 0 else math.nan,
                "spec/accept_rate_prev": math.nan if rate is None else rate,
                "spec/is_on": float(self.current_gamma > 0), "spec/num_probes": self.num_probes}
