"""SGLang plugin: hooks (HookRegistry) that turn STANDALONE into our self-draft speculative decoder.

Entry point form (for a pip-installed package): `[project.entry-points."sglang.srt.plugins"]
er_sglang = "er_sglang.sglang.plugin:register"`. SGLangEngine does not rely on it: it calls
`install("main")` before building the Engine and starts scheduler processes through
`run_scheduler_process`, which calls `install("scheduler")` first (both idempotent).

Hooks (target -> why):
  main process
    AROUND arg_groups.speculative_hook._handle_eagle_family: allow --speculative-use-rejection-sampling for
           STANDALONE, topk 1 (the chain kernel only needs draft probs over the target vocabulary), and keep
           max_running_requests as given (STANDALONE silently sets 48 when unset; no-sd does not).
    AROUND managers.tokenizer_manager.TokenizerManager._calculate_spec_decoding_metrics: per-request
           drafted count (sum of gamma over the request's steps) as the accept-rate denominator.
  scheduler process
    REPLACE speculative.standalone_worker_v2.StandaloneWorkerV2 -> worker.SelfSpecWorker (shared KV).
    AROUND model_executor.model_runner_components.spec_aux_hidden_state._resolve_eagle_aux_hidden_state:
           no draft layers for KV sizing, so SGLang does not double the KV cell (the draft owns no KV pool).
    AFTER  managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager
           .update_weights_from_distributed: mark the draft stale (SGLang only updates the target).
    AROUND managers.scheduler.Scheduler.handle_rpc_request: method "er_spec" -> SelfSpecWorker.control
           (stats, forced gamma, end_rollout, policy state, draft checks; the target's weights:
           "checksum", "weights_dtype", and "weights_probe" read back under HF names), JSON back in the reply's message.
"""
from __future__ import annotations

import json

RPC_METHOD = "er_spec"
_installed: set[str] = set()


def _self_spec_active() -> bool:
    import os

    from er_sglang.sglang.gamma import SPEC_ENV

    return bool(os.environ.get(SPEC_ENV))


def _handle_eagle_family(original, server_args):
    if server_args.speculative_algorithm != "STANDALONE" or not _self_spec_active():
        return original(server_args)
    hide = (server_args.speculative_use_rejection_sampling and server_args.speculative_eagle_topk in (None, 1))
    max_running = server_args.max_running_requests
    if hide:
        server_args.speculative_use_rejection_sampling = False
    try:
        return original(server_args)
    finally:
        if hide:
            server_args.speculative_use_rejection_sampling = True
        server_args.max_running_requests = max_running


def _resolve_eagle_aux_hidden_state(original, *args, **kwargs):
    original(*args, **kwargs)
    config = kwargs.get("config", args[0] if args else None)
    if _self_spec_active() and config is not None:
        config.eagle_draft_num_layers = None


def _spec_metrics(original, self, meta_info, recv_obj, i):
    original(self, meta_info, recv_obj, i)
    caps = getattr(recv_obj, "spec_num_cap_tokens", None)
    verify_ct = getattr(recv_obj, "spec_verify_ct", None)
    if not caps or len(caps) <= i or not verify_ct or verify_ct[i] <= 0:
        return
    drafted = int(caps[i])
    correct = int(meta_info.get("spec_num_correct_drafts", 0))
    meta_info["er_num_drafted"] = drafted
    meta_info["spec_num_proposed_drafts"] = drafted
    meta_info["spec_accept_rate"] = correct / drafted if drafted else 0.0
    meta_info.pop("spec_cap_length", None)


def _after_update_distributed(result, self, recv_req):
    worker = getattr(self, "draft_worker", None)
    if getattr(result, "success", False) and hasattr(worker, "drafter"):
        worker.drafter.mark_stale()
    return result


def _handle_rpc_request(original, self, recv_req):
    if recv_req.method != RPC_METHOD:
        return original(self, recv_req)
    from sglang.srt.managers.io_struct import RpcReqOutput

    params = recv_req.parameters or {}
    try:
        result = scheduler_op(self, params["op"], **json.loads(params.get("kwargs") or "{}"))
        return RpcReqOutput(success=True, message=json.dumps(result))
    except Exception as e:  # noqa: BLE001 - the reply carries the error to the engine
        return RpcReqOutput(success=False, message=f"{type(e).__name__}: {e}")


def scheduler_op(scheduler, op: str, **kw) -> dict:
    """One "er_spec" op in the scheduler: the target's weights (any mode) here, the rest by the worker."""
    model = scheduler.tp_worker.model_runner.model
    if op == "checksum":
        return {"checksum": weights_fingerprint(model)}
    if op == "weights_dtype":
        return {"dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if op == "weights_probe":
        from er_sglang.sglang.hf_weights import probe

        return probe(model, kw["shapes"], int(kw["num_values"]))
    worker = getattr(scheduler, "draft_worker", None)
    if not hasattr(worker, "control"):
        return {"error": "no self-draft worker (mode no-sd?)"}
    return worker.control(op, **kw)


def weights_fingerprint(model) -> str:
    """sha256 over (name, float64 sum, float64 L2 norm) of every parameter, sorted by name (on device)."""
    import hashlib
    import struct

    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            s = torch.sum(p, dtype=torch.float64).item()
            n = torch.linalg.vector_norm(p, 2, dtype=torch.float64).item()
            h.update(name.encode())
            h.update(struct.pack("<dd", s, n))
    return h.hexdigest()[:16]


def register(role: str = "all") -> None:
    """Register the hooks for `role` ("main", "scheduler" or "all") with SGLang's HookRegistry."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if role in ("main", "all"):
        HookRegistry.register("sglang.srt.arg_groups.speculative_hook._handle_eagle_family",
                              _handle_eagle_family, HookType.AROUND)
        HookRegistry.register("sglang.srt.managers.tokenizer_manager.TokenizerManager"
                              "._calculate_spec_decoding_metrics", _spec_metrics, HookType.AROUND)
    if role in ("scheduler", "all"):
        from er_sglang.sglang.worker import SelfSpecWorker

        HookRegistry.register("sglang.srt.speculative.standalone_worker_v2.StandaloneWorkerV2",
                              SelfSpecWorker, HookType.REPLACE)
        HookRegistry.register("sglang.srt.model_executor.model_runner_components.spec_aux_hidden_state"
                              "._resolve_eagle_aux_hidden_state", _resolve_eagle_aux_hidden_state,
                              HookType.AROUND)
        HookRegistry.register("sglang.srt.managers.scheduler_components.weight_updater"
                              ".SchedulerWeightUpdaterManager.update_weights_from_distributed",
                              _after_update_distributed, HookType.AFTER)
        HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.handle_rpc_request",
                              _handle_rpc_request, HookType.AROUND)


def install(role: str) -> None:
    """register(role) once per process, then apply (HookRegistry.apply_hooks is idempotent)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    if role not in _installed:
        register(role)
        _installed.add(role)
    HookRegistry.apply_hooks()


def run_scheduler_process(*args, **kwargs):
    """Engine.run_scheduler_process_func: apply our scheduler hooks, then SGLang's scheduler main."""
    install("scheduler")
    import os

    if os.environ.get("ER_STACK_DUMP_S"):  # debugging a stuck scheduler: all thread stacks to stderr
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["ER_STACK_DUMP_S"]), repeat=True)
    from sglang.srt.managers.scheduler import run_scheduler_process as _run

    return _run(*args, **kwargs)
