"""The shared-KV self-draft speculative worker (scheduler process; the plugin REPLACEs STANDALONE's with it).

One model, one KV pool. Every target decoder linear also holds its int4 RTN twin (marlin_int4): inside
`draft_mode()` the same model is the drafter, so embeddings, lm_head, norms, rotary tables and the attention
layers, hence the KV cache, are the target's own. A decode step reads like gpt-fast's speculative_decode:

    gamma = policy(B, S)                       # per step; 0 above B_max(gamma)
    gamma == 0: the target's plain decode step (its own graph, SGLang's sampler), nothing drafted
    else:       gamma int4 forwards from the last committed token on the target's KV -> x_1..x_gamma, q_1..q_gamma
                verify: the target over [x_0, x_1..x_gamma] + chain rejection sampling (SGLang's EAGLE v2 verify)
    account     accepted counts -> policy and stats when SGLang hands them back (on_verify_complete_cpu)

No draft prefill and no draft extend run: the draft needs no KV of its own. Graph capture lives in graphs.py.
"""
from __future__ import annotations

import copy
import logging
import time
from collections import deque

import torch
from sglang.srt.layers.sampler import multinomial_with_seed
from sglang.srt.managers.scheduler import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.eagle_info import EagleDraftInput
from sglang.srt.speculative.eagle_utils import default_tree_mask_mode
from sglang.srt.speculative.eagle_worker_common import build_eagle_verify_input, run_eagle_verify
from sglang.srt.speculative.eagle_worker_v2 import EAGLEWorkerV2
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang.srt.speculative.spec_utils import get_plan_stream, sample_draft_proposal

from er_sglang.replay import ENV as REPLAY_ENV
from er_sglang.replay import ReplayAccept
from er_sglang.sglang.draft_head import HeadedDrafter
from er_sglang.sglang.gamma import GammaChooser, build_policy, spec_from_env
from er_sglang.sglang.graphs import build_states
from er_sglang.sglang.marlin_int4 import draft_mode
from er_sglang.sglang.selfdraft import SelfDrafter
from er_sglang.sglang.stats import HostProfiler, StepTimer, WorkerStats

logger = logging.getLogger(__name__)
DRAFT_SEED_SALT = 0x5EED_D4AF_7E11_0001  # draft noise keys apart from the target's and the verify's


class _DraftSide:
    """What SGLang's scheduler reads of a spec worker's draft side. The drafter has no runner of its own:
    its runner is the target's, so the "draft KV pool" SGLang asks for (disaggregation, HiCache) is the
    target's pool, which is what the draft really reads and writes."""

    weight_load_time = 0.0

    @property
    def graph_memory_usage(self) -> dict:  # the worker reports its graph states itself
        return {}

    @property
    def graph_time_usage(self) -> dict:
        return {}

    def __init__(self, target_worker):
        self._target_worker = target_worker

    @property
    def draft_runner(self):
        return self._target_worker.model_runner

    @property
    def draft_runners(self) -> list:
        return [self.draft_runner]


class SelfSpecWorker(EAGLEWorkerV2):
    def __init__(self, server_args, gpu_id, ps, nccl_port, target_worker):
        BaseSpecWorker.__init__(self)  # EAGLEWorkerV2.__init__ would build a draft model with its own KV pool
        self.server_args = server_args
        self.topk = 1
        self.speculative_num_steps = server_args.speculative_num_steps  # startup gamma = the largest candidate
        self.speculative_num_draft_tokens = server_args.speculative_num_draft_tokens
        self.startup_gamma = self.speculative_num_steps
        self.ps, self.gpu_id, self.device = ps, gpu_id, server_args.device
        self._target_worker = target_worker
        self._draft_worker = _DraftSide(target_worker)  # no draft model, runner or pool of its own
        self.page_size = server_args.page_size
        self.speculative_algorithm = SpeculativeAlgorithm.from_string(server_args.speculative_algorithm)
        self.adaptive_controller = None
        self.tree_mask_mode = default_tree_mask_mode()
        self.plan_stream, self.plan_stream_ctx = get_plan_stream(self.device)
        self.num_new_pages_per_topk = torch.empty((), dtype=torch.int64, device=self.device)
        self.extend_lens = torch.empty((), dtype=torch.int64, device=self.device)

        spec = spec_from_env()
        self.policy = build_policy(spec)
        self.chooser = GammaChooser(self.policy, spec)
        self.timer = StepTimer(bool(spec.get("timing")))
        self.stats = WorkerStats()
        mr = target_worker.model_runner  # the drafter + its head (spec.draft_vocab / draft_head: draft_head.py)
        self.drafter = HeadedDrafter(SelfDrafter(mr.model), spec, mr.model_config)
        self.states: dict = {}
        self._pending: deque[tuple[int, list]] = deque()  # (gamma, reqs) per launched decode step
        self.profiler = HostProfiler.from_env()
        self._chains: dict = {}  # (gamma, B) -> the chain tree's parents / score index
        self.replay = ReplayAccept.from_env()  # benchmark-only replayed acceptance (er_sglang/replay.py)
        if self.replay is not None:
            logger.warning("REPLAYED ACCEPTANCE (%s): accept counts drawn from %s, placeholder tokens emitted; "
                           "for benchmarks only", REPLAY_ENV, self.replay.source)
        self._zeros = None  # zero top-k fields of _seed
        self._flashinfer = server_args.attention_backend == "flashinfer"  # _plan_barrier

    # ---- scheduler lifecycle -------------------------------------------------------------------------
    def alloc_memory_pool(self, memory_pool_config=None, req_to_token_pool=None, token_to_kv_pool_allocator=None):
        """The target's pools are the only pools. The int4 twins are made now, after SGLang sized the KV
        cache, so they come out of the non-static share (like CUDA graphs) and KV tokens equal no-sd's."""
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator
        self.drafter.attach()

    def init_attention_backends(self):
        """Each graph state builds its own backend in init_cuda_graphs."""

    def init_cuda_graphs(self):
        mr = self.target_worker.model_runner
        bs_list = sorted(mr.server_args.cuda_graph_config.decode.bs)
        bs_max = {g: self.chooser.bs_max(g, bs_list) for g in self.chooser.candidates}
        t0 = time.perf_counter()
        self.states = build_states(mr, self.chooser.candidates, bs_list, bs_max, self.startup_gamma)
        self.home = (mr.attn_backend, mr.decode_cuda_graph_runner)
        self.chooser.served_bs = {g: self.states[g].max_bs for g in self.chooser.candidates if g > 0}
        for name, st in self.states.items():
            self._additional_graph_memory_usage[f"selfspec_{name}"] = st.mem_gib
            self._additional_graph_time_usage[f"selfspec_{name}"] = st.capture_s
        self.graph_init_s = time.perf_counter() - t0

    @property
    def spec_v2_attn_backends(self) -> tuple:
        return tuple(st.attn_backend for st in self.states.values()) or (self.target_worker.model_runner.attn_backend,)

    @property
    def war_fastpath_runner(self):
        return self.target_worker.model_runner

    def _use(self, state) -> None:
        """Point the target runner at a state's backend and graphs (SGLang's apply_runtime_state, minus the draft)."""
        mr = self.target_worker.model_runner
        mr.attn_backend, mr.decode_cuda_graph_runner = state.attn_backend, state.graph_runner

    def _go_home(self) -> None:
        mr = self.target_worker.model_runner
        mr.attn_backend, mr.decode_cuda_graph_runner = self.home

    # ---- one scheduler step --------------------------------------------------------------------------
    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None):
        if batch.forward_mode.is_extend() or batch.is_extend_in_batch:
            out = self.target_worker.forward_batch_generation(batch, capture_hidden_mode=CaptureHiddenMode.NULL)
            out.new_seq_lens = batch.seq_lens  # spec v2: seq_lens count tokens whose K/V is written
            if on_publish is not None:
                on_publish(out.new_seq_lens)
            out.next_draft_input = self._seed(out.next_token_ids)
            self.drafter.observe(batch.reqs)  # spec.draft_vocab_counts=tokens: counted at the next subset refresh
            return out
        self.drafter.refresh_if_stale()
        if self.profiler is not None:
            self.profiler.tick()
        bs = len(batch.reqs)
        gamma = self.chooser.choose(bs, self._mean_seq(batch))
        start = self.timer.start()
        if gamma == 0:
            # The next lengths are known before the forward (one token each): publish them now. SGLang's
            # FutureMap gates the next step's seq_lens D2H on this event; published after the forward, it
            # would hold the scheduler until this step's GPU work ends and expose all of the next step's
            # host work, which plain decoding (no FutureMap wait) overlaps with the GPU.
            new_seq_lens = batch.seq_lens + 1
            if on_publish is not None:
                on_publish(new_seq_lens)
            out = self._plain_decode(batch, new_seq_lens, grammar_barrier)
        else:
            draft_tokens, draft_probs = self._draft(batch, gamma)
            out = self._verify(batch, gamma, draft_tokens, draft_probs, grammar_barrier)
            if on_publish is not None:  # accept lengths exist only now
                on_publish(out.new_seq_lens)
        self.timer.stop(start, "step", gamma, bs)
        self._pending.append((gamma, list(batch.reqs)))
        return out

    def _plain_decode(self, batch, new_seq_lens, grammar_barrier=None) -> GenerationBatchResult:
        """gamma = 0: the target's decode step over the bonus token, exactly as SGLang decodes without spec."""
        mr = self.target_worker.model_runner
        bs = len(batch.reqs)
        start = self.timer.start()
        self._switch_gamma(0)
        fb = self._decode_batch(batch, batch.spec_info.bonus_tokens, 0, return_logprob=batch.return_logprob)
        plain = self.states["plain"]
        view = plain.graph_runner.model_runner if plain.graph_runner is not None else None
        self._plan_barrier(plain)
        if view is not None:
            view.war_fastpath_read_done_event = None  # set again only by this step's graph replay
        self._use(plain)
        try:
            res = mr.forward(fb)
        finally:
            self._go_home()
        if view is not None and res.can_run_graph:
            # as plain decoding: the scheduler's WAR barrier waits on the graph's pre-replay read-done event
            # (recorded on this state's runner view) instead of the whole forward (its coarse fallback)
            mr.war_fastpath_read_done_event = view.war_fastpath_read_done_event
        logits = res.logits_output
        if batch.has_grammar and grammar_barrier is not None:
            grammar_barrier()  # overlap: the previous step's tokens reach the grammar FSM before its mask is built
        next_ids = mr.sample(logits, fb)
        if batch.return_logprob and logits.next_token_logprobs is not None:
            logits.next_token_logprobs = logits.next_token_logprobs.reshape(bs, 1)  # spec layout [B, accepted]
        self.timer.stop(start, "decode", 0, bs, graph=res.can_run_graph)
        return GenerationBatchResult(
            logits_output=logits, next_token_ids=next_ids, can_run_cuda_graph=res.can_run_graph,
            speculative_num_draft_tokens=1, next_draft_input=self._seed(next_ids),
            accept_lens=torch.ones(bs, dtype=torch.int32, device=self.device), new_seq_lens=new_seq_lens)

    def _draft(self, batch, gamma: int):
        """gamma single-token int4 forwards on the target's KV pool -> tokens [B, gamma], q [B, gamma, V].

        Step i feeds x_i at its true position L+i (x_0 = the last committed token, whose K/V nobody has
        written yet) and writes the DRAFT's K/V into slot L+i of the shared pool. Those slots are
        uncommitted: the verify below writes the TARGET's K/V for x_0..x_gamma into slots L..L+gamma, layer by
        layer before its attention reads them, so the target never reads draft K/V.
        """
        mr = self.target_worker.model_runner
        bs = len(batch.reqs)
        start = self.timer.start()
        info = batch.sampling_info
        tok = batch.spec_info.bonus_tokens
        tokens, probs = [], []
        self._use(self.states["draft"])
        try:
            with draft_mode():
                for i in range(gamma):
                    fb = self._decode_batch(batch, tok, i, return_logprob=False)
                    self._plan_barrier(self.states["draft"])
                    res = mr.forward(fb)
                    logits = res.logits_output.next_token_logits  # [B, V], a view of a graph buffer
                    if info.is_all_greedy:
                        tok = torch.argmax(logits, dim=-1)
                    else:  # q = softmax(logits / T); x ~ q. The verify needs exactly this q.
                        q, tok = self._draft_sample(logits, info, fb.positions)
                        probs.append(q)
                    tokens.append(tok)
        finally:
            self._go_home()
        self.timer.stop(start, "draft", gamma, bs, graph=res.can_run_graph)  # every forward: the same B
        return torch.stack(tokens, dim=1), (torch.stack(probs, dim=1) if probs else None)

    @staticmethod
    def _draft_sample(logits, info, positions):
        """(q [B, V], x [B]) with x ~ q. With per-request seeds (sglang.enable_deterministic_inference) the
        draft's Gumbel noise is keyed by (seed ^ DRAFT_SEED_SALT, position, token id), as SGLang's own seeded
        sampler keys the target's by (seed, position, token id) and its verify coins by (seed, L, column): a
        request's draft draws no longer depend on the batch around it. Unseeded: SGLang's fast_sample."""
        if info.sampling_seed is None:
            q, _, x = sample_draft_proposal(logits, info.temperatures)
            return q, x.view(-1)
        q = torch.softmax(logits / info.temperatures, dim=-1)
        x = multinomial_with_seed(torch.log(q), info.sampling_seed ^ DRAFT_SEED_SALT, positions)
        return q, x.view(-1)

    def _verify(self, batch, gamma, draft_tokens, draft_probs, grammar_barrier) -> GenerationBatchResult:
        """The target over [x_0, x_1..x_gamma] (TARGET_VERIFY graph of width gamma+1) + chain rejection sampling."""
        bs = len(batch.reqs)
        start = self.timer.start()
        self._switch_gamma(gamma)
        self._use(self.states[gamma])
        if self.replay is not None:  # SGLang's simulated-acceptance hook, one accept length per batch step
            from sglang.srt.speculative import spec_utils

            spec_utils.SIMULATE_ACC_LEN = float(self.replay.draw(gamma) + 1)
        try:
            parents, score_index = self._chain(gamma, bs)
            batch.spec_info = build_eagle_verify_input(
                batch, batch.spec_info, parents, score_index, draft_tokens, draft_probs,
                target_worker=self.target_worker, topk=1, num_steps=gamma, num_draft_tokens=gamma + 1,
                tree_mask_mode=self.tree_mask_mode, device=self.device)
            out = run_eagle_verify(
                batch, target_worker=self.target_worker, req_to_token_pool=self.req_to_token_pool,
                token_to_kv_pool_allocator=self.token_to_kv_pool_allocator, plan_stream=self.plan_stream,
                plan_stream_ctx=self.plan_stream_ctx, topk=1, num_steps=gamma, num_draft_tokens=gamma + 1,
                device=self.device, metadata_ready_pre_pad=False, finalize_tree_path=True,
                grammar_barrier=grammar_barrier)
        finally:
            self._go_home()
        out.next_draft_input = self._seed(out.next_draft_input.bonus_tokens)
        self.timer.stop(start, "verify", gamma, bs, graph=bool(out.can_run_cuda_graph))
        return out

    # ---- small helpers around SGLang's plumbing ------------------------------------------------------
    def _decode_batch(self, batch, input_ids, offset: int, return_logprob: bool) -> ForwardBatch:
        """A DECODE ForwardBatch for the token at position L+offset (L = batch.seq_lens, committed K/V)."""
        b = copy.copy(batch)
        b.forward_mode = ForwardMode.DECODE
        b.input_ids = input_ids.to(torch.int64)
        b.seq_lens = batch.seq_lens + (offset + 1)
        b.seq_lens_cpu = None if batch.seq_lens_cpu is None else batch.seq_lens_cpu + (offset + 1)
        b.seq_lens_sum = None if b.seq_lens_cpu is None else int(b.seq_lens_cpu.sum())
        slot = self.req_to_token_pool.req_to_token[batch.req_pool_indices, batch.seq_lens + offset]
        b.out_cache_loc = slot.to(torch.int64)
        b.spec_info = None
        b.spec_algorithm = SpeculativeAlgorithm.NONE  # a plain decode batch, as SGLang builds without spec
        b.return_logprob = return_logprob
        return ForwardBatch.init_new(b, self.target_worker.model_runner, return_hidden_states_before_norm=False)

    def _chain(self, gamma: int, bs: int):
        """topk = 1 tree = a chain: parent of draft i is draft i-1 (SGLang's _rebuild_topk1_chain_buffers).
        Built once per (gamma, B): SGLang only reads them."""
        key = (gamma, bs)
        if key not in self._chains:
            width = gamma if gamma > 1 else 0
            parents = torch.arange(-1, width - 1, dtype=torch.long, device=self.device).repeat(bs, 1)
            self._chains[key] = parents, torch.arange(gamma, dtype=torch.long, device=self.device).repeat(bs, 1)
        return self._chains[key]

    def _seed(self, bonus_tokens) -> EagleDraftInput:
        """Next step's input: the bonus token only. The zero top-k fields keep SGLang's FutureMap shapes; they
        are views of one zero buffer (SGLang indexes and concatenates them, never writes them)."""
        bs = bonus_tokens.shape[0]
        if self._zeros is None or self._zeros[0].shape[0] < bs:
            n = max(bs, 2 * (0 if self._zeros is None else self._zeros[0].shape[0]), 64)
            self._zeros = (torch.zeros((n, 1), dtype=torch.float32, device=self.device),
                           torch.zeros((n, 1), dtype=torch.int64, device=self.device))
        return EagleDraftInput(bonus_tokens=bonus_tokens.to(torch.int32), topk_p=self._zeros[0][:bs],
                               topk_index=self._zeros[1][:bs], capture_hidden_mode=CaptureHiddenMode.NULL)

    def _plan_barrier(self, state) -> None:
        """flashinfer: wait until the GPU has taken this state's previous plan before planning again.

        A graph replay plans on the host (fast_decode_plan) into the wrapper's page-locked buffer and enqueues
        an async copy of it; nothing syncs, so with the GPU behind, the next plan into the same wrapper (the
        next draft step, or the next gamma = 0 step after the early publish) could overwrite the buffer before
        the copy ran. SGLang's DecodeCudaGraphRunner.execute records an event right after that copy
        (war_fastpath_read_done_event, on this state's runner view): waiting on it keeps the host at most one
        step ahead without idling the GPU (the previous step's graph is already queued)."""
        if not self._flashinfer or state.graph_runner is None:
            return
        view = state.graph_runner.model_runner
        event = getattr(view, "war_fastpath_read_done_event", None)
        if event is not None:
            event.synchronize()
            view.war_fastpath_read_done_event = None

    def _switch_gamma(self, gamma: int) -> None:
        if gamma != self.speculative_num_steps:
            # SGLang's published spec steps are read only when backends and graphs are built (build_states
            # sets them per state); overriding them per switch would only grow its override log without bound
            self.speculative_num_steps, self.speculative_num_draft_tokens = gamma, gamma + 1

    @staticmethod
    def _mean_seq(batch) -> float:
        if batch.seq_lens_cpu is not None:
            return float(batch.seq_lens_cpu.float().mean())
        return sum(len(r.origin_input_ids) + len(r.output_ids) for r in batch.reqs) / max(len(batch.reqs), 1)

    # ---- accounting ----------------------------------------------------------------------------------
    def on_verify_complete_cpu(self, num_correct_drafts_per_req, batch_size: int = 0) -> None:
        """Results come back in launch order (one step late with overlap); a size mismatch drops stale entries.

        Requests already finished or retracted are skipped, as SGLang does. The per-request drafted count
        rides SGLang's (DSPARK-only) cap-token counter to meta_info (plugin._spec_metrics reads it)."""
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

    # ---- weight updates: the target's paths, then the draft re-quantized in place (lazily) ------------
    def update_weights_from_tensor(self, recv_req):
        ok, msg = self.target_worker.update_weights_from_tensor(recv_req)
        if ok:
            self.drafter.mark_stale()
        return ok, msg

    def update_weights_from_disk(self, recv_req):
        self.drafter.mark_stale()  # the scheduler already reloaded the target
        return True, "Succeeded to update model weights (draft re-quantized before the next decode step)."

    def update_weights_from_ipc(self, recv_req):
        self.drafter.mark_stale()
        return True, "Succeeded to update model weights (draft re-quantized before the next decode step)."

    def requantize(self) -> float:
        dt = self.drafter.requantize()
        self.stats.requant_s += dt
        return dt

    def control(self, op: str, **kw) -> dict:
        from er_sglang.sglang.control import handle

        return handle(self, op, **kw)
