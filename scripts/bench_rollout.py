"""Rollout wall time of every spec mode against plain decoding on long-tailed GRPO batches (issue 10).

    python scripts/bench_rollout.py real CONFIG.yaml [key=value ...] --json OUT.json [--modes ...] [--rollouts 3]
    python scripts/bench_rollout.py replay CONFIG.yaml [key=value ...] --from REAL.json --json OUT.json
    python scripts/bench_rollout.py merge --json ALL.json A.json B.json ...  # e.g. one device call per mode
    python scripts/bench_rollout.py plot --json OUT.json --png OUT.png [--part replay_7b]
    python scripts/bench_rollout.py table --json OUT.json   # plot, table, breakdown: scripts/bench_rollout_report.py
    python scripts/bench_rollout.py breakdown --json OUT.json [--out BREAKDOWN.json]   # where the long tail's time goes

`real`: CONFIG is an er-rollout / er-train experiment file (model, data, template, G, sampling, engine); every
mode in --modes gets its own engine and --rollouts consecutive rollouts of the same prompts with the same
seeds (rollout r uses seed + r), so the acceptance priors and the ladder evolve between rollouts as in RL.
Each run records wall time, tokens, acceptance, the gamma histogram, per-gamma accept histograms, response
lengths, an `active_curve` for every mode (CURVE_DOC: one estimator for all, plain SGLang included) and,
where the engine keeps one (ER_TRACE_STEPS; not plain SGLang), the per-step `trace` of the active batch.
The prompts are er-train's first seeded batch of the data file (`data.first_batch`), the same for every mode
and rollout.

`replay`: the same modes on another model (e.g. Qwen2.5-7B shapes, random weights: model.path=/tmp/q7
sglang.load_format=dummy), replaying REAL's response lengths (ignore_eos, per-request max_new_tokens) and its
measured per-gamma acceptance (er_sglang/replay.py; the worker emits placeholder tokens, so every run of this
part is labelled `replay`). GPU only.

Both parts add the model's prediction of each run's wall time: the mode's own policy and the roofline
(spec.roofline) stepped over the measured response lengths with the measured acceptance (`predict_wall`).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MODES = ["no-sd", "rtn", "toggle", "adaptive", "argmax"]
TRACE_POINTS = 2000
CURVE_DOC = ("active_curve: [t_s from the generate call's submission, requests still running, tokens/s estimated "
             "as the sum over those of len_j / latency_s_j], at t = 0 and after finish events; a step function")


def load_job(config: str, overrides: list[str], mode: str):
    """The RolloutJob of `config` (an er-train file's training sections left out) with spec.mode=mode."""
    from er_sglang.config import RolloutJob, foreign_keys, load_config

    ignored = foreign_keys(RolloutJob, config)
    return load_config(RolloutJob, [config, *overrides, f"spec.mode={mode}"], ignore=tuple(ignored))


def thin(trace: list | None, points: int = TRACE_POINTS) -> list | None:
    """Every k-th step of a long step trace (the first and last kept): [t_s (from the first step), active, gamma,
    tokens emitted since the previous kept point, this step's included], so that emitted / (t - previous t) is
    the token rate over the window between two kept points."""
    if not trace:
        return trace
    t0 = trace[0][0]
    k = max(1, len(trace) // points)
    idx = list(range(0, len(trace), k)) + ([len(trace) - 1] if (len(trace) - 1) % k else [])
    prev = [-1] + idx[:-1]
    return [[round(trace[i][0] - t0, 4), trace[i][1], trace[i][2], sum(s[3] for s in trace[p + 1: i + 1])]
            for p, i in zip(prev, idx)]


def active_curve(lengths: list[int], latencies: list) -> list | None:
    """[t_s, active, tokens_per_s] of one rollout from each request's finish time alone (CURVE_DOC), so every
    mode gets the same estimator (plain SGLang keeps no step trace). All requests are submitted at t = 0, so
    active(t) = #{j: latency_s_j > t} exactly; request j is taken to emit its len_j tokens uniformly over
    [0, latency_s_j], so tokens_per_s(t) = sum over active j of len_j / latency_s_j. One point at t = 0 and
    one after each distinct finish time (the value holds until the next point). Never thinned (at most one point
    per request): a thinned curve drops the last requests' points, the very tail that `breakdown` measures.
    None without latencies."""
    if not latencies or any(lat is None for lat in latencies):
        return None
    pairs = sorted((float(lat), n) for n, lat in zip(lengths, latencies) if lat > 0)  # lat <= 0: never active
    rate_from = [0.0] * (len(pairs) + 1)  # rate_from[i]: the rate of pairs[i:]
    for i in range(len(pairs) - 1, -1, -1):
        rate_from[i] = rate_from[i + 1] + pairs[i][1] / pairs[i][0]
    curve = [[0.0, len(pairs), round(rate_from[0], 1)]]
    for i, (lat, _) in enumerate(pairs):
        if i + 1 == len(pairs) or pairs[i + 1][0] > lat:  # the last request finishing at t = lat
            curve.append([round(lat, 4), len(pairs) - i - 1, round(rate_from[i + 1], 1)])
    return curve


def predict_wall(lengths: list[int], prompt_len: float, policy, roofline, accept, seed: int = 0,
                 served_bs: dict | None = None) -> dict:
    """Model wall time of one rollout: every sequence active until it has emitted its measured length; each
    step the policy picks gamma from (B, mean S), and as the GPU worker does, gamma > 0 runs only where the
    engine has its graphs (B <= served_bs[gamma]; None: everywhere); accepted drafts are drawn per sequence
    from `accept` (er_sglang.replay.ReplayAccept of the run's own histograms); the step costs T_T (gamma = 0)
    or o_D + gamma*T_D + T_V (Roofline.t_sd_step). Prefill is not modelled."""
    rng = random.Random(seed)
    accept.rng = rng
    done = [0] * len(lengths)
    active = [i for i, n in enumerate(lengths) if n > 0]
    wall, steps = 0.0, 0
    policy.begin_rollout(len(active))
    while active:
        B = len(active)
        S = prompt_len + sum(done[i] for i in active) / B
        gamma = policy.choose_gamma(B, S)
        if gamma > 0 and served_bs is not None and B > served_bs.get(gamma, 0):
            gamma = 0
        wall += float(roofline.t_sd_step(B, S, gamma))  # T_T at gamma = 0
        acc = [accept.draw(gamma) for _ in active] if gamma else [0] * B
        if gamma > 0:
            policy.observe(gamma, acc)
        for i, a in zip(active, acc):
            done[i] = min(done[i] + a + 1, lengths[i])
        active = [i for i in active if done[i] < lengths[i]]
        steps += 1
    return {"predicted_wall_s": round(wall, 3), "predicted_steps": steps}


def _policy_and_roofline(cfg):
    from er_sglang.config import resolve_path
    from er_sglang.policy import SpecPolicy
    from er_sglang.roofline import Roofline, RooflineParams

    roof = Roofline(RooflineParams.from_json(resolve_path(cfg.spec.roofline)))
    mode = cfg.spec.mode
    policy = SpecPolicy.from_config(cfg.spec, roofline=roof if mode in ("toggle", "adaptive", "argmax") else None)
    return policy, roof


class Runner:
    def __init__(self, args, part: str):
        self.args, self.part = args, part
        self.out = {"part": part, "device": None, "meta": {"cmd": " ".join(sys.argv), "date": time.strftime("%F"),
                                                           "active_curve": CURVE_DOC}, "runs": []}

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.args.json)), exist_ok=True)
        with open(self.args.json, "w") as f:
            json.dump(self.out, f, indent=1)

    def run_mode(self, cfg, prompts: list[list[int]], max_new: list[int] | None, policy_state=None) -> None:
        from er_sglang.engine import SamplingParams
        from er_sglang.replay import ReplayAccept, build_replay
        from er_sglang.rollout import make_engine

        engine = make_engine(cfg)
        if self.out["device"] is None:
            self.out["device"] = _device_name(cfg)
        mode = cfg.spec.mode
        try:
            served = _served_bs(engine)
            for r in range(self.args.rollouts):
                params = SamplingParams(max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                                        top_p=cfg.sampling.top_p, seed=cfg.seed + r)
                if hasattr(engine, "engine"):  # SGLang: as after an RL weight sync, no prompt is cached
                    engine.engine.flush_cache()
                state0 = engine.policy_state()  # what the engine's policy starts this rollout from
                engine.stats(reset=True)
                t0 = time.perf_counter()
                if max_new is None:
                    rollouts = engine.generate(prompts, params)
                else:  # replay: each request stops at its measured length
                    rollouts = _generate_lengths(engine, prompts, params, max_new)
                wall = time.perf_counter() - t0
                st = engine.stats(reset=True)
                engine.end_rollout()
                lengths = [len(x.output_ids) for x in rollouts]
                run = {"part": self.part, "mode": mode, "rollout": r, "wall_s": round(wall, 3),
                       "num_sequences": len(rollouts), "num_tokens": sum(lengths),
                       "tokens_per_s": round(sum(lengths) / wall, 2) if wall > 0 else 0.0,
                       "accept_rate": round(st.accept_rate, 4), "mean_accept_len": round(st.mean_accept_len, 4),
                       "spec_on_frac": round(st.spec_on_frac, 4),
                       "gamma_hist": {str(k): v for k, v in sorted(st.gamma_hist.items())},
                       "accept_hist_by_gamma": {str(g): {str(k): n for k, n in sorted(c.items())}
                                                for g, c in sorted(st.accept_hist_by_gamma.items())},
                       "num_decode_steps": st.num_steps, "lengths": lengths, "trace": thin(st.trace),
                       "active_curve": active_curve(lengths, [getattr(x, "latency_s", None) for x in rollouts])}
                if self.part != "real":
                    run["replay"] = True
                policy, roof = _policy_and_roofline(cfg)
                if state0 is not None:
                    policy.load_state_dict(state0)
                hist = run["accept_hist_by_gamma"] or {}
                accept = ReplayAccept(build_replay([hist], "run")) if hist else ReplayAccept(
                    {"accept_hist_by_gamma": {}, "alpha_iid": 0.0})
                prompt_len = sum(len(p) for p in prompts) / max(len(prompts), 1)
                run.update(predict_wall(lengths, prompt_len, policy, roof, accept, seed=r, served_bs=served))
                self.out["runs"].append(run)
                self.save()
                print(json.dumps({k: v for k, v in run.items() if k not in ("lengths", "trace", "active_curve")}), flush=True)
        finally:
            if hasattr(engine, "shutdown"):
                engine.shutdown()


def _served_bs(engine) -> dict | None:
    """{gamma: largest B with speculation graphs} of a GPU engine (None: the CPU engine speculates at any B)."""
    if not hasattr(engine, "rpc") or engine.mode == "no-sd":
        return None
    return {int(g): int(b) for g, b in (engine.rpc("stats").get("served_bs") or {}).items()}


def _device_name(cfg) -> str:
    if cfg.engine == "sglang":  # nvidia-smi, not torch: this driver must not open a CUDA context of its own
        from er_sglang.calibrate import gpu_name

        return gpu_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def _generate_lengths(engine, prompts, params, max_new: list[int]):
    """One SGLang generate call, request i stopping at max_new[i] tokens (ignore_eos); SGLang engine only."""
    from types import SimpleNamespace

    if not hasattr(engine, "engine"):
        raise ValueError("replay: needs engine=sglang (per-request lengths and replayed acceptance are GPU-only)")
    sps = [{"temperature": params.temperature, "top_p": params.top_p, "top_k": -1, "max_new_tokens": int(n),
            "ignore_eos": True, "sampling_seed": int(params.seed) + i} for i, n in enumerate(max_new)]
    # log-probs as SGLangEngine.generate asks for them (RL needs them): the replay times the same work
    outs = engine.engine.generate(input_ids=[list(p) for p in prompts], sampling_params=sps, return_logprob=True)
    return [SimpleNamespace(output_ids=o["output_ids"], latency_s=o["meta_info"].get("e2e_latency")) for o in outs]


def encode(cfg) -> list[list[int]]:
    from er_sglang.data import first_batch, load_dataset
    from er_sglang.models import load_tokenizer, resolve_model_path
    from er_sglang.rollout import encode_prompts

    examples = first_batch(load_dataset(cfg.data.train, size=cfg.data.size, seed=cfg.data.seed),
                           cfg.data.prompts_per_step, cfg.data.seed)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.path))
    return encode_prompts(examples, cfg.data.template, tokenizer, cfg.data.samples_per_prompt)


def cmd_real(args) -> None:
    os.environ["ER_TRACE_STEPS"] = "1"
    jobs = [load_job(args.config, args.overrides, m) for m in args.modes]  # every mode validated first
    prompts = encode(jobs[0])
    runner = Runner(args, "real")
    runner.out["meta"].update({"num_prompts": len(prompts), "model": jobs[0].model.path})
    for cfg in jobs:
        runner.run_mode(cfg, prompts, None)
    runner.save()


def cmd_replay(args) -> None:
    from er_sglang.replay import ENV, build_replay

    with open(args.source) as f:
        real = json.load(f)
    runs = [r for r in real["runs"] if r["part"] == "real"]
    if not runs:
        raise ValueError(f"--from: {args.source} has no runs of part real")
    first = min(runs, key=lambda r: (r["mode"] != "no-sd", r["rollout"]))  # no-sd's lengths: the natural ones
    spec = build_replay([r["accept_hist_by_gamma"] for r in runs if r["mode"] != "no-sd"], args.source)
    path = os.path.abspath(args.json + ".accept.json")
    with open(path, "w") as f:
        json.dump(spec, f, indent=1)
    os.environ[ENV] = path
    os.environ["ER_TRACE_STEPS"] = "1"
    jobs = [load_job(args.config, args.overrides, m) for m in args.modes]
    lengths = [max(n, 1) for n in first["lengths"]]
    prompt_len = args.prompt_len
    prompts = [[1000 + (7 * i + j) % 30000 for j in range(prompt_len)] for i in range(len(lengths))]
    runner = Runner(args, args.part_name)
    runner.out["meta"].update({"replay_of": args.source, "replay_lengths_from": f"{first['mode']} rollout "
                               f"{first['rollout']}", "replay_accept": spec, "prompt_len": prompt_len})
    for cfg in jobs:
        runner.run_mode(cfg, prompts, lengths)
    runner.save()


def merge_docs(docs: list[tuple[str, dict]]) -> dict:
    """One bench_rollout JSON from several (e.g. one device call per mode, then the replay part): runs in
    order; ValueError if the devices differ or a (part, mode, rollout) run appears twice."""
    devices = {d.get("device") for _, d in docs}
    if len(devices) != 1:
        raise ValueError(f"merge: runs from different devices {sorted(map(str, devices))}")
    seen, runs = {}, []
    for path, d in docs:
        for r in d["runs"]:
            key = (r["part"], r["mode"], r["rollout"])
            if key in seen:
                raise ValueError(f"merge: run {key} is in both {seen[key]} and {path}")
            seen[key] = path
            runs.append(r)
    parts = list(dict.fromkeys(r["part"] for r in runs))
    return {"part": "+".join(parts), "device": devices.pop(), "runs": runs,
            "meta": {"merged_from": [path for path, _ in docs], "sources": [d["meta"] for _, d in docs]}}


def cmd_merge(args) -> None:
    docs = []
    for path in args.inputs:
        with open(path) as f:
            docs.append((path, json.load(f)))
    merged = merge_docs(docs)
    with open(args.json, "w") as f:
        json.dump(merged, f, indent=1)
    print(f"merged {len(merged['runs'])} runs ({merged['part']}) from {len(docs)} files into {args.json}")


def main(argv=None) -> int:
    from er_sglang.config import BAD_INPUT, report_bad_input

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("real", "replay"):
        q = sub.add_parser(name)
        q.add_argument("config")
        q.add_argument("overrides", nargs="*")
        q.add_argument("--json", required=True)
        q.add_argument("--modes", type=lambda x: x.split(","), default=MODES)
        q.add_argument("--rollouts", type=int, default=3)
        if name == "replay":
            q.add_argument("--from", dest="source", required=True)
            q.add_argument("--part-name", default="replay_7b")
            q.add_argument("--prompt-len", type=int, default=256)
    for name in ("plot", "table", "breakdown"):
        q = sub.add_parser(name)
        q.add_argument("--json", required=True)
        if name == "plot":
            q.add_argument("--png", required=True)
            q.add_argument("--part", help="which part's runs (default: the first run's)")
        if name == "breakdown":
            q.add_argument("--out", help="write the breakdown as JSON here")
    q = sub.add_parser("merge", help="several runs' JSON (e.g. one device call per mode) into one")
    q.add_argument("--json", required=True, help="the merged output")
    q.add_argument("inputs", nargs="+")
    args = p.parse_args(argv)
    from scripts.bench_rollout_report import cmd_breakdown, cmd_plot, cmd_table  # reading a JSON only

    try:
        {"real": cmd_real, "replay": cmd_replay, "plot": cmd_plot, "table": cmd_table,
         "breakdown": cmd_breakdown, "merge": cmd_merge}[args.cmd](args)
    except BAD_INPUT as exc:
        return report_bad_input(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
