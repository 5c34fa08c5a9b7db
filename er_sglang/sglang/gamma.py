"""Per-step draft length inside SGLang: our SpecPolicy, limited to the graph states the worker built.

The worker (worker.py) asks `GammaChooser.choose(B, S)` at the start of every decode step; the answer comes
from `SpecPolicy.choose_gamma(B, S)`, limited to the gammas whose graph states were built and to the batch
sizes those states serve. Acceptance feedback goes to `SpecPolicy.observe` from the worker.

No SGLang import here: this module is plain Python over er_sglang.policy / er_sglang.roofline.
"""
from __future__ import annotations

import json
import os

SPEC_ENV = "ER_SGLANG_SPEC"  # JSON spec config, set by SGLangEngine, read in the scheduler process


def candidate_gammas(mode: str, gamma: int, ladder, argmax_gammas=None) -> list[int]:
    """The gammas a policy of `mode` can return (one CUDA-graph set is built per entry)."""
    if mode == "rtn":
        return [int(gamma)]
    if mode == "toggle":
        return [0, int(gamma)]
    if mode == "argmax":
        from er_sglang.policy import ARGMAX_GAMMAS

        return sorted({0, *[int(g) for g in (argmax_gammas or ARGMAX_GAMMAS)]})
    return sorted({0, int(gamma), *[int(g) for g in ladder]})


def build_policy(spec: dict):
    """SpecPolicy from the JSON-able spec dict {mode, gamma, gamma_ladder, roofline(path|None), policy:{...}}."""
    from er_sglang.policy import SpecPolicy

    roofline = None
    if spec.get("roofline"):
        from er_sglang.roofline import Roofline, RooflineParams

        roofline = Roofline(RooflineParams.from_json(spec["roofline"]))
    return SpecPolicy(mode=spec["mode"], gamma=int(spec["gamma"]),
                      gamma_ladder=tuple(spec["gamma_ladder"]), roofline=roofline,
                      **dict(spec.get("policy") or {}))


def spec_from_env() -> dict:
    raw = os.environ.get(SPEC_ENV)
    if not raw:
        raise RuntimeError(f"{SPEC_ENV} is not set: the self-draft worker needs the spec config "
                           "(start engines through er_sglang.sglang.engine.SGLangEngine)")
    return json.loads(raw)


class GammaChooser:
    """Per decode step: the policy's gamma, snapped down to a built state, and 0 (plain decode) when that
    gamma has no graphs at this batch size (B > B_max(gamma)).

    B_max(gamma) bounds the per-gamma graph sets: `spec.bs_max` if set, else the largest captured B where
    the roofline predicts gamma can still win with near-perfect acceptance (alpha = BS_MAX_ALPHA) at a long
    context (BS_MAX_SEQ); `rtn` (speculation on every step by definition) keeps every B.
    """

    BS_MAX_ALPHA = 0.95
    BS_MAX_SEQ = 4096

    def __init__(self, policy, spec: dict):
        self.policy = policy
        self.mode = spec["mode"]
        self.candidates = candidate_gammas(spec["mode"], spec["gamma"], spec["gamma_ladder"],
                                           (spec.get("policy") or {}).get("argmax_gammas"))
        self.bs_max_cfg = spec.get("bs_max")
        self.forced: int | None = None
        self.served_bs: dict[int, int] = {}  # gamma -> largest B its graphs serve (set by the worker)

    def bs_max(self, gamma: int, bs_list: list[int]) -> int:
        if gamma == 0:
            return max(bs_list)
        if self.bs_max_cfg is not None:
            return int(self.bs_max_cfg)
        roofline = getattr(self.policy, "roofline", None)
        if self.mode == "rtn" or roofline is None:
            return max(bs_list)
        from er_sglang.roofline import expected_accept_len

        accept_len = expected_accept_len(self.BS_MAX_ALPHA, gamma)
        pays = [b for b in bs_list if roofline.speedup(b, self.BS_MAX_SEQ, gamma, accept_len) > 1.0]
        return max(pays) if pays else 0

    def snap(self, gamma: int) -> int:
        below = [g for g in self.candidates if g <= gamma]
        return below[-1] if below else self.candidates[0]

    def choose(self, batch_size: int, mean_seq: float) -> int:
        want = self.forced if self.forced is not None else self.policy.choose_gamma(batch_size, mean_seq)
        gamma = self.snap(int(want))
        if gamma > 0 and batch_size > self.served_bs.get(gamma, 0):
            return 0
        return gamma
