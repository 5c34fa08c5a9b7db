"""SGLangEngine: the RolloutEngine on SGLang 0.5.17 with the int4 self-drafter (GPU only).

    eng = SGLangEngine.from_config(cfg)        # cfg.model.path, cfg.spec.{mode,gamma,gamma_ladder,...}, cfg.sglang
    rollouts = eng.generate(prompt_ids, SamplingParams(max_new_tokens=256))
    eng.update_weights(state_dict)             # target in place, then the draft re-quantized in place

spec.mode == "no-sd" starts plain SGLang decoding; every other mode starts STANDALONE, whose worker the
plugin (er_sglang/sglang/plugin.py) replaces with the shared-KV self-draft worker (worker.py): no draft
model is loaded, the target's linears get int4 twins, the draft runs on the target's KV pool, gamma = 0 is
the target's plain decode step, rejection sampling on. Everything SGLang is imported lazily.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from er_sglang.engine import Rollout, SamplingParams, SpecStats, per_request_seeds, request_seed
from er_sglang.int4_linear import resolve_kernel
from er_sglang.sglang.gamma import SPEC_ENV, candidate_gammas

# GPU defaults; `sglang:` overrides them (attention_backend: triton / fa3 with a full install). The device
# kit needs its FLASHINFER=1 build for flashinfer and has no flashinfer sampling kernels (sampling: pytorch).
# Per-request seeds (sampling_seed) are honored only with `sglang.enable_deterministic_inference: true`
# (batch-invariant kernels, slower; off here): docs/reproducibility.md.
ENGINE_DEFAULTS = {"attention_backend": "flashinfer", "sampling_backend": "pytorch", "log_level": "warning"}
# What sleep() releases and wake() resumes: sglang.srt.constants.GPU_MEMORY_ALL_TYPES.
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
POLICY_KEYS = ("margin", "rampup_batch", "ladder_up", "ladder_down", "ladder_patience", "hysteresis",
               "min_dwell_steps", "prior_alpha", "prior_strength", "argmax_gammas", "probe_every")


def _plain(value):
    """OmegaConf lists -> plain lists (the spec travels as JSON to the scheduler process)."""
    return [int(v) for v in value] if hasattr(value, "__len__") and not isinstance(value, str) else value


def check_server_args(sglang_args: dict) -> None:
    """Unknown `sglang:` keys are errors naming the key (checked against ServerArgs' dataclass fields)."""
    from sglang.srt.server_args import ServerArgs

    names = {f.name for f in dataclasses.fields(ServerArgs)}
    for key in sglang_args:
        if key not in names:
            raise ValueError(f"sglang.{key}: not a field of sglang ServerArgs (0.5.17)")


def run_server_args(cfg) -> dict:
    """Server args that follow from the run (the config's `sglang:` block overrides each):

    random_seed          from cfg.seed and this engine's GPU (CUDA_VISIBLE_DEVICES): SGLang's global generator
                         at start, which draws whatever no sampling_seed covers (the self-draft's Gumbel noise,
                         every draw without deterministic inference); a rerun starts it the same, engines on
                         other GPUs apart (one shared stream would correlate their samples)
    dtype                cfg.model.dtype (SGLang's "auto" would run a float32 checkpoint, e.g. a converted
                         alias, in float16)
    enable_memory_saver  colocated with training and torch_memory_saver importable: sleep() frees memory
    """
    import importlib.util
    import logging
    import zlib

    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    out = {"random_seed": zlib.crc32(f"{int(_get(cfg, 'seed', 0))}/{gpu}".encode()) & 0x3FFFFFFF}  # < 2**30
    if _get(cfg, "model.dtype") is not None:
        out["dtype"] = str(_get(cfg, "model.dtype"))
    if _get(cfg, "cluster.placement") == "colocated":
        if importlib.util.find_spec("torch_memory_saver") is not None:
            out["enable_memory_saver"] = True
        else:  # SGLang would raise ImportError in its scheduler and take this process down with it
            logging.getLogger(__name__).warning(
                "cluster.placement=colocated but torch_memory_saver is not installed: engine sleep() frees "
                "no GPU memory (docs/sglang_backend.md, Sleep/wake)")
    return out


def _gpu_used_gib(base_gpu_id: int = 0) -> tuple[float, float] | None:
    """(used, total) GiB of the engine's GPU, device-wide (trainer included), from nvidia-smi; None if that
    fails. Not torch: this process (the engine's owner) must not open a CUDA context of its own."""
    import subprocess

    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    device = visible[base_gpu_id].strip() if base_gpu_id < len(visible) else str(base_gpu_id)
    try:
        query = ["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits",
                 "-i", device]
        out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
        used, total = (float(x) / 1024 for x in out.strip().splitlines()[0].split(","))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return round(used, 3), round(total, 3)


def _get(cfg, dotted: str, default=None):
    cur = cfg
    for part in dotted.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else getattr(cur, part, None)
        if cur is None:
            return default
    return cur


def _finish_reason(meta: dict) -> str:
    fr = meta.get("finish_reason")
    kind = fr.get("type") if isinstance(fr, dict) else fr
    return "length" if kind == "length" else "stop"


class SGLangEngine:
    """RolloutEngine over an in-process sglang.Engine (its scheduler runs in a child process)."""

    is_asleep = False  # sleep() released the weights and KV cache; wake() has not resumed them yet

    def __init__(self, model_path: str, spec: dict, sglang_args: dict | None = None):
        sglang_args = dict(sglang_args or {})
        check_server_args(sglang_args)
        self.model_path = model_path
        self.spec = dict(spec)
        self.mode = self.spec["mode"]
        kwargs = dict(ENGINE_DEFAULTS, model_path=model_path, skip_tokenizer_init=True)
        if self.mode != "no-sd":
            kwargs.update(self._spec_server_args())
            os.environ[SPEC_ENV] = json.dumps(self.spec)
        else:
            os.environ.pop(SPEC_ENV, None)
        kwargs.update(sglang_args)
        self.server_kwargs = kwargs
        self._gpu_id = int(kwargs.get("base_gpu_id") or 0)
        self.memory: dict = {}  # GPU memory and times of the last sleep and wake (each returns its own)
        self._num_calls = 0  # generate() calls: seeds for calls that bring none
        self.engine = self._start(kwargs)
        self._stats_no_sd = SpecStats.fresh()

    @classmethod
    def from_config(cls, cfg) -> SGLangEngine:
        spec = {"mode": _get(cfg, "spec.mode", "no-sd"), "gamma": int(_get(cfg, "spec.gamma", 7)),
                "gamma_ladder": [int(g) for g in _get(cfg, "spec.gamma_ladder", (5, 7, 9, 11))],
                "roofline": _get(cfg, "spec.roofline") or _get(cfg, "roofline.path"),
                "timing": bool(_get(cfg, "spec.timing", False)), "bs_max": _get(cfg, "spec.bs_max"),
                "draft_kernel": resolve_kernel(str(_get(cfg, "spec.draft_kernel", "auto")), "sglang"),
                "policy": {k: _plain(_get(cfg, f"spec.{k}")) for k in POLICY_KEYS
                           if _get(cfg, f"spec.{k}") is not None},
                "draft_vocab": int(_get(cfg, "spec.draft_vocab", 0) or 0),
                "draft_head": str(_get(cfg, "spec.draft_head", "shared"))}
        sglang_args = _get(cfg, "sglang", {}) or {}
        if not isinstance(sglang_args, dict):
            from omegaconf import OmegaConf

            sglang_args = OmegaConf.to_container(sglang_args, resolve=True)
        from er_sglang.models import ALIASES, resolve_model_path

        path = str(_get(cfg, "model.path"))  # an alias -> its converted dir; anything else goes to SGLang as is
        path = str(resolve_model_path(path)) if path in ALIASES else path
        if spec["draft_vocab"]:  # stop and special tokens are always drafted (as the reference engine does)
            from er_sglang.models import draft_vocab_always, load_tokenizer, model_info

            tokenizer = load_tokenizer(path)
            spec["draft_vocab_always"] = draft_vocab_always(model_info(path, tokenizer).stop_token_ids, tokenizer)
        engine = cls(path, spec,
                     {**run_server_args(cfg), **sglang_args})
        engine.warmup()
        return engine

    def warmup(self, max_new_tokens: int = 12) -> float:
        """Decode a little at every candidate gamma (forced), so that SGLang's Triton kernels specialized on
        the verify width (reject sampling's NUM_SLOTS, the cache-location widths) compile now and not inside
        the first rollout that picks that gamma (seconds each; cached on disk afterwards); no-sd decodes once
        (its prefill and decode kernels compile too, so that a first timed rollout compares fairly). The policy
        state, the worker's stats and the seed counter are put back. Returns seconds."""
        t0, state, calls = time.perf_counter(), self.policy_state(), self._num_calls
        gammas = self.rpc("stats")["candidates"] if self.mode != "no-sd" else [None]  # None: plain decoding
        try:
            for gamma in gammas:
                if gamma is not None:
                    self.rpc("set_gamma", gamma=int(gamma))
                self.generate([[11, 12, 13, 14], [21, 22, 23]], SamplingParams(max_new_tokens=max_new_tokens),
                              ignore_eos=True)
        finally:
            if self.mode != "no-sd":
                self.rpc("set_gamma", gamma=-1)
            self.load_policy_state(state)
            self.stats(reset=True)
            self._num_calls = calls
        return time.perf_counter() - t0

    def _spec_server_args(self) -> dict:
        cands = candidate_gammas(self.mode, self.spec["gamma"], self.spec["gamma_ladder"],
                                 (self.spec.get("policy") or {}).get("argmax_gammas"))
        # SGLang sizes shared buffers (logits rows, KV reserve per decode) from the startup gamma: the largest.
        startup = max(cands)
        return {"speculative_algorithm": "STANDALONE", "speculative_draft_model_path": self.model_path,
                "speculative_draft_load_format": "dummy", "speculative_eagle_topk": 1,
                "speculative_num_steps": startup, "speculative_num_draft_tokens": startup + 1,
                "speculative_use_rejection_sampling": True}

    @staticmethod
    def _start(kwargs: dict):
        from sglang.srt.entrypoints.engine import Engine

        from er_sglang.sglang import plugin

        plugin.install("main")

        class _Engine(Engine):
            run_scheduler_process_func = staticmethod(plugin.run_scheduler_process)

        return _Engine(**kwargs)

    # ---- RolloutEngine -------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, **extra) -> list[Rollout]:
        """One rollout per prompt; `extra` goes into SGLang's sampling params (e.g. ignore_eos=True).

        Request i carries its own sampling_seed (params.seeds[i], one derived from params.seed, else one from
        the engine's random_seed and call count: with deterministic inference SGLang gives every request
        without a seed the same one, 42, so G copies of a prompt would sample the same tokens). SGLang honors
        the seeds only with enable_deterministic_inference (docs/reproducibility.md).
        """
        self._num_calls += 1
        base = self.server_kwargs.get("random_seed") or 0  # negative "steps": never an er-train/er-rollout seed
        seeds = (per_request_seeds(params, len(prompts))
                 or [request_seed(base, -self._num_calls, i, 0) for i in range(len(prompts))])
        sps = []
        for i in range(len(prompts)):
            sp = {"temperature": params.temperature, "top_p": params.top_p, "top_k": -1,
                  "max_new_tokens": params.max_new_tokens, **extra}
            if params.stop_token_ids:
                sp["stop_token_ids"] = list(params.stop_token_ids)
            sp["sampling_seed"] = seeds[i]
            sps.append(sp)
        outs = self.engine.generate(input_ids=[list(p) for p in prompts], sampling_params=sps,
                                    return_logprob=True)
        rollouts = []
        for i, (p, o) in enumerate(zip(prompts, outs)):
            meta = o["meta_info"]
            lps = [float(x[0]) for x in meta.get("output_token_logprobs") or []]
            r = Rollout(prompt_index=i, prompt_ids=list(p), output_ids=list(o["output_ids"]), logprobs=lps,
                        finish_reason=_finish_reason(meta), num_drafted=int(meta.get("er_num_drafted", 0)),
                        num_accepted=int(meta.get("spec_num_correct_drafts", 0)),
                        num_verify_steps=int(meta.get("spec_verify_ct", 0)))
            # SGLang (tokenizer_manager, 0.5.17): finished_time - created_time, created when this call submitted
            if meta.get("e2e_latency") is not None:
                r.latency_s = float(meta["e2e_latency"])
            rollouts.append(r)
        if self.mode == "no-sd":
            n = sum(max(len(r.output_ids) - 1, 0) for r in rollouts)
            self._stats_no_sd.num_emitted += n
            self._stats_no_sd.num_seq_steps += n
        return rollouts

    def update_weights(self, state_dict) -> dict[str, float]:
        """Target weights in place (SGLang's tensor path), then the draft re-quantized in place."""
        t0 = time.perf_counter()
        ok, msg = self.engine.update_weights_from_tensor(list(state_dict.items()), flush_cache=True)
        total = time.perf_counter() - t0
        if not ok:
            raise RuntimeError(f"update_weights_from_tensor failed: {msg}")
        requant_s = float(self.rpc("stats")["last_requant_s"]) if self.mode != "no-sd" else 0.0
        return {"load_s": total - requant_s, "requant_s": requant_s}

    @property
    def tp_size(self) -> int:
        return int(self.server_kwargs.get("tp_size") or 1)

    def weights_dtype(self) -> str:
        return self.rpc("weights_dtype")["dtype"]

    def begin_weight_update(self, shapes: dict) -> None:
        """Every name maps onto a parameter of SGLang's model that covers its shape (the probe's views, no
        values read); ValueError naming the first that does not, before any bucket is sent."""
        from er_sglang.weight_probe import sent_probe_mismatch

        shapes = {name: [int(s) for s in shape] for name, shape in shapes.items()}
        held = self.rpc("weights_probe", shapes=shapes, num_values=0)
        empty = {name: {"shape": shape, "dtype": "float32", "values": []} for name, shape in shapes.items()}
        reason = sent_probe_mismatch(empty, {n: {**v, "dtype": "float32"} for n, v in held.items()}, 0)
        if reason:
            raise ValueError(f"update_weights: {reason}")

    def load_weights(self, named: list, last: bool) -> dict[str, float]:
        """One bucket of (name, tensor) through SGLang's tensor path (tensors serialized by SGLang: CPU ones
        through shared memory); the KV cache is flushed after the last. The draft re-quantizes lazily
        before the next decode step (once per sync), so requant_s is that of the previous sync."""
        return self._load(named, None, last)

    def load_weights_serialized(self, payloads: list, last: bool) -> dict[str, float]:
        """One bucket already serialized by the trainer (orchestrator/weight_transfer.pack_ipc: CUDA IPC
        handles to a FlattenedTensorBucket, one payload per TP rank): SGLang's "flattened_bucket" format."""
        return self._load(payloads, "flattened_bucket", last)

    def _load(self, tensors: list, load_format: str | None, last: bool) -> dict[str, float]:
        t0 = time.perf_counter()
        ok, msg = self.engine.update_weights_from_tensor(tensors, load_format=load_format, flush_cache=last)
        if not ok:
            raise RuntimeError(f"update_weights_from_tensor failed: {msg}")
        requant_s = float(self.rpc("stats")["last_requant_s"]) if (last and self.mode != "no-sd") else 0.0
        return {"load_s": time.perf_counter() - t0, "requant_s": requant_s}

    def weights_checksum(self) -> str:
        """Fingerprint of the target's weights (float64 sum and L2 norm per parameter, SGLang names).

        Comparable between engines and before/after updates; not equal to state_dict_checksum (SGLang
        stacks qkv / gate_up, so its tensors are not the trainer's).
        """
        return self.rpc("checksum")["checksum"]

    def weights_probe(self, shapes: dict, num_values: int) -> dict:
        """What the target holds under the trainer's HF names (er_sglang/weight_probe.py), read in the
        scheduler from SGLang's stacked qkv / gate_up parameters (er_sglang/sglang/hf_weights.py); any mode."""
        shapes = {name: [int(s) for s in shape] for name, shape in shapes.items()}
        return self.rpc("weights_probe", shapes=shapes, num_values=int(num_values))

    def draft_check(self) -> dict:
        """{"ok", "num_linears", "num_equal"}: the int4 twins against a fresh Marlin pack of the weights."""
        if self.mode == "no-sd":
            return {"ok": True, "num_linears": 0, "num_equal": 0}
        c = self.rpc("draft_check")
        return {"ok": bool(c["all_equal"]), "num_linears": c["num_linears"], "num_equal": c["num_equal"]}

    def requantize(self) -> float:
        return float(self.rpc("requantize")["requant_s"]) if self.mode != "no-sd" else 0.0

    def sleep(self) -> dict:
        """Release the KV cache and the target's weights for the colocated trainer (SGLang's
        release_memory_occupation; frees memory only when started with enable_memory_saver; CUDA-graph
        pools only with SGLANG_MEMORY_SAVER_CUDA_GRAPH=1, SGLang's default being off).

        The int4 twins are made in alloc_memory_pool, after SGLang's "weights" region closed: they stay
        resident and keep their values. Returns GPU memory (device-wide) before and after, and the time.
        """
        if self.is_asleep:  # SGLang raises on releasing a tag twice
            return {}
        before, t0 = _gpu_used_gib(self._gpu_id), time.perf_counter()
        self.engine.release_memory_occupation(tags=list(MEMORY_TAGS))
        self.is_asleep = True
        out = {"timing/sleep_s": time.perf_counter() - t0}
        after = _gpu_used_gib(self._gpu_id)
        if before and after:
            out.update({"mem/total_gib": before[1], "mem/used_gib_awake": before[0],
                        "mem/used_gib_asleep": after[0], "mem/released_gib": round(before[0] - after[0], 3)})
        self.memory = out
        return out

    def wake(self) -> dict:
        """Resume what sleep() released, at the same virtual addresses (captured CUDA graphs stay valid).

        Resumed memory is not restored (no CPU backup): the weight sync that follows every wake rewrites the
        weights, the KV cache was flushed, and the draft is marked stale, so it is re-quantized from the
        target's weights before the next decode step (once, together with the sync's own mark).
        """
        if not self.is_asleep:  # e.g. an engine restarted after a fault: SGLang raises on resuming an unreleased tag
            return {}
        t0 = time.perf_counter()
        self.engine.resume_memory_occupation(tags=list(MEMORY_TAGS))
        self.is_asleep = False
        if self.mode != "no-sd":
            self.rpc("mark_stale")
        out = {"timing/wake_s": time.perf_counter() - t0}
        after = _gpu_used_gib(self._gpu_id)
        if after:
            out["mem/used_gib_woken"] = after[0]
        self.memory = {**self.memory, **out}
        return out

    def stats(self, reset: bool = False) -> SpecStats:
        if self.mode == "no-sd":
            out = self._stats_no_sd
            if reset:
                self._stats_no_sd = SpecStats.fresh()
            return out
        d = self.rpc("stats", reset=reset)
        return SpecStats(num_steps=d["num_steps"], num_spec_steps=d["num_spec_steps"],
                         num_drafted=d["num_drafted"], num_accepted=d["num_accepted"],
                         num_emitted=d["num_emitted"], num_seq_steps=d["num_seq_steps"],
                         accept_len_hist={int(k): v for k, v in d["accept_len_hist"].items()},
                         gamma_hist={int(k): v for k, v in d["gamma_hist"].items()}, requant_s=d["requant_s"],
                         accept_hist_by_gamma={int(g): {int(k): v for k, v in c.items()}
                                               for g, c in d.get("accept_hist_by_gamma", {}).items()},
                         trace=d.get("trace"))

    def end_rollout(self, num_drafted: int | None = None, num_accepted: int | None = None) -> None:
        if self.mode != "no-sd":
            self.rpc("end_rollout", num_drafted=num_drafted, num_accepted=num_accepted)

    def policy_state(self) -> dict | None:
        """The spec policy's cross-rollout state (JSON-safe; the policy lives in the scheduler); None for no-sd."""
        return self.rpc("policy_state")["policy"] if self.mode != "no-sd" else None

    def load_policy_state(self, state: dict | None) -> None:
        if state is not None and self.mode != "no-sd":
            self.rpc("load_policy_state", state=state)

    def shutdown(self) -> None:
        self.engine.shutdown()

    # ---- control channel (SGLang's RPC socket; plugin._handle_rpc_request answers "er_spec") -----------
    def rpc(self, op: str, **kwargs) -> dict:
        import zmq
        from sglang.srt.managers.io_struct import RpcReqInput, sock_recv, sock_send

        from er_sglang.sglang.plugin import RPC_METHOD

        sock_send(self.engine.send_to_rpc,
                  RpcReqInput(method=RPC_METHOD, parameters={"op": op, "kwargs": json.dumps(kwargs)}))
        reply = sock_recv(self.engine.send_to_rpc, flags=zmq.BLOCKY)
        if not reply.success:
            raise RuntimeError(f"er_spec rpc {op!r} failed: {reply.message}")
        return json.loads(reply.message)
