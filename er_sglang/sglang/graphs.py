"""CUDA-graph states of the self-draft worker, built on SGLang's own DecodeCudaGraphRunner.

One target ModelRunner, one model, one KV pool; what differs between the states is the captured graph set
and the attention backend (each state owns one, as SGLang's adaptive states do):

    plain   the target's plain decode step (DECODE graphs of width 1, every batch size): gamma = 0
    draft   one int4 draft forward (DECODE graphs of width 1, captured inside draft_mode()), B <= B_max
    verify  the target over gamma+1 tokens (TARGET_VERIFY graphs of width gamma+1), B <= B_max(gamma)

SGLang picks the capture mode from `model_runner.spec_algorithm` and the batch sizes from
`model_runner.server_args.cuda_graph_config.decode.bs`; `runner_view` gives the graph runner a shallow copy
of the target runner that differs in exactly those two attributes (same model object, pools, buffers).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time

import torch

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class GraphState:
    name: str
    attn_backend: object
    graph_runner: object | None  # None: eager (graphs disabled, or no batch size in range)
    max_bs: int  # largest batch this state serves (0: the state is never used)
    capture_s: float = 0.0
    mem_gib: float = 0.0


def runner_view(model_runner, *, plain: bool, capture_bs: list[int] | None):
    """Shallow copy of the target ModelRunner; spec_algorithm NONE if `plain`, its own capture-bs list."""
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    view = copy.copy(model_runner)
    if plain:
        view.spec_algorithm = SpeculativeAlgorithm.NONE
    if capture_bs is not None:
        # ServerArgs refuses attribute writes after resolution; this private copy is ours to edit.
        args = copy.copy(model_runner.server_args)
        graph_cfg = copy.deepcopy(args.cuda_graph_config)
        graph_cfg.decode.bs = list(capture_bs)
        object.__setattr__(args, "cuda_graph_config", graph_cfg)
        view.server_args = args
    return view


def set_spec_steps(gamma: int) -> None:
    """SGLang's published speculative_num_steps / num_draft_tokens (read by verify and graph capture)."""
    from sglang.srt.runtime_context import get_context

    get_context().override("er_selfspec", speculative_num_steps=gamma, speculative_num_draft_tokens=gamma + 1)


def capture_state(name: str, model_runner, *, plain: bool, capture_bs: list[int], gamma: int | None = None,
                  draft: bool = False, graphs: bool = True) -> GraphState:
    """A fresh attention backend and (if `graphs` and capture_bs) a DecodeCudaGraphRunner over capture_bs."""
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    from er_sglang.sglang.marlin_int4 import draft_mode

    view = runner_view(model_runner, plain=plain, capture_bs=capture_bs or None)
    torch.cuda.synchronize()
    free0, t0 = torch.cuda.mem_get_info()[0], time.perf_counter()
    backend = view._get_attention_backend(init_new_workspace=True)
    runner = None
    if graphs and capture_bs:
        kw = {} if gamma is None else {"speculative_num_steps": gamma, "speculative_num_draft_tokens": gamma + 1}
        with draft_mode() if draft else contextlib.nullcontext():
            runner = DecodeCudaGraphRunner(view, attn_backend=backend, **kw)
    torch.cuda.synchronize()
    state = GraphState(name, backend, runner, max(capture_bs) if capture_bs else 0,
                       time.perf_counter() - t0, (free0 - torch.cuda.mem_get_info()[0]) / 2**30)
    logger.info("self-spec graph state %s: bs<=%d, %.1f s, %.2f GiB", name, state.max_bs, state.capture_s,
                state.mem_gib)
    return state


def build_states(model_runner, gammas: list[int], bs_list: list[int], bs_max: dict[int, int],
                 startup_gamma: int) -> dict:
    """{"plain": GraphState, "draft": GraphState, gamma: verify GraphState for gamma > 0}.

    The target runner's own startup graphs (TARGET_VERIFY at width startup_gamma+1, every bs) are reused as
    that gamma's verify state; every other gamma gets graphs only for bs <= bs_max[gamma].
    """
    graphs = model_runner.decode_cuda_graph_runner is not None
    states = {"plain": capture_state("plain", model_runner, plain=True, capture_bs=bs_list, graphs=graphs)}
    spec = [g for g in gammas if g > 0]
    draft_bs = [b for b in bs_list if b <= max([bs_max[g] for g in spec] or [0])]
    states["draft"] = capture_state("draft", model_runner, plain=True, capture_bs=draft_bs, draft=True,
                                    graphs=graphs)
    try:
        for g in spec:
            if g == startup_gamma:
                states[g] = GraphState(f"verify{g}", model_runner.attn_backend,
                                       model_runner.decode_cuda_graph_runner, bs_max[g])
                continue
            set_spec_steps(g)
            cap = [b for b in bs_list if b <= bs_max[g]]
            states[g] = capture_state(f"verify{g}", model_runner, plain=False, capture_bs=cap, gamma=g,
                                      graphs=graphs)
    finally:
        set_spec_steps(startup_gamma)
    return states
