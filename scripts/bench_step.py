"""ms per decode step, AR vs self-speculative at each gamma, Qwen2.5-7B shapes with random weights (GPU).

    python scripts/bench_step.py make --model /tmp/q7                 # config.json only (weights: dummy)
    python scripts/bench_step.py run --model /tmp/q7 --json OUT.json  # AR engine, then SD (all gammas)
    python scripts/bench_step.py plot --json OUT.json --png OUT.png   # anywhere with matplotlib
    python scripts/bench_step.py table --json OUT.json                # markdown for docs/benchmarks.md
    python scripts/bench_step.py profile --model /tmp/q7 --json P.json --trace-dir DIR  # torch-profiler traces

SD: one SGLangEngine (shared-KV self-draft worker, rejection sampling, graph states for every gamma at every
B), gamma pinned per point through the plugin RPC; the worker's CUDA events time each decode step ("step"),
the gamma draft forwards ("draft"; t_draft_step_ms = ONE forward incl. its sampling = draft / gamma), the
target verify ("verify") and, at gamma = 0, the plain decode step ("decode"). Only steps that ran the full
batch B count. AR: plain SGLang (no speculation) in a second engine of the same run.
Each part runs in its own process, AR first (within --ar-budget-s), then SD with the time left: SGLang kills
the process owning an engine whose scheduler fails, and the other part's records must survive that. An SD part
that dies before its first record is retried once with graph states up to B = 16 (meta.sd_start_error; later
variants then start with them); a failed part is recorded in meta.<part>_error and the run exits non-zero.
meta also records the model's shapes and F_eff (GEMM benchmark), so `er-calibrate --from-json OUT.json` fits
this GPU's roofline from a run with no further measuring.
ms_per_step_wall = (T(N+1 tokens) - T(1 token)) / steps, wall clock with the prompt cached, for both; the
gamma = 0 vs AR comparison uses it. Points run in priority order (S=2048 first) until --limit-s; the JSON
is rewritten after every point, and each point's output line starts with `[k/N points, t/T s]` (this part's grid,
its budget).
Variants (issue 9, r = T_draft_step / T_AR per variant): `--variants 'marlin,gemlite,marlin+vocab=32768+head=int4'`
measures AR once, then one SD child per variant (spec.draft_kernel, + spec.draft_vocab = K, + spec.draft_head),
each within an equal share of the time left; `--draft-kernel K` is the one-variant case. Every SD record names its
variant in `variant` (AR records: "ar"); meta.sd, meta.sd_start_error and meta.sd_error are keyed by variant, and a
failed variant leaves the others running. `table` takes several runs' JSON files (r against the AR of whichever
file has it) and, with --accept, the predicted and measured per-step gain (scripts/bench_step_report.py).
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
from scripts.bench_step_variant import (
    KERNELS,
    Variant,
    draft_vocab_always,
    parse_server_arg,
    parse_variant,
    parse_variants,
)

ROOFLINE = os.path.join(ROOT, "configs", "roofline", "a100_tp1_qwen2.5-7b.json")
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128]
GAMMAS = [0, 1, 2, 3, 5, 7]
SD_FALLBACK_BS = 16  # graph states up to this B if the SD engine cannot start with all of them


def cmd_make(args) -> None:
    import torch
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                      num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(args.model)
    print("wrote", os.listdir(args.model))


def plan(seqs, batches, gammas):
    """(seq, batch) points in priority order: S=2048 all B, then the other S at fewer B."""
    pts = [(2048, b) for b in batches if 2048 in seqs]
    for s in [x for x in seqs if x != 2048]:
        pts += [(s, b) for b in batches if b in (1, 8, 32, 128) or s == 512]
    return pts


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        # `run --child` gets one variant; `profile` only a kernel, which is also a variant's name
        variants = getattr(args, "variants", None) or [parse_variant(getattr(args, "draft_kernel", None) or "marlin")]
        self.sd_variant = variants[0]
        self.variant = self.sd_variant.name
        self.out = {"device": None, "backend": args.backend, "variant": self.variant, "records": [],
                    "meta": {"cmd": " ".join(sys.argv), "max_total_num_tokens": {}}}

    def left(self) -> float:
        return self.args.limit_s - (time.time() - self.t0)

    def progress(self, k: int, n: int) -> str:
        """'[k/N points, t/T s]': the point measured now of this part's N, seconds spent of its budget T."""
        return f"[{k}/{n} points, {time.time() - self.t0:.0f}/{self.args.limit_s:.0f} s]"

    def points(self) -> list[tuple[int, int]]:
        """(seq, batch) points in measuring order: --points (er_sglang.calibrate's grid), else plan()."""
        return getattr(self.args, "points", None) or plan(self.args.seqs, self.args.batches, self.args.gammas)

    def save(self) -> None:
        _save(self.out, self.args.json)

    def sglang_args(self) -> dict:
        return {"load_format": getattr(self.args, "load_format", "dummy"), "max_running_requests": max(self.args.batches),
                "attention_backend": self.args.backend,
                "cuda_graph_bs_decode": self.args.batches, "mem_fraction_static": 0.7,
                "disable_prefill_cuda_graph": True, "context_length": max(self.args.seqs) + 512,
                "chunked_prefill_size": 16384, "random_seed": 0, "log_level": "warning",
                **dict(getattr(self.args, "sglang", None) or [])}  # --sglang: every engine of the run alike

    def prompts(self, s: int, b: int) -> list[list[int]]:
        rng = random.Random(s * 1000 + b)
        return [[rng.randrange(1000, 150000) for _ in range(s)] for _ in range(b)]

    def fits(self, eng, s, b, new) -> bool:
        cap = eng.engine.get_server_info().get("max_total_num_tokens", 0)
        return b * (s + new + 16) <= 0.9 * cap

    def timed(self, eng, prompts, n: int) -> float:
        from er_sglang.engine import SamplingParams

        t = time.perf_counter()
        eng.generate(prompts, SamplingParams(max_new_tokens=n), ignore_eos=True)
        return time.perf_counter() - t

    def run_sd(self) -> None:
        from er_sglang.sglang.engine import SGLangEngine

        # graphs for every gamma at every B up to sd_bs_max (default: all B): the whole B x gamma plane
        self.sd_bs_max = getattr(self.args, "sd_bs_max", None) or max(self.args.batches)
        spec = {"mode": "argmax", "gamma": 3, "gamma_ladder": [g for g in self.args.gammas if g > 0],
                "policy": {"argmax_gammas": [g for g in self.args.gammas if g > 0]},
                "roofline": ROOFLINE, "timing": True, "bs_max": self.sd_bs_max, **self.sd_variant.spec()}
        if self.sd_variant.vocab:  # the engine counts its subset from the prompts; these ids are always in it
            spec["draft_vocab_always"] = draft_vocab_always(self.args.model)
        t = time.time()
        eng = SGLangEngine(self.args.model, spec, self.sglang_args())
        st = eng.rpc("stats")
        self.out["meta"]["sd"] = {self.variant: {
            "startup_s": round(time.time() - t, 1), "variant": self.variant, **self.sd_variant.spec(),
            "bs_max": self.sd_bs_max, "max_total_num_tokens": eng.engine.get_server_info().get("max_total_num_tokens"),
            "int4_bytes": st["int4_bytes"], "num_int4_linears": st["num_int4_linears"], "graphs": st["graphs"],
            "graph_init_s": st["graph_init_s"], "requant_s": [eng.rpc("requantize")["requant_s"] for _ in range(3)]}}
        self.save()
        pts = self.points()
        try:
            for k, (s, b) in enumerate(pts, 1):
                if self.left() < 20:
                    break
                if not self.fits(eng, s, b, 8 * 12 + 8):
                    continue
                prompts = self.prompts(s, b)
                eng.rpc("set_gamma", gamma=0)
                self.timed(eng, prompts, 1)  # prefill once; later calls hit the prefix cache
                for g in self.args.gammas:
                    if g == 0 or b <= self.sd_bs_max:  # above it the worker runs gamma = 0 whatever is pinned
                        self.point_sd(eng, prompts, s, b, g, (k, len(pts)))
                self.save()
        finally:
            eng.shutdown()

    def point_sd(self, eng, prompts, s, b, g, point: tuple[int, int]) -> None:
        n = max(32, 8 * (g + 1))
        eng.rpc("set_gamma", gamma=g)
        t1 = min(self.timed(eng, prompts, 1) for _ in range(2))  # the first call after a switch runs cold
        eng.rpc("stats", reset=True)
        tn = self.timed(eng, prompts, n + 1)
        st = eng.rpc("stats", reset=True)
        ms = {k["kind"]: k["ms"] for k in st["timing"] if k["gamma"] == g and k["batch"] == b}
        nsteps = {k["kind"]: k["n"] for k in st["timing"] if k["gamma"] == g and k["batch"] == b}
        graph = {k["kind"]: k.get("graph_frac") for k in st["timing"]
                 if k["gamma"] == g and k["batch"] == b and k.get("graph_frac") is not None}
        rec = {"mode": "sd", "variant": self.variant, "gamma": g, "batch": b, "seq": s, "backend": self.args.backend,
               "ms_per_step": ms.get("step"), "t_draft_ms": ms.get("draft", 0.0),
               "t_draft_step_ms": ms["draft"] / g if g and "draft" in ms else None,
               "t_verify_ms": ms.get("verify"), "t_decode_ms": ms.get("decode"), "num_steps": nsteps.get("step"),
               "gamma_hist": st["gamma_hist"], "ms_per_step_wall": 1e3 * (tn - t1) / max(st["num_steps"], 1),
               "accept_len": st["num_emitted"] / max(st["num_seq_steps"], 1), "graph_frac": graph,
               "device": self.out["device"]}
        self.out["records"].append(rec)
        print(self.progress(*point), "SD", json.dumps(rec), flush=True)

    def run_ar(self) -> None:
        from er_sglang.sglang.engine import SGLangEngine

        t = time.time()
        eng = SGLangEngine(self.args.model, {"mode": "no-sd", "gamma": 0, "gamma_ladder": [1]}, self.sglang_args())
        self.out["meta"]["ar"] = {"startup_s": round(time.time() - t, 1)}
        self.out["meta"]["max_total_num_tokens"]["no-sd"] = eng.engine.get_server_info().get("max_total_num_tokens")
        n, pts = 32, self.points()
        try:
            for k, (s, b) in enumerate(pts, 1):
                if self.left() < 20:
                    break
                if not self.fits(eng, s, b, n + 8):
                    continue
                prompts = self.prompts(s, b)
                self.timed(eng, prompts, 1)
                t1 = min(self.timed(eng, prompts, 1) for _ in range(2))
                tn = self.timed(eng, prompts, n + 1)
                rec = {"mode": "ar", "variant": "ar", "gamma": 0, "batch": b, "seq": s, "backend": self.args.backend,
                       "ms_per_step": 1e3 * (tn - t1) / n,
                       "ms_per_step_wall": 1e3 * (tn - t1) / n, "t_draft_ms": 0.0, "t_verify_ms": None,
                       "device": self.out["device"]}
                self.out["records"].append(rec)
                print(self.progress(k, len(pts)), "AR", json.dumps(rec), flush=True)
                self.save()
        finally:
            eng.shutdown()


def calibration_meta(model_dir: str, f_eff: bool = True) -> dict:
    """What er-calibrate --from-json needs besides the records: the model's shapes, the GEMM throughput F_eff
    of this GPU (er_sglang.calibrate.measure_f_eff, a few seconds; before any engine holds the memory) and the
    commit measured. With it, a `run` is a complete calibration record set for its model."""
    from er_sglang.calibrate import MODEL_CONFIG_KEYS, measure_f_eff, provenance

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    meta = {"model_config": {k: cfg[k] for k in MODEL_CONFIG_KEYS if k in cfg}, **provenance()}
    if f_eff:
        meta["f_eff"] = measure_f_eff(cfg)
    return meta


def run_part(args) -> None:
    """`run --child`: one part (sd or ar) in this process; the AR part also measures calibration_meta first."""
    import torch

    b = Bench(args)
    b.out["device"] = torch.cuda.get_device_name(0)
    b.out["meta"].update(calibration_meta(args.model, f_eff="ar" in args.parts and not args.no_f_eff))
    torch.cuda.empty_cache()
    b.save()
    if "ar" in args.parts:
        b.run_ar()
    else:
        b.run_sd()
    b.save()


def cmd_run(args) -> None:
    """The parts in child processes, AR first, then one SD child per variant. SGLang answers a scheduler failure
    by SIGKILLing the process that owns the engine (kill_process_tree), so only a separate process keeps the other
    parts' records, and lets an SD engine that could not start (e.g. out of memory capturing graphs at every B)
    retry with graph states up to B = SD_FALLBACK_BS. The children's records and meta are merged into --json."""
    if args.child:
        return run_part(args)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still reaps the child's group
    t0 = time.time()
    out = {"device": None, "backend": args.backend, "variants": [v.name for v in args.variants], "records": [],
           "meta": {"cmd": " ".join(sys.argv), "max_total_num_tokens": {}, "sglang": dict(args.sglang)}}
    failed = []
    if "ar" in args.parts:
        left = args.limit_s - (time.time() - t0)
        rc, doc = _child(args, "ar", min(args.ar_budget_s, left - 120) if "sd" in args.parts else left,
                         max(args.batches))
        _merge(out, doc)
        if rc:
            failed.append("ar")
            out["meta"]["ar_error"] = f"child exited {rc} (its output is above in the log)"
        _save(out, args.json)
    if "sd" in args.parts:
        failed += run_variants(args, out, t0)
    if failed:
        sys.exit(f"bench_step run: part(s) {', '.join(failed)} failed (meta.*_error in {args.json})")


def run_variants(args, out: dict, t0: float) -> list[str]:
    """One SD child per variant, each within an equal share of the time left then (one that ends early leaves
    its rest to the next); -> the failed ones as 'sd[<variant>]'. A variant whose engine could not start with
    graph states at every B but could at B <= SD_FALLBACK_BS lets the later ones start there: same graphs,
    same memory."""
    failed, bs_max = [], max(args.batches)
    for i, v in enumerate(args.variants):
        end = time.time() + (args.limit_s - (time.time() - t0)) / (len(args.variants) - i)
        rc, doc = _child(args, "sd", end - time.time(), bs_max, v)
        if rc and not doc.get("records") and bs_max > SD_FALLBACK_BS and end - time.time() > 150:
            out["meta"].setdefault("sd_start_error", {})[v.name] = {"bs_max": bs_max, "exit": rc}
            print(f"SD part {v.name} exited {rc} before any record (bs_max={bs_max}); retrying with "
                  f"bs_max={SD_FALLBACK_BS}", flush=True)
            rc, doc = _child(args, "sd", end - time.time(), SD_FALLBACK_BS, v)
            bs_max = SD_FALLBACK_BS if doc.get("records") else bs_max
        _merge(out, doc)
        if rc:
            failed.append(f"sd[{v.name}]")
            out["meta"].setdefault("sd_error", {})[v.name] = f"child exited {rc} (its output is above in the log)"
        _save(out, args.json)
    return failed


def _child(args, part: str, budget_s: float, bs_max: int, variant: Variant | None = None) -> tuple[int, dict]:
    """(exit status, its JSON or {}): `run --child` for one part (SD: one variant) in its own process group,
    killed whole (SGLang's scheduler processes included) when it ends, overruns its budget, or this process is
    terminated: nothing of it may keep holding the GPU for the device call's next step."""
    import signal
    import subprocess

    path = child_json(args, part, variant)
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, os.path.abspath(__file__), *child_argv(args, part, budget_s, bs_max, variant)]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget_s + 30)
    except subprocess.TimeoutExpired:
        rc = -9
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    if not os.path.exists(path):
        return rc, {}
    with open(path) as f:
        return rc, json.load(f)


def child_json(args, part: str, variant: Variant | None = None) -> str:
    tag = "".join(c if c.isalnum() or c in "._-" else "_" for c in variant.name) if variant else ""
    return f"{args.json}.{part}{'.' + tag if tag else ''}.json"


def child_argv(args, part: str, budget_s: float, bs_max: int, variant: Variant | None = None) -> list[str]:
    """main()'s argv for one part (SD: one variant) run by a child (`run --child`)."""
    return ["run", "--child", "--parts", part, "--model", args.model, "--json", child_json(args, part, variant),
            "--limit-s", f"{budget_s:.0f}", "--seqs", ",".join(map(str, args.seqs)),
            "--batches", ",".join(map(str, args.batches)), "--gammas", ",".join(map(str, args.gammas)),
            "--backend", args.backend, "--variants", (variant or args.variants[0]).name, "--sd-bs-max", str(bs_max),
            "--load-format", args.load_format, *(["--no-f-eff"] if args.no_f_eff else []),
            *[a for k, v in args.sglang for a in ("--sglang", f"{k}={json.dumps(v)}")],
            *(["--points", ",".join(f"{s}:{b}" for s, b in args.points)] if args.points else [])]


def _merge(out: dict, doc: dict) -> None:
    out["device"] = out["device"] or doc.get("device")
    out["records"] += doc.get("records", [])
    meta = dict(doc.get("meta", {}))
    meta.pop("cmd", None)
    out["meta"]["max_total_num_tokens"].update(meta.pop("max_total_num_tokens", {}))
    if "sd" in meta:  # keyed by variant: each SD child adds its own
        out["meta"].setdefault("sd", {}).update(meta.pop("sd"))
    out["meta"].update(meta)


def _save(out: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _grid_args(p, seqs, batches, gammas, parts) -> None:
    """The flags `run` and `profile` share: model, output, grid, parts, backend, budget."""
    p.add_argument("--model", default="/tmp/q7")
    p.add_argument("--json", required=True)
    p.add_argument("--seqs", type=_ints, default=seqs)
    p.add_argument("--batches", type=_ints, default=batches)
    p.add_argument("--gammas", type=_ints, default=gammas)
    p.add_argument("--parts", type=lambda x: x.split(","), default=parts)
    p.add_argument("--backend", default="flashinfer", choices=["flashinfer", "triton", "fa3"])
    p.add_argument("--limit-s", type=float, default=540.0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("make").add_argument("--model", default="/tmp/q7")
    r = sub.add_parser("run")
    _grid_args(r, [2048, 512, 8192], BATCHES, GAMMAS, ["sd", "ar"])
    r.add_argument("--ar-budget-s", type=float, default=150.0, help="AR runs first, within this; SD gets the rest")
    r.add_argument("--child", action="store_true", help="internal: run one part in this process")
    r.add_argument("--sd-bs-max", type=int, help="internal: graph states up to this B (default: max --batches)")
    r.add_argument("--points", type=lambda x: [tuple(int(v) for v in p.split(":")) for p in x.split(",")],
                   help="S:B,... points in measuring order (default: S=2048 at every B first, then the other S)")
    r.add_argument("--load-format", default="dummy", choices=["dummy", "auto"], help="dummy: random weights")
    r.add_argument("--variants", type=parse_variants, help="SD engines to measure, one child each, e.g. "
                   "'marlin,gemlite,marlin+vocab=32768+head=int4' (KERNEL[+vocab=K][+head=shared|int8|int4])")
    r.add_argument("--draft-kernel", choices=KERNELS, help="one variant: this spec.draft_kernel (default marlin)")
    r.add_argument("--sglang", type=parse_server_arg, action="append", default=[], help="ServerArgs KEY=VALUE for "
                   "every engine of the run, AR and SD alike (e.g. enable_torch_compile=true); repeatable")
    r.add_argument("--no-f-eff", action="store_true", help="skip the GEMM benchmark (meta.f_eff) that makes the "
                   "run's JSON an er-calibrate --from-json input")
    pr = sub.add_parser("profile")
    _grid_args(pr, [2048], [1, 16], [0, 3], ["ar", "sd"])
    pr.add_argument("--trace-dir", required=True)
    pr.add_argument("--steps", type=int, default=16)
    pr.add_argument("--draft-kernel", default="marlin", choices=KERNELS, help="spec.draft_kernel of the SD engine")
    q = sub.add_parser("plot")
    q.add_argument("--json", required=True)
    q.add_argument("--png", required=True)
    t = sub.add_parser("table")
    t.add_argument("--json", required=True, nargs="+", help="one or more runs' JSON")
    t.add_argument("--accept", type=lambda x: x.split(","), default=[],
                   help="scripts/accept_real.py JSON(s), comma-separated: acceptance and the per-step gain")
    args = p.parse_args(argv)
    if args.cmd == "run":
        if args.variants and args.draft_kernel:  # both given: the list wins
            print(f"bench_step run: --variants given, --draft-kernel {args.draft_kernel} ignored", flush=True)
        args.variants = args.variants or [parse_variant(args.draft_kernel or "marlin")]
        named = {"attention_backend": "--backend", "load_format": "--load-format"}  # recorded in every record
        for key, _ in args.sglang:
            if key in named:
                p.error(f"--sglang {key}: set it with {named[key]}")
    if args.cmd == "profile":
        from scripts.bench_step_profile import cmd_profile

        return cmd_profile(args)
    if args.cmd in ("plot", "table"):  # reading records only: scripts/bench_step_report.py
        from scripts.bench_step_report import cmd_plot, cmd_table

        try:
            return {"plot": cmd_plot, "table": cmd_table}[args.cmd](args)
        except (ValueError, OSError) as e:  # a bad or mismatched input file: one line, exit 2
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    {"make": cmd_make, "run": cmd_run}[args.cmd](args)


if __name__ == "__main__":
    main()
