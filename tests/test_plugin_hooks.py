"""er_sglang/sglang/plugin.py's hook on SGLang's distributed weight update, with stub SGLang objects (no SGLang).

SGLang 0.5.17 calls an AFTER hook as hook(result, *args): here result is the UpdateWeightsFromDistributedReqOutput
(.success, .message) and args are (SchedulerWeightUpdaterManager, recv_req); the manager holds `draft_worker`
(None without speculative decoding). The drafters are the real ones with no linears attached.
"""
from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

from er_sglang.sglang import plugin
from er_sglang.sglang.draft_head import HeadedDrafter
from er_sglang.sglang.selfdraft import SelfDrafter

TARGET = ("sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager"
          ".update_weights_from_distributed")


def _manager():
    drafter = HeadedDrafter(SelfDrafter(model=None, kernel="marlin"), spec={})
    return SimpleNamespace(draft_worker=SimpleNamespace(drafter=drafter)), drafter


def test_after_update_distributed_marks_the_draft_stale_and_leaves_requantizing_to_the_decode_step():
    manager, drafter = _manager()
    result = SimpleNamespace(success=True, message="Succeeded to update parameter online.")
    assert plugin._after_update_distributed(result, manager, object()) is result  # SGLang's reply unchanged
    assert drafter.is_stale and drafter.num_requant == 0  # marked, not re-quantized inside the update
    plugin._after_update_distributed(result, manager, object())  # a second bucket of the same sync
    assert drafter.num_requant == 0
    drafter.refresh_if_stale()  # the next decode step: once per sync, however many buckets
    drafter.refresh_if_stale()
    assert (drafter.is_stale, drafter.num_requant) == (False, 1)


def test_after_update_distributed_does_nothing_when_the_update_failed_or_there_is_no_draft():
    manager, drafter = _manager()
    failed = SimpleNamespace(success=False, message="Failed to update parameter online: shape mismatch")
    assert plugin._after_update_distributed(failed, manager, object()) is failed
    assert (drafter.is_stale, drafter.num_requant) == (False, 0)  # the target kept its weights: so does the draft
    ok = SimpleNamespace(success=True, message="")
    assert plugin._after_update_distributed(ok, SimpleNamespace(draft_worker=None), object()) is ok  # no-sd
    other_worker = SimpleNamespace(draft_worker=SimpleNamespace())  # a draft worker of SGLang's own: no drafter
    assert plugin._after_update_distributed(ok, other_worker, object()) is ok


def test_plugin_register_scheduler_hooks_the_distributed_update_after_it_runs(monkeypatch):
    registered = []
    hook_registry = ModuleType("sglang.srt.plugins.hook_registry")
    hook_registry.HookType = SimpleNamespace(BEFORE="before", AFTER="after", AROUND="around", REPLACE="replace")
    hook_registry.HookRegistry = SimpleNamespace(register=lambda target, hook, kind: registered.append(
        (target, hook, kind)))
    worker = ModuleType("er_sglang.sglang.worker")  # the real one imports SGLang at module level
    worker.SelfSpecWorker = type("SelfSpecWorker", (), {})
    monkeypatch.setitem(sys.modules, "sglang.srt.plugins.hook_registry", hook_registry)
    monkeypatch.setitem(sys.modules, "er_sglang.sglang.worker", worker)
    plugin.register("scheduler")
    assert [(hook, kind) for target, hook, kind in registered if target == TARGET] == [
        (plugin._after_update_distributed, "after")]
    registered.clear()
    plugin.register("main")  # the hook belongs to the scheduler process
    assert TARGET not in [target for target, _, _ in registered]
