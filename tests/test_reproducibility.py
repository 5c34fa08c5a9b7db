"""Per-request sampling seeds (docs/reproducibility.md) and the SGLang engine's sleep/wake, on CPU.

Seeds: one per (run seed, step, prompt, sample), blind to the engine that serves the request, so a rerun
with another engine count hands every request the same seed; the reference engine reproduces a rollout
bit for bit from the same seeds. SGLangEngine is exercised without SGLang (its sglang.Engine replaced by a
recorder): what it sends per request, what it starts with, what sleep/wake ask of SGLang.
"""
from __future__ import annotations

import importlib.util
import zlib
from types import SimpleNamespace

import pytest

from er_sglang.engine import Rollout, SamplingParams, SpecStats, request_seed, request_seeds
from er_sglang.sglang import engine as sgl_engine
from er_sglang.sglang.engine import MEMORY_TAGS, SGLangEngine, run_server_args


# ---- seeds ---------------------------------------------------------------------------------------------
def test_request_seed_unique_over_runs_steps_prompts_samples():
    keys = [(r, s, p, k) for r in (0, 1) for s in range(1, 41) for p in range(16) for k in range(8)]
    seeds = [request_seed(*key) for key in keys]
    assert len(set(seeds)) == len(keys) == 10240
    assert all(0 <= s < 2**63 for s in seeds)  # SGLang keeps sampling_seed in int64


def test_request_seed_avoids_the_old_collisions():
    # the old per-call seed run * 1_000_003 + step * 101 + engine, + i per request, collided across
    # engines (engine 0 request 1 == engine 1 request 0) and steps (step 1 request 0 == step 0 request 101)
    assert request_seed(0, 0, 0, 1) != request_seed(0, 0, 1, 0)
    assert request_seed(0, 1, 0, 0) != request_seed(0, 0, 101, 0)
    assert request_seed(0, 2, 3, 4) == request_seed(0, 2, 3, 4)


def test_request_seed_golden_value():
    # sha256(b"0/1/0/0")[:8] little-endian >> 1: a new formula would resample every run (pinned on purpose)
    assert request_seed(0, 1, 0, 0) == 1181412056806849491


def test_request_seeds_flat_batch_keeps_groups_adjacent():
    seeds = request_seeds(5, 3, num_prompts=2, group=3)
    assert seeds == [request_seed(5, 3, p, k) for p in range(2) for k in range(3)]


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _SeedEcho:
    """A Ray engine handle whose rollout i outputs the seed request i was given."""

    def __init__(self):
        self.generate = _Remote(lambda prompts, params: [Rollout(0, p, [s], [0.0], "stop")
                                                         for p, s in zip(prompts, params.seeds)])
        self.stats = _Remote(lambda reset=False: SpecStats())


def _seeds_by_request(num_engines: int, step: int, monkeypatch) -> list[int]:
    from orchestrator import train

    monkeypatch.setattr(train, "ray", SimpleNamespace(get=lambda x: x))
    cfg = SimpleNamespace(seed=7, data=SimpleNamespace(samples_per_prompt=4),
                          sampling=SimpleNamespace(max_new_tokens=8, temperature=1.0, top_p=1.0))
    lengths = [3, 9, 1, 5, 7, 2]  # unequal prompts: the groups are balanced differently per engine count
    prompt_ids = [[1] * n for n in lengths for _ in range(4)]
    rollouts, _ = train.generate([_SeedEcho() for _ in range(num_engines)], prompt_ids, cfg, step)
    return [r.output_ids[0] for r in rollouts]


def test_generate_seeds_do_not_depend_on_engine_count(monkeypatch):
    one = _seeds_by_request(1, step=1, monkeypatch=monkeypatch)
    assert one == request_seeds(7, 1, num_prompts=6, group=4)
    assert _seeds_by_request(2, step=1, monkeypatch=monkeypatch) == one
    assert _seeds_by_request(3, step=1, monkeypatch=monkeypatch) == one
    assert not set(_seeds_by_request(2, step=2, monkeypatch=monkeypatch)) & set(one)  # a new step, new seeds


# ---- the reference engine: same seeds, same rollouts -----------------------------------------------------
def _reference(mode: str):
    from er_sglang.drafter import build_drafter
    from er_sglang.policy import SpecPolicy
    from er_sglang.reference import ReferenceEngine
    from tests.tiny import tiny_llama

    target = tiny_llama(0)
    drafter = None if mode == "no-sd" else build_drafter(target, group_size=32, backend="rtn")
    return ReferenceEngine(target, SpecPolicy(mode=mode, gamma=3), drafter)


@pytest.mark.parametrize("mode", ["no-sd", "rtn"])
def test_reference_engine_same_seeds_same_rollouts(mode):
    prompts = [[1, 5, 9, 2], [3, 4], [7, 7, 1]] * 2
    seeds = request_seeds(0, 1, num_prompts=3, group=2)
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seeds=seeds)
    first = _reference(mode).generate(prompts, params)
    again = _reference(mode).generate(prompts, params)
    other = _reference(mode).generate(prompts, SamplingParams(max_new_tokens=24, seeds=request_seeds(0, 2, 3, 2)))
    assert [r.output_ids for r in again] == [r.output_ids for r in first]
    assert [r.logprobs for r in again] == [r.logprobs for r in first]  # bit for bit
    assert [r.output_ids for r in other] != [r.output_ids for r in first]


# ---- SGLangEngine without SGLang ---------------------------------------------------------------------------
class _FakeSGLang:
    """Records what SGLangEngine asks of sglang.Engine."""

    def __init__(self):
        self.calls: list = []

    def generate(self, input_ids, sampling_params, return_logprob):
        self.calls.append(("generate", sampling_params))
        return [{"output_ids": [9], "meta_info": {"output_token_logprobs": [(-0.5, 9, None)],
                                                  "finish_reason": {"type": "stop"}}} for _ in input_ids]

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release", tags))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume", tags))


def _bare_engine(mode: str) -> SGLangEngine:
    eng = object.__new__(SGLangEngine)  # no scheduler process
    eng.mode, eng.engine, eng._gpu_id, eng.memory, eng._num_calls = mode, _FakeSGLang(), 0, {}, 0
    eng.server_kwargs = {"random_seed": 5}
    eng._stats_no_sd = SpecStats()
    return eng


def test_sglang_engine_sends_each_request_its_seed():
    eng = _bare_engine("no-sd")
    seeds = request_seeds(3, 4, num_prompts=2, group=2)
    eng.generate([[1, 2]] * 4, SamplingParams(max_new_tokens=4, seeds=seeds))
    assert [sp["sampling_seed"] for sp in eng.engine.calls[-1][1]] == seeds
    eng.generate([[1, 2]] * 3, SamplingParams(max_new_tokens=4, seed=11))  # one seed: derived per request
    assert [sp["sampling_seed"] for sp in eng.engine.calls[-1][1]] == [request_seed(11, 0, i, 0) for i in range(3)]
    # no seed at all: still one per request (SGLang's deterministic mode would give each the same, 42)
    eng.generate([[1, 2]] * 2, SamplingParams(max_new_tokens=4))
    eng.generate([[1, 2]] * 2, SamplingParams(max_new_tokens=4))
    unseeded = [sp["sampling_seed"] for call in eng.engine.calls[-2:] for sp in call[1]]
    assert unseeded == [request_seed(5, -call, i, 0) for call in (3, 4) for i in range(2)]
    assert len(set(unseeded)) == 4
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        eng.generate([[1, 2]] * 3, SamplingParams(max_new_tokens=4, seeds=seeds[:2]))


@pytest.mark.parametrize("mode", ["no-sd", "argmax"])
def test_sglang_engine_sleep_releases_all_tags_and_wake_marks_the_draft_stale(mode, monkeypatch):
    used = iter([(30.0, 140.0), (6.5, 140.0), (29.0, 140.0)])  # GiB: awake, asleep, woken
    monkeypatch.setattr(sgl_engine, "_gpu_used_gib", lambda gpu=0: next(used))
    eng = _bare_engine(mode)
    rpcs = []
    eng.rpc = lambda op, **kw: rpcs.append(op) or {}
    slept = eng.sleep()
    woke = eng.wake()
    assert eng.engine.calls == [("release", list(MEMORY_TAGS)), ("resume", list(MEMORY_TAGS))]
    assert set(MEMORY_TAGS) == {"kv_cache", "weights", "cuda_graph"}  # sglang.srt.constants.GPU_MEMORY_ALL_TYPES
    assert rpcs == ([] if mode == "no-sd" else ["mark_stale"])  # not "requantize": the weights are stale here
    assert (slept["mem/used_gib_awake"], slept["mem/used_gib_asleep"], slept["mem/released_gib"]) == (30.0, 6.5, 23.5)
    assert woke["mem/used_gib_woken"] == 29.0 and slept["mem/total_gib"] == 140.0
    assert eng.memory["mem/released_gib"] == 23.5 and "timing/wake_s" in eng.memory


def test_sglang_engine_sleep_without_nvidia_smi_reports_times_only(monkeypatch):
    monkeypatch.setattr(sgl_engine, "_gpu_used_gib", lambda gpu=0: None)
    eng = _bare_engine("no-sd")
    assert set(eng.sleep()) == {"timing/sleep_s"} and set(eng.wake()) == {"timing/wake_s"}


def _has_memory_saver(installed: bool, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "torch_memory_saver"
                        else real(name, *a))


@pytest.mark.parametrize("placement, installed, saver", [("colocated", True, True), ("colocated", False, False),
                                                         ("split", True, False)])
def test_sglang_run_server_args(placement, installed, saver, monkeypatch):
    _has_memory_saver(installed, monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    cfg = {"seed": 3, "model": {"dtype": "bfloat16"}, "cluster": {"placement": placement}}
    args = run_server_args(cfg)
    assert args.pop("enable_memory_saver", False) is saver
    assert args == {"random_seed": zlib.crc32(b"3/0") & 0x3FFFFFFF, "dtype": "bfloat16"}
    assert set(run_server_args({"seed": 1})) == {"random_seed"}  # er-rollout: no cluster, no memory saver


def test_sglang_random_seed_follows_the_run_seed_and_the_gpu(monkeypatch):
    def seed_on(gpu: str, run_seed: int) -> int:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpu)
        return run_server_args({"seed": run_seed})["random_seed"]

    assert seed_on("0", 3) == seed_on("0", 3)  # a rerun starts SGLang's generator the same
    assert len({seed_on("0", 3), seed_on("1", 3), seed_on("0", 4)}) == 3  # engines and runs apart
    assert all(0 <= seed_on(g, 3) < 2**30 for g in ("0", "1", ""))  # numpy's seed range and SGLang's own


def test_sglang_engine_from_config_config_sglang_block_wins(monkeypatch):
    _has_memory_saver(True, monkeypatch)
    monkeypatch.setattr(sgl_engine, "check_server_args", lambda args: None)
    monkeypatch.setattr(SGLangEngine, "_start", staticmethod(lambda kwargs: _FakeSGLang()))
    cfg = {"seed": 5, "model": {"path": "/models/x", "dtype": "bfloat16"}, "spec": {"mode": "no-sd"},
           "cluster": {"placement": "colocated"}, "sglang": {"random_seed": 42, "attention_backend": "triton"}}
    eng = SGLangEngine.from_config(cfg)
    kw = eng.server_kwargs
    assert (kw["model_path"], kw["random_seed"], kw["attention_backend"]) == ("/models/x", 42, "triton")
    assert kw["enable_memory_saver"] is True and kw["dtype"] == "bfloat16"
    assert "enable_deterministic_inference" not in kw  # off by default: batch-invariant kernels cost speed


def test_control_mark_stale_marks_the_drafter():
    from er_sglang.sglang.control import handle
    from er_sglang.sglang.selfdraft import SelfDrafter

    worker = SimpleNamespace(drafter=SelfDrafter(model=None))
    assert handle(worker, "mark_stale") == {"is_stale": True}
    assert worker.drafter.is_stale
