"""The self-draft speculative worker: SGLang's STANDALONE worker with the policy itself as the draft.

Imported only inside SGLang processes (the plugin REPLACEs StandaloneWorkerV2 with SelfSpecWorker).

SelfDraftWorker (a StandaloneDraftWorker): SGLang builds the draft model from the target's path with
`speculative_draft_load_format="dummy"` (no second checkpoint read). Before the KV budget is measured we
  - replace every draft decoder linear by int4 Marlin buffers quantized from the TARGET's live weight
    (the draft's dummy bf16 weight is deleted, so no bf16 copy is kept),
  - make every other draft parameter and buffer (embeddings, lm_head, norms, biases, rotary cache) the
    target's tensor object, so target weight updates reach them with no copy.
SelfSpecWorker (a StandaloneWorkerV2): SGLang's adaptive controller with GammaParams (our SpecPolicy)
chooses gamma per decode step; target-only weight updates followed by in-place re-quantization; spec
statistics with the right denominator when gamma varies; optional CUDA-event timing of draft/verify.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import deque

import sglang.srt.speculative.standalone_worker_v2 as _standalone
import torch
from sglang.srt.layers.linear import LinearBase
from sglang.srt.runtime_context import get_spec
from sglang.srt.speculative.adaptive_runtime_state import AdaptiveController
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang.srt.speculative.spec_utils import get_plan_stream

from er_sglang.sglang.gamma import GammaParams, build_policy, candidate_gammas, spec_from_env
from er_sglang.sglang.marlin_int4 import GROUP_SIZE, attach_int4, requant_int4_
from er_sglang.sglang.stats import StepTimer, WorkerStats

logger = logging.getLogger(__name__)


def _share_param_objects(dst: torch.nn.Module, src: torch.nn.Module) -> int:
    """Make dst's direct parameters/buffers the very tensors of src (same names, same shapes)."""
    n = 0
    for name, p in list(dst._parameters.items()):
        q = src._parameters.get(name)
        if p is not None and q is not None and p.shape == q.shape:
            dst._parameters[name] = q
            n += 1
    for name, b in list(dst._buffers.items()):
        c = src._buffers.get(name)
        if b is not None and c is not None and b.shape == c.shape:
            dst._buffers[name] = c
    return n


class SelfDraftWorker(_standalone.StandaloneDraftWorker):
    """STANDALONE draft worker whose model is the target, int4-quantized in place of its dummy weights."""

    def __init__(self, server_args, gpu_id, ps, nccl_port, target_worker, timer=None):
        super().__init__(server_args, gpu_id, ps, nccl_port, target_worker)
        self.timer = timer
        self.int4_pairs: list[tuple[str, torch.nn.Module, torch.nn.Module]] = []
        self.int4_bytes = 0
        self.requant_s = 0.0
        self._build_self_draft()

    @torch.no_grad()
    def _build_self_draft(self) -> None:
        t0 = time.perf_counter()
        draft = self.draft_runner.model
        target_modules = dict(self.target_worker.model_runner.model.named_modules())
        num_shared = 0
        for name, mod in draft.named_modules():
            tmod = target_modules.get(name)
            if tmod is None:
                continue
            w = getattr(tmod, "weight", None)
            if (isinstance(mod, LinearBase) and w is not None and w.dim() == 2
                    and w.shape[1] % GROUP_SIZE == 0 and w.shape[0] % 64 == 0):
                self.int4_bytes += attach_int4(mod, w.data)
                if getattr(mod, "bias", None) is not None and getattr(tmod, "bias", None) is not None:
                    mod._parameters["bias"] = tmod._parameters["bias"]
                self.int4_pairs.append((name, mod, tmod))
            else:
                num_shared += _share_param_objects(mod, tmod)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        logger.info("self-draft: %d linears -> int4 Marlin (%.3f GB), %d tensors shared with the target, %.2f s",
                    len(self.int4_pairs), self.int4_bytes / 1e9, num_shared, time.perf_counter() - t0)

    def init_lm_head(self):
        """Embeddings and lm_head are already the target's tensors (_build_self_draft)."""

    @torch.no_grad()
    def requantize(self) -> float:
        """Re-quantize every int4 linear from the target's current weight, in place; returns seconds."""
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _, mod, tmod in self.int4_pairs:
            requant_int4_(mod, tmod.weight.data)
        torch.cuda.synchronize()
        self.requant_s = time.perf_counter() - t0
        return self.requant_s

    def draft(self, batch):
        start = self.timer.start() if self.timer else None
        out = super().draft(batch)
        if start is not None:
            self.timer.stop(start, "draft", self.speculative_num_steps, len(batch.reqs))
        return out

    def _draft_extend_for_decode(self, batch, batch_result):
        start = self.timer.start() if self.timer else None
        out = super()._draft_extend_for_decode(batch, batch_result)
        if start is not None:
            self.timer.stop(start, "extend", self.speculative_num_steps, len(batch.reqs))
        return out


class SelfSpecWorker(_standalone.StandaloneWorkerV2):
    """STANDALONE spec worker with the self-drafter, per-step gamma from SpecPolicy, in-place requant."""

    def __init__(self, server_args, gpu_id, ps, nccl_port, target_worker):
        BaseSpecWorker.__init__(self)  # StandaloneWorkerV2.__init__ would build a plain draft worker
        self.server_args = server_args
        self.topk = server_args.speculative_eagle_topk
        self.speculative_num_steps = server_args.speculative_num_steps
        self.speculative_num_draft_tokens = server_args.speculative_num_draft_tokens
        self.gpu_id = gpu_id
        self.device = server_args.device
        self.ps = ps  # missing in StandaloneWorkerV2; update paths read self.ps.tp_rank
        self._target_worker = target_worker
        self.page_size = server_args.page_size
        self.speculative_algorithm = SpeculativeAlgorithm.from_string(server_args.speculative_algorithm)

        spec = spec_from_env()
        self.timer = StepTimer(bool(spec.get("timing")))
        self.stats = WorkerStats()
        self._draft_worker = SelfDraftWorker(server_args, gpu_id, ps, nccl_port, target_worker, self.timer)
        self._validate_vocab_compatibility(
            target_vocab_size=target_worker.model_runner.model_config.vocab_size,
            target_tokenizer=target_worker.tokenizer)

        self.num_new_pages_per_topk = torch.empty((), dtype=torch.int64, device=self.device)
        self.extend_lens = torch.empty((), dtype=torch.int64, device=self.device)
        self.plan_stream, self.plan_stream_ctx = get_plan_stream(self.device)

        self.policy = build_policy(spec)
        self.gamma_params = GammaParams(
            self.policy, candidate_gammas(spec["mode"], spec["gamma"], spec["gamma_ladder"]))
        self.adaptive_controller = None
        if server_args.speculative_adaptive:
            self.adaptive_controller = AdaptiveController(
                self, config_path=server_args.speculative_adaptive_config)
            self.adaptive_controller.params = self.gamma_params
        self._pending: deque[tuple[int, list]] = deque()  # (gamma, batch reqs) of launched decode steps

    @contextlib.contextmanager
    def _override_worker_state(self, speculative_num_steps, speculative_num_draft_tokens, cuda_graph_bs=None):
        """SGLang's override plus the draft runner's own server_args, which size the draft-extend capture
        width (spec_utils.resolve_num_tokens_per_req reads model_runner.server_args, not the override).
        The engine starts at the largest gamma, so buffers sized once from server_args fit every state."""
        runners = [self._draft_worker.draft_runner]
        saved = [(r.server_args.speculative_num_steps, r.server_args.speculative_num_draft_tokens)
                 for r in runners]
        # ServerArgs is read-only after resolution (its __setattr__ raises); this capture-time swap of the
        # startup record is undone below, so object.__setattr__ is used on purpose.
        for r in runners:
            object.__setattr__(r.server_args, "speculative_num_steps", speculative_num_steps)
            object.__setattr__(r.server_args, "speculative_num_draft_tokens", speculative_num_draft_tokens)
        try:
            with super()._override_worker_state(speculative_num_steps, speculative_num_draft_tokens,
                                                cuda_graph_bs=cuda_graph_bs):
                yield
        finally:
            for r, (steps, tokens) in zip(runners, saved):
                object.__setattr__(r.server_args, "speculative_num_steps", steps)
                object.__setattr__(r.server_args, "speculative_num_draft_tokens", tokens)

    # ---- decode step -------------------------------------------------------------------------------
    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None):
        is_decode = not (batch.forward_mode.is_extend() or batch.is_extend_in_batch)
        if not is_decode or batch.forward_mode.is_idle() or not batch.reqs:
            return super().forward_batch_generation(batch, on_publish, grammar_barrier)
        bs = len(batch.reqs)
        self.gamma_params.mean_seq = sum(len(r.origin_input_ids) + len(r.output_ids)
                                         for r in batch.reqs) / bs
        start = self.timer.start() if self.timer.enabled else None
        out = super().forward_batch_generation(batch, on_publish, grammar_barrier)
        gamma = self.speculative_num_steps  # the state the step actually ran with
        if start is not None:
            self.timer.stop(start, "step", gamma, bs)
        self._pending.append((gamma, list(batch.reqs)))
        return out

    def verify(self, batch, grammar_barrier=None):
        """gamma = 0 (SGLang's one-token trivial verify) samples with SGLang's target-only kernel: with
        nothing drafted it is exact sampling from p, and the chain rejection-sampling Triton kernel fails
        to compile for a one-slot chain (device run 4). The flag is restored before the draft extend,
        which must keep producing draft probs for the next gamma > 0 step."""
        start = self.timer.start() if self.timer.enabled else None
        spec = get_spec()
        is_plain = self.speculative_num_steps == 0 and spec.speculative_use_rejection_sampling
        if is_plain:
            spec._set("speculative_use_rejection_sampling", False)
        try:
            out = super().verify(batch, grammar_barrier)
        finally:
            if is_plain:
                spec._set("speculative_use_rejection_sampling", True)
        if start is not None:
            self.timer.stop(start, "verify", self.speculative_num_steps, len(batch.reqs))
        return out

    def on_verify_complete_cpu(self, num_correct_drafts_per_req, batch_size: int = 0) -> None:
        """Results arrive in launch order (one step late with overlap): pair them with their gamma.

        Called before SGLang commits the result; requests already finished or retracted are skipped, as
        SGLang does, so aggregate and per-request counts agree. The per-request drafted count rides
        SGLang's (DSPARK-only) cap-token counter to meta_info (plugin._spec_metrics reads it).
        """
        while self._pending and len(self._pending[0][1]) != batch_size:
            self._pending.popleft()
        if not self._pending:
            return
        gamma, reqs = self._pending.popleft()
        live = [i for i, r in enumerate(reqs) if not (r.is_retracted or r.finished())]
        accepted = [min(int(num_correct_drafts_per_req[i]), gamma) for i in live]
        self.stats.observe(gamma, accepted)
        if gamma > 0 and accepted:
            for i in live:
                reqs[i].spec_num_cap_tokens += gamma
            self.policy.observe(gamma, accepted)

    # ---- weight updates: target only, then re-quantize the draft in place -----------------------------
    def requantize(self) -> float:
        dt = self._draft_worker.requantize()
        self.stats.requant_s += dt
        return dt

    def update_weights_from_tensor(self, recv_req):
        ok, msg = self.target_worker.update_weights_from_tensor(recv_req)
        if ok:
            self.requantize()
        return ok, msg

    def update_weights_from_disk(self, recv_req):
        """The scheduler already loaded the target; the draft only needs re-quantizing."""
        self.requantize()
        return True, "Succeeded to update model weights (draft re-quantized)."

    def update_weights_from_ipc(self, recv_req):
        self.requantize()
        return True, "Succeeded to update model weights (draft re-quantized)."

    # ---- control (plugin RPC) ------------------------------------------------------------------------
    def control(self, op: str, **kw) -> dict:
        if op == "stats":
            out = self.stats.as_dict()
            out["timing"] = self.timer.summary()
            out["int4_bytes"] = self._draft_worker.int4_bytes
            out["num_int4_linears"] = len(self._draft_worker.int4_pairs)
            out["last_requant_s"] = self._draft_worker.requant_s
            out["candidates"] = self.gamma_params.candidate_steps
            out["policy"] = self.policy.state_dict()
            if kw.get("reset"):
                self.stats = WorkerStats()
                self.timer.reset()
            return out
        if op == "set_gamma":
            g = kw.get("gamma")
            self.gamma_params.forced = None if g is None or int(g) < 0 else int(g)
            return {"forced": self.gamma_params.forced}
        if op == "end_rollout":
            nd, na = kw.get("num_drafted"), kw.get("num_accepted")
            self.policy.end_rollout(nd, na) if nd is not None else self.policy.end_rollout()
            return {"policy": self.policy.state_dict()}
        if op == "reset_policy":
            self.policy = build_policy(spec_from_env())
            self.gamma_params.policy = self.policy
            return {"policy": self.policy.state_dict()}
        if op == "requantize":
            return {"requant_s": self.requantize()}
        if op == "draft_check":
            return self.draft_check()
        raise ValueError(f"unknown self-spec control op {op!r}")

    @torch.no_grad()
    def draft_check(self) -> dict:
        """Do the Marlin buffers equal a fresh quantization of the target's current weights (bitwise)?"""
        from er_sglang.sglang.marlin_int4 import marlin_pack

        num_equal = 0
        for _, mod, tmod in self._draft_worker.int4_pairs:
            fresh = marlin_pack(tmod.weight.data)
            num_equal += all(torch.equal(mod.er_int4[k], fresh[k]) for k in ("qweight", "scales", "zeros"))
        n = len(self._draft_worker.int4_pairs)
        return {"num_linears": n, "num_equal": num_equal, "all_equal": num_equal == n}
