"""Per-step draft length inside SGLang: our SpecPolicy behind SGLang's adaptive-controller interface.

SGLang's `AdaptiveController` (speculative/adaptive_runtime_state.py) pre-builds one runtime state
(attention backends + target-verify / draft-decode / draft-extend CUDA graphs) per candidate
`speculative_num_steps` and, at the start of every decode step, calls
`params.get_steps_for_batch(batch_size)`; a different answer swaps the whole state. `GammaParams`
duck-types `AdaptiveSpeculativeParams` so that answer comes from `SpecPolicy.choose_gamma(B, S)`.
Acceptance feedback goes to `SpecPolicy.observe` from the worker (it knows which gamma a result used).

No SGLang import here: this module is plain Python over er_sglang.policy / er_sglang.roofline.
"""
from __future__ import annotations

import json
import os

SPEC_ENV = "ER_SGLANG_SPEC"  # JSON spec config, set by SGLangEngine, read in the scheduler process


def candidate_gammas(mode: str, gamma: int, ladder) -> list[int]:
    """The gammas a policy of `mode` can return (one CUDA-graph set is built per entry)."""
    if mode == "rtn":
        return [int(gamma)]
    if mode == "toggle":
        return [0, int(gamma)]
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


class GammaParams:
    """Duck-types sglang AdaptiveSpeculativeParams; the policy decides gamma per decode step.

    The worker sets `mean_seq` (mean context of the batch about to run) before SGLang asks; `forced`
    pins gamma (benchmarks). A policy answer outside the built states snaps down to the nearest one.
    """

    def __init__(self, policy, candidates: list[int]):
        self.policy = policy
        self._candidates = sorted({int(g) for g in candidates})
        self.mean_seq = 0.0
        self.forced: int | None = None
        self._cuda_graph_bs = None

    @property
    def candidate_steps(self) -> list[int]:
        return self._candidates

    def set_cuda_graph_bs(self, cuda_graph_bs) -> None:
        self._cuda_graph_bs = sorted(cuda_graph_bs) if cuda_graph_bs else None

    def cuda_graph_bs_for_step(self, step: int):
        """None: every state captures SGLang's full decode bs list (no per-gamma pruning)."""
        return

    def snap(self, gamma: int) -> int:
        below = [g for g in self._candidates if g <= gamma]
        return below[-1] if below else self._candidates[0]

    def get_steps_for_batch(self, batch_size: int) -> int:
        if self.forced is not None:
            return self.snap(self.forced)
        return self.snap(self.policy.choose_gamma(int(batch_size), float(self.mean_seq)))

    def on_verify_complete(self, num_correct_drafts_per_req, batch_size: int):
        """Decisions happen in get_steps_for_batch; feedback reaches the policy via the worker."""
        return
