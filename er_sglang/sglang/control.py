"""The self-spec worker's control channel (plugin RPC "er_spec"): stats, forced gamma, draft checks, and the
spec policy's cross-rollout state (state_dict / load_state_dict of worker.policy: checkpoints and engine
restarts give it back through SGLangEngine.load_policy_state)."""
from __future__ import annotations

from er_sglang.sglang.gamma import build_policy, spec_from_env
from er_sglang.sglang.stats import WorkerStats


def _stats(worker, reset: bool = False) -> dict:
    out = worker.stats.as_dict()
    out["timing"] = worker.timer.summary()
    out["int4_bytes"] = worker.drafter.int4_bytes
    out["num_int4_linears"] = len(worker.drafter.linears)
    out["last_requant_s"] = worker.drafter.requant_s
    out["num_requant"] = worker.drafter.num_requant
    out["candidates"] = worker.chooser.candidates
    out["served_bs"] = worker.chooser.served_bs
    out["graphs"] = {name: {"max_bs": st.max_bs, "capture_s": round(st.capture_s, 2),
                            "mem_gib": round(st.mem_gib, 3), "graphs": st.graph_runner is not None}
                     for name, st in worker.states.items()}
    out["graph_init_s"] = getattr(worker, "graph_init_s", None)
    out["policy"] = worker.policy.state_dict()
    if reset:
        worker.stats = WorkerStats()
        worker.timer.reset()
    return out


def handle(worker, op: str, **kw) -> dict:
    if op == "stats":
        return _stats(worker, bool(kw.get("reset")))
    if op == "set_gamma":
        g = kw.get("gamma")
        worker.chooser.forced = None if g is None or int(g) < 0 else int(g)
        return {"forced": worker.chooser.forced}
    if op == "end_rollout":
        nd, na = kw.get("num_drafted"), kw.get("num_accepted")
        worker.policy.end_rollout(nd, na) if nd is not None else worker.policy.end_rollout()
        return {"policy": worker.policy.state_dict()}
    if op == "policy_state":
        return {"policy": worker.policy.state_dict()}
    if op == "load_policy_state":
        worker.policy.load_state_dict(kw["state"])
        return {"policy": worker.policy.state_dict()}
    if op == "reset_policy":
        worker.policy = build_policy(spec_from_env())
        worker.chooser.policy = worker.policy
        return {"policy": worker.policy.state_dict()}
    if op == "requantize":
        return {"requant_s": worker.requantize()}
    if op == "mark_stale":  # after wake: re-quantize from the target's weights before the next decode step
        worker.drafter.mark_stale()
        return {"is_stale": True}
    if op == "draft_check":  # a draft marked stale by a sync is re-quantized first, as the next decode step would
        worker.drafter.refresh_if_stale()
        return worker.drafter.check()
    if op == "scramble_draft":
        # test-only: every twin's float tensors negated (the draft runs -W_hat) until the next requantize /
        # mark_stale: the shared-KV test's draft whose K/V are garbage
        import torch

        with torch.no_grad():
            for _, mod in worker.drafter.linears:
                for name in worker.drafter.kernel.packed:
                    if mod.er_int4[name].is_floating_point():
                        mod.er_int4[name].neg_()
        return {"num_linears": len(worker.drafter.linears)}
    raise ValueError(f"unknown self-spec control op {op!r}")
