"""ms per decode step, AR vs self-speculative at each gamma, Qwen2.5-7B shapes with random weights (GPU).

    python scripts/bench_step.py make --model /tmp/q7                 # config.json only (weights: dummy)
    python scripts/bench_step.py run --model /tmp/q7 --json OUT.json  # SD (all gammas) then AR engine
    python scripts/bench_step.py plot --json OUT.json --png OUT.png   # anywhere with matplotlib
    python scripts/bench_step.py table --json OUT.json                # markdown for docs/benchmarks.md
    python scripts/bench_step.py profile --model /tmp/q7 --json P.json --trace-dir DIR  # torch-profiler traces

SD: one SGLangEngine (shared-KV self-draft worker, rejection sampling, graph states for every gamma at every
B), gamma pinned per point through the plugin RPC; the worker's CUDA events time each decode step ("step"),
the gamma draft forwards ("draft"; t_draft_step_ms = ONE forward incl. its sampling = draft / gamma), the
target verify ("verify") and, at gamma = 0, the plain decode step ("decode"). Only steps that ran the full
batch B count. AR: plain SGLang (no speculation) in a second engine of the same run.
If the SD engine cannot start with graph states for every B, it retries once with states up to B = 16
(meta.sd_start_error); a part (sd, ar) that fails leaves the other's records, and the run exits non-zero.
meta also records the model's shapes and F_eff (GEMM benchmark), so `er-calibrate --from-json OUT.json` fits
this GPU's roofline from a run with no further measuring.
ms_per_step_wall = (T(N+1 tokens) - T(1 token)) / steps, wall clock with the prompt cached, for both; the
gamma = 0 vs AR comparison uses it. Points run in priority order (S=2048 first) until --limit-s; the JSON
is rewritten after every point. --draft-kernel (spec.draft_kernel: marlin, tinygemm, gemlite) picks the int4
kernel of the draft linears; every record names it in `variant` (AR records: "ar", no drafter), and `table`
takes several runs' JSON files, one row per variant (r against the AR of whichever file has it).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ROOFLINE = os.path.join(ROOT, "configs", "roofline", "a100_tp1_qwen2.5-7b.json")
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128]
GAMMAS = [0, 1, 2, 3, 5, 7]
SD_FALLBACK_BS = 16  # graph states up to this B if the SD engine cannot start with all of them
KERNELS = ("marlin", "tinygemm", "gemlite")  # spec.draft_kernel (er_sglang/sglang/int4_kernels.KERNELS)


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
        self.variant = getattr(args, "draft_kernel", "marlin")  # spec.draft_kernel of the SD engine
        self.out = {"device": None, "backend": args.backend, "variant": self.variant, "records": [],
                    "meta": {"cmd": " ".join(sys.argv), "max_total_num_tokens": {}}}

    def left(self) -> float:
        return self.args.limit_s - (time.time() - self.t0)

    def points(self) -> list[tuple[int, int]]:
        """(seq, batch) points in measuring order; er_sglang.calibrate overrides it with its own grid."""
        return plan(self.args.seqs, self.args.batches, self.args.gammas)

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.args.json)), exist_ok=True)
        with open(self.args.json, "w") as f:
            json.dump(self.out, f, indent=1)

    def sglang_args(self) -> dict:
        return {"load_format": getattr(self.args, "load_format", "dummy"), "max_running_requests": max(self.args.batches),
                "attention_backend": self.args.backend,
                "cuda_graph_bs_decode": self.args.batches, "mem_fraction_static": 0.7,
                "disable_prefill_cuda_graph": True, "context_length": max(self.args.seqs) + 512,
                "chunked_prefill_size": 16384, "random_seed": 0, "log_level": "warning"}

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

        # graphs for every gamma at every B (bs_max): the benchmark maps the whole B x gamma plane
        spec = {"mode": "argmax", "gamma": 3, "gamma_ladder": [g for g in self.args.gammas if g > 0],
                "policy": {"argmax_gammas": [g for g in self.args.gammas if g > 0]},
                "roofline": ROOFLINE, "timing": True, "bs_max": max(self.args.batches),
                "draft_kernel": self.variant}
        t = time.time()
        eng = self.start_sd(SGLangEngine, spec)
        info = eng.engine.get_server_info()
        st = eng.rpc("stats")
        self.out["meta"]["max_total_num_tokens"]["argmax"] = info.get("max_total_num_tokens")
        self.out["meta"]["sd"] = {"startup_s": round(time.time() - t, 1), "draft_kernel": self.variant,
                                  "bs_max": self.sd_bs_max,
                                  "int4_bytes": st["int4_bytes"],
                                  "num_int4_linears": st["num_int4_linears"], "graphs": st["graphs"],
                                  "graph_init_s": st["graph_init_s"],
                                  "requant_s": [eng.rpc("requantize")["requant_s"] for _ in range(3)]}
        self.save()
        try:
            reserve = self.args.ar_reserve_s if "ar" in getattr(self.args, "parts", ["ar"]) else 0.0
            for s, b in self.points():
                if self.left() < 20 + reserve:
                    break
                if not self.fits(eng, s, b, 8 * 12 + 8):
                    continue
                prompts = self.prompts(s, b)
                eng.rpc("set_gamma", gamma=0)
                self.timed(eng, prompts, 1)  # prefill once; later calls hit the prefix cache
                for g in self.args.gammas:
                    if g == 0 or b <= self.sd_bs_max:  # above it the worker runs gamma = 0 whatever is pinned
                        self.point_sd(eng, prompts, s, b, g)
                self.save()
        finally:
            eng.shutdown()

    def start_sd(self, engine_cls, spec: dict):
        """The SD engine with graph states for every gamma at every B; if it cannot start (e.g. out of memory
        capturing them), once more with states only up to B = SD_FALLBACK_BS, where speculation can pay: the
        run still yields the B <= 16 plane and the AR baseline. The failure is recorded in meta.sd_start_error."""
        try:
            eng = engine_cls(self.args.model, spec, self.sglang_args())
            self.sd_bs_max = spec["bs_max"]
            return eng
        except Exception as exc:  # any start failure: one retry, then it propagates
            if spec["bs_max"] <= SD_FALLBACK_BS:
                raise
            self.out["meta"]["sd_start_error"] = {"bs_max": spec["bs_max"], "error": _one_line(exc)}
            print(f"SD engine failed to start with bs_max={spec['bs_max']} ({_one_line(exc)}); "
                  f"retrying with bs_max={SD_FALLBACK_BS}", flush=True)
            self.save()
            eng = engine_cls(self.args.model, dict(spec, bs_max=SD_FALLBACK_BS), self.sglang_args())
            self.sd_bs_max = SD_FALLBACK_BS
            return eng

    def point_sd(self, eng, prompts, s, b, g) -> None:
        n = max(32, 8 * (g + 1))
        eng.rpc("set_gamma", gamma=g)
        t1 = min(self.timed(eng, prompts, 1) for _ in range(2))  # the first call after a switch runs cold
        eng.rpc("stats", reset=True)
        tn = self.timed(eng, prompts, n + 1)
        st = eng.rpc("stats", reset=True)
        ms = {k["kind"]: k["ms"] for k in st["timing"] if k["gamma"] == g and k["batch"] == b}
        nsteps = {k["kind"]: k["n"] for k in st["timing"] if k["gamma"] == g and k["batch"] == b}
        rec = {"mode": "sd", "variant": self.variant, "gamma": g, "batch": b, "seq": s, "backend": self.args.backend,
               "ms_per_step": ms.get("step"), "t_draft_ms": ms.get("draft", 0.0),
               "t_draft_step_ms": ms["draft"] / g if g and "draft" in ms else None,
               "t_verify_ms": ms.get("verify"), "t_decode_ms": ms.get("decode"), "num_steps": nsteps.get("step"),
               "gamma_hist": st["gamma_hist"], "ms_per_step_wall": 1e3 * (tn - t1) / max(st["num_steps"], 1),
               "accept_len": st["num_emitted"] / max(st["num_seq_steps"], 1), "device": self.out["device"]}
        self.out["records"].append(rec)
        print("SD", json.dumps(rec), flush=True)

    def run_ar(self) -> None:
        from er_sglang.sglang.engine import SGLangEngine

        t = time.time()
        eng = SGLangEngine(self.args.model, {"mode": "no-sd", "gamma": 0, "gamma_ladder": [1]}, self.sglang_args())
        self.out["meta"]["ar"] = {"startup_s": round(time.time() - t, 1)}
        self.out["meta"]["max_total_num_tokens"]["no-sd"] = eng.engine.get_server_info().get("max_total_num_tokens")
        n = 32
        try:
            for s, b in self.points():
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
                print("AR", json.dumps(rec), flush=True)
                self.save()
        finally:
            eng.shutdown()


class Profiler(Bench):
    """SGLang's torch profiler (CPU + GPU, Python stacks) over `--steps` decode steps per point, for SD at each
    (B, gamma) and plain SGLang at each B; each trace summarized by scripts/trace_summary.py."""

    def profile(self, eng, name: str, prompts, new_tokens: int) -> None:
        import glob
        import shutil

        from er_sglang.engine import SamplingParams
        from scripts.trace_summary import load, summarize

        d = os.path.join(self.args.trace_dir, name)
        shutil.rmtree(d, ignore_errors=True)
        eng.engine.start_profile(output_dir=d, num_steps=self.args.steps, activities=["CPU", "GPU"],
                                 profile_id=name)
        eng.generate(prompts, SamplingParams(max_new_tokens=new_tokens), ignore_eos=True)
        path, size, t = None, -1, time.time()
        while time.time() - t < 180:  # the trace is exported after the last profiled step
            found = glob.glob(os.path.join(d, "*.trace.json.gz"))
            if found and os.path.getsize(found[0]) == size:
                path = found[0]
                break
            size = os.path.getsize(found[0]) if found else -1
            time.sleep(2)
        rec = {"name": name, "variant": "ar" if name.startswith("ar_") else self.variant, "trace": path,
               "summary": summarize(load(path), self.args.steps) if path else None}
        self.out["records"].append(rec)
        self.save()
        print("PROFILE", name, json.dumps({k: v for k, v in (rec["summary"] or {}).items()
                                            if not isinstance(v, list)}), flush=True)

    def run_sd(self) -> None:
        from er_sglang.sglang.engine import SGLangEngine

        spec = {"mode": "argmax", "gamma": 3, "gamma_ladder": [g for g in self.args.gammas if g > 0],
                "policy": {"argmax_gammas": [g for g in self.args.gammas if g > 0]},
                "roofline": ROOFLINE, "bs_max": max(self.args.batches), "draft_kernel": self.variant}
        eng = SGLangEngine(self.args.model, spec, self.sglang_args())
        try:
            for b in self.args.batches:
                prompts = self.prompts(self.args.seqs[0], b)
                for g in self.args.gammas:
                    eng.rpc("set_gamma", gamma=g)
                    self.timed(eng, prompts, 8)
                    self.profile(eng, f"sd_b{b}_g{g}", prompts, (self.args.steps + 8) * (g + 1))
        finally:
            eng.shutdown()

    def run_ar(self) -> None:
        from er_sglang.sglang.engine import SGLangEngine

        eng = SGLangEngine(self.args.model, {"mode": "no-sd", "gamma": 0, "gamma_ladder": [1]}, self.sglang_args())
        try:
            for b in self.args.batches:
                prompts = self.prompts(self.args.seqs[0], b)
                self.timed(eng, prompts, 8)
                self.profile(eng, f"ar_b{b}", prompts, self.args.steps + 8)
        finally:
            eng.shutdown()


def cmd_profile(args) -> None:
    import torch

    b = Profiler(args)
    b.out["device"] = torch.cuda.get_device_name(0)
    if "ar" in args.parts:
        b.run_ar()
    if "sd" in args.parts:
        b.run_sd()
    b.save()


def calibration_meta(model_dir: str, f_eff: bool = True, device: str = "cuda") -> dict:
    """What er-calibrate --from-json needs besides the records: the model's shapes, the GEMM throughput F_eff
    of this GPU (er_sglang.calibrate.measure_f_eff, a few seconds; before any engine holds the memory) and the
    commit measured. With it, a `run` is a complete calibration record set for its model."""
    from er_sglang.calibrate import MODEL_CONFIG_KEYS, measure_f_eff, provenance

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    meta = {"model_config": {k: cfg[k] for k in MODEL_CONFIG_KEYS if k in cfg}, **provenance()}
    if f_eff:
        meta["f_eff"] = measure_f_eff(cfg, device=device)
    return meta


def cmd_run(args) -> None:
    import torch

    b = Bench(args)
    b.out["device"] = torch.cuda.get_device_name(0)
    b.out["meta"].update(calibration_meta(args.model, f_eff=not args.no_f_eff))
    torch.cuda.empty_cache()
    failed = []
    for part, fn in (("sd", b.run_sd), ("ar", b.run_ar)):
        if part not in args.parts:
            continue
        try:  # a failing part must not cost the other one: a device call is too scarce
            fn()
        except Exception as exc:  # noqa: BLE001 - recorded; the exit status says so
            failed.append(part)
            b.out["meta"][f"{part}_error"] = _one_line(exc)
            print(f"{part.upper()} part failed: {_one_line(exc)}", file=sys.stderr, flush=True)
            traceback.print_exc()
        b.save()
    if failed:
        sys.exit(f"bench_step run: part(s) {', '.join(failed)} failed (meta.*_error in {args.json})")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--model", default="/tmp/q7")
    r = sub.add_parser("run")
    r.add_argument("--model", default="/tmp/q7")
    r.add_argument("--json", required=True)
    r.add_argument("--seqs", type=lambda x: [int(v) for v in x.split(",")], default=[2048, 512, 8192])
    r.add_argument("--batches", type=lambda x: [int(v) for v in x.split(",")], default=BATCHES)
    r.add_argument("--gammas", type=lambda x: [int(v) for v in x.split(",")], default=GAMMAS)
    r.add_argument("--parts", type=lambda x: x.split(","), default=["sd", "ar"])
    r.add_argument("--backend", default="flashinfer", choices=["flashinfer", "triton", "fa3"])
    r.add_argument("--limit-s", type=float, default=540.0)
    r.add_argument("--ar-reserve-s", type=float, default=100.0)
    r.add_argument("--draft-kernel", default="marlin", choices=KERNELS, help="spec.draft_kernel of the SD engine")
    r.add_argument("--no-f-eff", action="store_true", help="skip the GEMM benchmark (meta.f_eff) that makes the "
                   "run's JSON an er-calibrate --from-json input")
    pr = sub.add_parser("profile")
    pr.add_argument("--model", default="/tmp/q7")
    pr.add_argument("--json", required=True)
    pr.add_argument("--trace-dir", required=True)
    pr.add_argument("--seqs", type=lambda x: [int(v) for v in x.split(",")], default=[2048])
    pr.add_argument("--batches", type=lambda x: [int(v) for v in x.split(",")], default=[1, 16])
    pr.add_argument("--gammas", type=lambda x: [int(v) for v in x.split(",")], default=[0, 3])
    pr.add_argument("--parts", type=lambda x: x.split(","), default=["ar", "sd"])
    pr.add_argument("--backend", default="flashinfer", choices=["flashinfer", "triton", "fa3"])
    pr.add_argument("--steps", type=int, default=16)
    pr.add_argument("--draft-kernel", default="marlin", choices=KERNELS, help="spec.draft_kernel of the SD engine")
    pr.add_argument("--limit-s", type=float, default=540.0)
    q = sub.add_parser("plot")
    q.add_argument("--json", required=True)
    q.add_argument("--png", required=True)
    sub.add_parser("table").add_argument("--json", required=True, nargs="+", help="one or more runs' JSON")
    args = p.parse_args(argv)
    if args.cmd in ("plot", "table"):  # reading records only: scripts/bench_step_report.py
        from scripts.bench_step_report import cmd_plot, cmd_table

        return {"plot": cmd_plot, "table": cmd_table}[args.cmd](args)
    {"make": cmd_make, "run": cmd_run, "profile": cmd_profile}[args.cmd](args)


if __name__ == "__main__":
    main()
