"""er-calibrate: measure, fit and validate the roofline (er_sglang/roofline.py) of one GPU and model, TP=1.

    er-calibrate --model HF_DIR [--random-weights] [--budget-s 600]       # measure on this GPU, fit, validate
    er-calibrate --from-json RECORDS.json [--model HF_DIR] [--flops F]    # fit + validate existing measurements
    (= python -m er_sglang.calibrate ...; writes configs/roofline/<gpu>_tp1_<model>.json and a PNG next to it)

Measuring (GPU + SGLang): F_eff from a bf16 GEMM benchmark of the model's linear shapes (FLOPs / time over
F_TOKENS tokens), then scripts/bench_step.py's Bench over the planned (S, B) points, plain SGLang first (it
feeds stage 1 and every measured speedup), then the SD engine with gamma pinned per point (rpc set_gamma);
records are rewritten after every point and the sweep stops at --budget-s. --random-weights: load_format dummy.

Split (deterministic, a function of the measured grid): with Ss and Gs the sorted contexts and SD gammas
present and Bs(S) the sorted batch sizes measured at S, a point is HELD OUT iff its B is neither the first
nor the last of Bs(S) and index(B in Bs(S)) + index(S) + index(gamma) is odd (AR points: index(gamma) = 0):
a checkerboard over each S's interior, so every held-out point lies between fitted ones.
Fit: stage 1 (BW, kappa, c_T) on fitted AR points (kappa fixed at the architecture's K+V bytes when they
share one S); F measured or, without a GEMM measurement, fitted on the verify timings; stage 2 (eta_d, c_D,
o_D, c_V, o_V) on fitted SD points.

Validation, held-out points only: T_T_mape (AR step), T_step_mape (the SD step as measured, whole step vs
o_D + g*T_D + T_V), speedup_mape (L*T_T/T_SD vs L*T_T,meas/T_step,meas; L cancels, so one number for all
alpha), sign_accuracy (speedup > 1 predicted == measured, over held-out points x ALPHAS).
SD steps at gamma = 0 (the worker's plain step, modelled as T_T) are never fitted: gamma0_step_mape.
Bad input: one `error:` line naming the flag or file, exit 2, nothing written.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from er_sglang.roofline import (
    SHAPE_KEYS,
    Roofline,
    RooflineParams,
    expected_accept_len,
    fit_flops,
    fit_stage1,
    fit_stage2,
    model_constants,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SEQS, MAIN_SEQ = (512, 2048, 8192), 2048
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_GAMMAS = (0, 1, 2, 3, 4, 5, 7)  # gamma = 0 times the worker's plain step (diagnostic only)
MAX_POINT_TOKENS = 2 ** 18  # B*S above this at a non-main S: its prefill costs more than the point tells
ALPHAS = (0.6, 0.7, 0.8, 0.9, 0.95)
F_TOKENS = (256, 512, 1024, 2048)
TARGETS = {"T_T_mape": 5.0, "T_step_mape": 8.0, "sign_accuracy": 0.95}
MODEL_CONFIG_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "attention_bias")


class CalibrationError(ValueError):
    """Bad input: the message is one line naming the flag or file."""


def plan_grid(seqs, batches, main_seq: int = MAIN_SEQ, max_tokens: int = MAX_POINT_TOKENS) -> list[tuple]:
    """(S, B) points in measuring order: the main S at every B, every other B first (1, 4, 16, ...), then
    the other S at every other B with B*S <= max_tokens; a budget cut then drops the least informative."""
    bs = sorted(set(batches))
    coarse = bs[::2] + ([bs[-1]] if len(bs) % 2 == 0 else [])
    main = main_seq if main_seq in seqs else sorted(seqs)[len(seqs) // 2]
    pts = [(main, b) for b in coarse + [b for b in bs if b not in coarse]]
    return pts + [(s, b) for s in sorted(set(seqs)) if s != main for b in bs[::2] if b * s <= max_tokens]


def split_heldout(ar, sd) -> tuple[list[bool], list[bool]]:
    """Held-out flags of the AR and SD (gamma > 0) records: the checkerboard of the module docstring."""
    ss = sorted({r["seq"] for r in ar + sd})
    gs = sorted({r["gamma"] for r in sd})
    bs = {s: sorted({r["batch"] for r in ar + sd if r["seq"] == s}) for s in ss}

    def held(r, ig):
        row, b = bs[r["seq"]], r["batch"]
        return bool(row[0] < b < row[-1] and (row.index(b) + ss.index(r["seq"]) + ig) % 2 == 1)

    return [held(r, 0) for r in ar], [held(r, gs.index(r["gamma"])) for r in sd]


def draft_ms(r) -> float:
    """All draft work of a measured SD step: gamma * one forward (t_draft_step_ms; records without it hold
    one forward in t_draft_ms, as in roofline._draft_step_records)."""
    one = r.get("t_draft_step_ms")
    return int(r["gamma"]) * float(one if one is not None else r["t_draft_ms"])


def step_ms(r) -> float:
    """The measured SD step: `ms_per_step` (the whole step), else draft + verify."""
    if r.get("ms_per_step") is not None:
        return float(r["ms_per_step"])
    return draft_ms(r) + float(r["t_verify_ms"])


def fit_roofline(ar_fit, sd_fit, shapes: dict, flops: float | None = None) -> tuple[RooflineParams, dict]:
    """Stage 1 (BW, kappa, c_T), F (given, else fitted on verify), stage 2; returns params and how each was
    obtained. One S among the AR points: kappa = shapes['kappa_theory'] (kappa*S and c_T are one slope)."""
    one_seq = len({r["seq"] for r in ar_fit}) < 2
    kappa = shapes["kappa_theory"] if one_seq else None
    F = flops or 1e17  # no compute bound at all while F is unknown
    BW, kap, c_T = fit_stage1(ar_fit, F, shapes["W_t"], shapes["C_dense"], shapes["C_attn"], kappa=kappa)
    p = RooflineParams(BW=BW, F=F, kappa=kap, eta_d=1.0, c_T=c_T, c_D=0.0, c_V=0.0,
                       **{k: shapes[k] for k in SHAPE_KEYS})
    if flops is None:
        p.F = fit_flops(sd_fit, p)
        p.BW, p.kappa, p.c_T = fit_stage1(ar_fit, p.F, p.W_t, p.C_dense, p.C_attn, kappa=kappa)
    for key, value in fit_stage2(sd_fit, p).items():
        setattr(p, key, value)
    notes = {"kappa_source": "fixed at theory (K+V bytes/token): every AR point has one S" if one_seq
             else "fitted (stage 1)"}
    return p, notes


def _mape(pred, meas) -> float | None:
    pred, meas = np.asarray(pred, dtype=float), np.asarray(meas, dtype=float)
    return float(100.0 * np.mean(np.abs(pred - meas) / meas)) if meas.size else None


def point_rows(params: RooflineParams, ar, sd) -> tuple[list[dict], list[dict]]:
    """Predicted vs measured [ms] per point. AR rows {B, S, meas, pred}; SD rows {B, S, g, step, step_pred,
    draft, draft_pred, verify, verify_pred, ratio, ratio_pred} with ratio = T_T / T_step (measured: the mean
    AR step at (B, S) from `ar`, None without one), so speedup = L * ratio."""
    m = Roofline(params)
    ar_ms = {}
    for r in ar:
        ar_ms.setdefault((r["batch"], r["seq"]), []).append(float(r["ms_per_step"]))
    ar_rows = [{"B": r["batch"], "S": r["seq"], "meas": float(r["ms_per_step"]),
                "pred": 1e3 * m.t_target(r["batch"], r["seq"])} for r in ar]
    sd_rows = []
    for r in sd:
        b, s, g = r["batch"], r["seq"], int(r["gamma"])
        step_pred = 1e3 * m.t_sd_step(b, s, g)
        meas_t = float(np.mean(ar_ms[(b, s)])) if (b, s) in ar_ms else None
        sd_rows.append({
            "B": b, "S": s, "g": g, "step": step_ms(r), "step_pred": step_pred,
            "draft": draft_ms(r),
            "draft_pred": params.o_D * 1e-3 + g * 1e3 * m.t_draft(b, s),
            "verify": float(r["t_verify_ms"]), "verify_pred": 1e3 * m.t_verify(b, s, g),
            "ratio": None if meas_t is None else meas_t / step_ms(r), "ratio_pred": 1e3 * m.t_target(b, s) / step_pred})
    return ar_rows, sd_rows


def validation_metrics(params, ar_held, sd_held, ar_all, alphas=ALPHAS) -> dict:
    """The held-out metrics of the module docstring; ar_all (every AR point) supplies measured T_T."""
    ar_rows, _ = point_rows(params, ar_held, [])
    _, sd_rows = point_rows(params, ar_all, sd_held)
    paired = [r for r in sd_rows if r["ratio"] is not None]
    pays = [(expected_accept_len(a, r["g"]) * r["ratio_pred"] > 1.0, expected_accept_len(a, r["g"]) * r["ratio"] > 1.0)
            for r in paired for a in alphas]

    def mape(rows, key):
        return _mape([r[key + "_pred"] for r in rows], [r[key] for r in rows])

    return {
        "T_T_mape": _mape([r["pred"] for r in ar_rows], [r["meas"] for r in ar_rows]),
        "T_step_mape": mape(sd_rows, "step"),
        "speedup_mape": mape(paired, "ratio"),
        "sign_accuracy": float(np.mean([p == q for p, q in pays])) if pays else None,
        "T_draft_mape": mape(sd_rows, "draft"),
        "T_verify_mape": mape(sd_rows, "verify"),
        "n_sign_points": len(pays),
        "n_sign_measured_pays": int(sum(q for _, q in pays)),
    }


def read_records(path, flag: str = "--from-json") -> dict:
    """read_records_doc of a bench_step JSON file; an unreadable file -> CalibrationError naming it."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{flag} {path}: cannot read ({type(e).__name__}: {e})") from None
    return read_records_doc(doc, f"{flag} {path}")


def read_records_doc(doc, where: str) -> dict:
    """A bench_step document ({"device", "records": [...], "meta"}, or a bare list) -> {ar, sd, sd0, doc};
    sd0 are the SD steps at gamma = 0. Missing AR or SD points -> CalibrationError naming `where`."""
    doc = {"records": doc} if isinstance(doc, list) else doc
    recs = doc.get("records") if isinstance(doc, dict) else None
    if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
        raise CalibrationError(f"{where}: expected {{\"records\": [...]}} of bench_step records")
    try:
        ar = [r for r in recs if r.get("mode") == "ar" and r.get("ms_per_step") is not None]
        sd = [r for r in recs if r.get("mode") == "sd" and r.get("gamma") and r.get("t_verify_ms") is not None]
        sd0 = [r for r in recs if r.get("mode") == "sd" and r.get("gamma") == 0 and r.get("ms_per_step")]
        for r in ar + sd:
            float(r["batch"]), float(r["seq"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CalibrationError(f"{where}: a record lacks a numeric field ({e!r})") from None
    if not ar:
        raise CalibrationError(f"{where}: no AR records (mode 'ar'); the fit needs plain-decoding steps")
    if not sd:
        raise CalibrationError(f"{where}: no SD records at gamma > 0 with t_verify_ms")
    return {"ar": ar, "sd": sd, "sd0": sd0, "doc": doc}


def split_checked(ar, sd, where: str):
    """split_heldout + the minimum a fit and a validation need; CalibrationError names `where`."""
    ar_held, sd_held = split_heldout(ar, sd)
    bs = sorted({r["batch"] for r in ar + sd})
    if not any(ar_held) or not any(sd_held):
        raise CalibrationError(f"{where}: grid too small to hold out points (batch sizes {bs}; need >= 3 at one "
                               "S, with AR and SD points at the interior ones)")
    ar_fit = [r for r, h in zip(ar, ar_held) if not h]
    sd_fit = [r for r, h in zip(sd, sd_held) if not h]
    if len({r["batch"] for r in ar_fit}) < 2 or len({r["batch"] for r in sd_fit}) < 2:
        raise CalibrationError(f"{where}: the fitted points need AR and SD steps at >= 2 batch sizes each")
    return ar_fit, sd_fit, [r for r, h in zip(ar, ar_held) if h], [r for r, h in zip(sd, sd_held) if h]
def calibrate(data: dict, shapes: dict, where: str, flops: float | None = None):
    """Split, fit and validate read_records() output -> (params, validation block, fit notes). Pure."""
    ar_fit, sd_fit, ar_held, sd_held = split_checked(data["ar"], data["sd"], where)
    measured_f = ((data["doc"].get("meta") or {}).get("f_eff") or {}).get("F")
    params, notes = fit_roofline(ar_fit, sd_fit, shapes, flops or measured_f)
    notes["F_source"] = ("--flops" if flops else "GEMM benchmark (records meta.f_eff)" if measured_f
                         else "fitted on the verify timings of the fitted points (the records have no GEMM measurement)")
    val = validation_metrics(params, ar_held, sd_held, data["ar"])
    fit_ar, fit_sd = point_rows(params, ar_fit, [])[0], point_rows(params, [], sd_fit)[1]
    m = Roofline(params)
    val.update({
        "gamma0_step_mape": _mape([1e3 * m.t_target(r["batch"], r["seq"]) for r in data["sd0"]],
                                  [r["ms_per_step"] for r in data["sd0"]]),
        "fit_T_T_mape": _mape([r["pred"] for r in fit_ar], [r["meas"] for r in fit_ar]),
        "fit_T_step_mape": _mape([r["step_pred"] for r in fit_sd], [r["step"] for r in fit_sd]),
        "n_fit": len(ar_fit) + len(sd_fit), "n_heldout": len(ar_held) + len(sd_held),
        "n_fit_ar": len(ar_fit), "n_fit_sd": len(sd_fit), "n_heldout_ar": len(ar_held), "n_heldout_sd": len(sd_held),
        "grid": {"seqs": sorted({r["seq"] for r in data["ar"] + data["sd"]}),
                 "batches": sorted({r["batch"] for r in data["ar"] + data["sd"]}),
                 "gammas": sorted({r["gamma"] for r in data["sd"] + data["sd0"]}),
                 "heldout_ar": [[r["batch"], r["seq"]] for r in ar_held],
                 "heldout_sd": [[r["batch"], r["seq"], r["gamma"]] for r in sd_held]},
        "split": "held out iff B is interior and index(B) + index(S) + index(gamma) is odd (AR: index 0)",
        "alphas": list(ALPHAS), "targets": TARGETS,
    })
    val["met"] = {k: val[k] is not None and (val[k] >= t if k == "sign_accuracy" else val[k] <= t)
                  for k, t in TARGETS.items()}
    return params, val, notes


def write_png(params, data: dict, path, title: str) -> None:
    """Predicted vs measured: AR step T_T, SD step, speedup at alpha = 0.9; filled = held out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    ar_held, sd_held = split_heldout(data["ar"], data["sd"])
    ar_rows, sd_rows = point_rows(params, data["ar"], data["sd"])
    L = [expected_accept_len(0.9, r["g"]) for r in sd_rows]
    panels = [("AR step T_T [ms]", [(r["meas"], r["pred"]) for r in ar_rows], ar_held),
              ("SD step [ms]", [(r["step"], r["step_pred"]) for r in sd_rows], sd_held),
              ("speedup at alpha=0.9", [(l * r["ratio"], l * r["ratio_pred"]) if r["ratio"] else (np.nan, np.nan)
                                        for l, r in zip(L, sd_rows)], sd_held)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    for ax, (name, pts, held) in zip(axes, panels):
        pts, held = np.array(pts, dtype=float), np.array(held, dtype=bool)
        for mask, label, face in ((~held, "fitted", "none"), (held, "held out", "C1")):
            ax.scatter(pts[mask, 0], pts[mask, 1], label=label, facecolors=face, edgecolors="C1" if face != "none"
                       else "C0")
        lo, hi = np.nanmin(pts) * 0.9, np.nanmax(pts) * 1.1
        ax.plot([lo, hi], [lo, hi], color="gray", linewidth=1)
        ax.set(xscale="log", yscale="log", xlabel=f"measured {name}", ylabel=f"predicted {name}")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(ScalarFormatter())
        ax.legend(fontsize=8)
    axes[2].axhline(1.0, color="gray", linestyle="--", linewidth=1)
    axes[2].axvline(1.0, color="gray", linestyle="--", linewidth=1)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gpu_slug(device: str) -> str:
    """'NVIDIA H200' -> 'h200'; 'NVIDIA A100-SXM4-80GB' -> 'a100'; 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    name = re.sub(r"^(nvidia|amd)\s+", "", str(device or "").strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9.]", "", re.split(r"[\s_-]+", name)[0].lower()) if name else "gpu"


def model_slug(name: str) -> str:
    """'/models/Qwen2.5-7B/' -> 'qwen2.5-7b'."""
    return re.sub(r"[^a-z0-9._-]", "", Path(str(name).rstrip("/")).name.lower())


def load_model_config(model: str | None, doc: dict) -> dict:
    """HF config.json of --model (a directory or the file), else the records' meta.model_config."""
    if model is None:
        cfg = (doc.get("meta") or {}).get("model_config")
        if not cfg:
            raise CalibrationError("--model: the records carry no meta.model_config; pass --model HF_DIR")
        return cfg
    path = Path(model) / "config.json" if Path(model).is_dir() else Path(model)
    try:
        cfg = json.loads(path.read_text())
        model_constants(cfg)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CalibrationError(f"--model {model}: need an HF directory with a dense-decoder config.json ({e!r})") from None
    return cfg


def _git(*args) -> str | None:
    try:
        proc = subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def provenance(records_path=None) -> dict:
    """Commits: for existing records, the commit that last wrote them and the last commit of the worker
    (er_sglang/sglang) at or before it; when measuring now, HEAD (+ '-dirty' if er_sglang/ has changes)."""
    if records_path is None:
        head = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--", "er_sglang")
        return {"worker_commit": head and head + ("-dirty" if dirty else "")}
    commit = _git("log", "-1", "--format=%H", "--", str(Path(records_path).resolve()))
    return {"records_commit": commit,
            "records_date": commit and _git("log", "-1", "--format=%ad", "--date=short", commit),
            "worker_commit": commit and _git("log", "-1", "--format=%H", commit, "--", "er_sglang/sglang")}


def measure_f_eff(hf_config: dict, tokens=F_TOKENS, device: str = "cuda", iters: int = 10) -> dict:
    """F_eff [FLOP/s] = sum(2*M*K*N) / sum(time) over one decoder's linears (x layers) + lm_head, bf16 (fp32
    on CPU), M tokens per GEMM; per M and over all M ('F')."""
    import torch

    H, inter, layers = hf_config["hidden_size"], hf_config["intermediate_size"], hf_config["num_hidden_layers"]
    nh = hf_config["num_attention_heads"]
    nkv, hd = hf_config.get("num_key_value_heads") or nh, hf_config.get("head_dim") or H // nh
    gemms = [(H, (nh + 2 * nkv) * hd, layers), (nh * hd, H, layers), (H, 2 * inter, layers), (inter, H, layers),
             (H, hf_config["vocab_size"], 1)]  # (K, N, count): qkv, o, gate_up, down, lm_head
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    weights = [torch.randn(k, n, device=device, dtype=dtype) for k, n, _ in gemms]
    by_tokens, total_flops, total_s = {}, 0.0, 0.0
    for m in tokens:
        t = sum(count * _seconds_per_call(torch.randn(m, k, device=device, dtype=dtype).__matmul__, w, device, iters)
                for (k, _, count), w in zip(gemms, weights))
        flops = 2.0 * m * sum(k * n * count for k, n, count in gemms)
        by_tokens[str(m)], total_flops, total_s = flops / t, total_flops + flops, total_s + t
    return {"F": total_flops / total_s, "by_tokens": by_tokens, "dtype": str(dtype).replace("torch.", "")}


def _seconds_per_call(fn, arg, device: str, iters: int) -> float:
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn(arg)
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn(arg)
    sync()
    return (time.perf_counter() - t) / iters


class Progress:
    """Points done of `total`: a tqdm bar when tqdm is installed, else one line per change on stderr."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.bar = total, desc, 0, None
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="point")
        except ImportError:
            pass

    def set(self, n: int, what: str = "") -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(n - self.n)
        elif n != self.n:
            print(f"{self.desc}: {n}/{self.total} {what}", file=sys.stderr, flush=True)
        self.n = n


def measure(args, hf_config: dict, records_out: Path, name: str) -> None:
    """F_eff, then bench_step's Bench: AR at every planned point (at most 35% of the budget), then SD at
    every gamma per point until the budget; records -> records_out (rewritten after every point)."""
    import importlib.metadata

    import torch

    sys.path.insert(0, str(ROOT))  # scripts/ is not installed; bench_step lives there
    from scripts.bench_step import Bench

    t0 = time.time()
    f_eff = measure_f_eff(hf_config)
    torch.cuda.empty_cache()
    points = plan_grid(args.seqs, args.batches)
    progress = Progress(2 * len(points), "er-calibrate (AR then SD points)")

    class CalibrationBench(Bench):
        def points(self):
            return points

        def save(self):
            super().save()
            done = {(r["mode"], r["seq"], r["batch"]) for r in self.out["records"]}
            progress.set(len(done), f"{time.time() - t0:.0f}/{args.budget_s:.0f} s")

    ns = argparse.Namespace(model=args.model, json=str(records_out), seqs=list(args.seqs), batches=list(args.batches),
                            gammas=list(args.gammas), backend=args.backend, ar_reserve_s=0.0, limit_s=0.0,
                            load_format="dummy" if args.random_weights else "auto")
    bench = CalibrationBench(ns)
    bench.out["device"] = torch.cuda.get_device_name(0)
    bench.out["meta"].update({"f_eff": f_eff, "model_config": {k: hf_config[k] for k in MODEL_CONFIG_KEYS
                                                               if k in hf_config},
                              "model_name": name, "sglang": importlib.metadata.version("sglang"),
                              "plan": points, **provenance()})
    before_bench_s = bench.t0 - t0  # Bench.left() counts from its own start
    ns.limit_s = 0.35 * args.budget_s - before_bench_s
    bench.run_ar()
    ns.limit_s = args.budget_s - 15.0 - before_bench_s  # 15 s left for the fit and the files
    bench.run_sd()
    bench.save()
    if progress.bar is not None:
        progress.bar.close()


def _outputs(args, gpu: str, name: str) -> tuple[Path, Path]:
    out = Path(args.out or f"configs/roofline/{gpu}_tp1_{name}.json")
    png = Path(args.png) if args.png else out.with_suffix(".png")
    for flag, path in (("--out", out), ("--png", png)):
        if path.exists() and not args.force:
            raise CalibrationError(f"{flag} {path} exists (pass --force to replace it)")
    return out, png


def _preflight_measure(args) -> dict:
    """Everything a GPU sweep needs, checked before anything starts -> the model's HF config."""
    if args.model is None:
        raise CalibrationError("--model: required (or --from-json RECORDS.json to fit existing measurements)")
    cfg = load_model_config(args.model, {})
    if not args.random_weights and not list(Path(args.model).glob("*.safetensors")):
        raise CalibrationError(f"--model {args.model}: no *.safetensors; pass --random-weights to time its shapes")
    import importlib.util

    ok = importlib.util.find_spec("sglang") is not None  # before torch: refusing on a CPU box stays instant
    if ok:
        import torch

        ok = torch.cuda.is_available()
    if not ok:
        raise CalibrationError("measuring needs a CUDA GPU and SGLang (pip install -e '.[gpu]'); "
                               "--from-json RECORDS.json fits existing measurements")
    return cfg


def run(args, command: str) -> dict:
    """The command: records (measured now or --from-json) -> roofline JSON + PNG; returns a summary."""
    if args.from_json:
        data = read_records(args.from_json)
        cfg = load_model_config(args.model, data["doc"])
        name = args.name or (model_slug(args.model) if args.model else (data["doc"].get("meta") or {}).get("model_name"))
        if not name:
            raise CalibrationError("--name: the records do not name the model; pass --name or --model")
        device = data["doc"].get("device") or "unknown"
        out, png = _outputs(args, args.gpu or gpu_slug(device), name)
        records_path, where, prov = Path(args.from_json), f"--from-json {args.from_json}", provenance(args.from_json)
    else:
        cfg = _preflight_measure(args)
        import torch

        name, device = args.name or model_slug(args.model), torch.cuda.get_device_name(0)
        out, png = _outputs(args, args.gpu or gpu_slug(device), name)
        records_path = Path(args.records_out or out.with_suffix(".records.json"))
        if records_path.exists() and not args.force:
            raise CalibrationError(f"--records-out {records_path} exists (pass --force to replace it)")
        measure(args, cfg, records_path, name)
        data, where, prov = read_records(records_path, "--records-out"), f"measured grid {records_path} (--budget-s)", {}
    meta_in = data["doc"].get("meta") or {}
    params, val, notes = calibrate(data, model_constants(cfg), where, args.flops)
    val.update({"device": device, "backend": data["doc"].get("backend"),
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "command": command,
                "records": str(records_path), "sglang": meta_in.get("sglang"),
                "worker_commit": meta_in.get("worker_commit"), **{k: v for k, v in prov.items() if v}})
    params.meta = {"gpu": f"{device} (TP=1)", "model": name, "status": args.note or "calibrated by er-calibrate",
                   "source": f"er-calibrate fit of {records_path}", "units": UNITS, **notes,
                   "model_shapes": model_constants(cfg), "validation": val}
    out.parent.mkdir(parents=True, exist_ok=True)
    png.parent.mkdir(parents=True, exist_ok=True)
    sign = "n/a" if val["sign_accuracy"] is None else f"{val['sign_accuracy']:.2f}"
    write_png(params, data, png, f"{device} {name}, held out (n={val['n_heldout']}): T_T MAPE "
              f"{val['T_T_mape']:.1f}%, SD step {val['T_step_mape']:.1f}%, sign accuracy {sign}")
    with open(out, "w") as f:
        json.dump(asdict(params), f, indent=2)
        f.write("\n")
    return {"out": str(out), "png": str(png), **{k: val[k] for k in ("T_T_mape", "T_step_mape", "speedup_mape",
                                                                      "sign_accuracy", "n_fit", "n_heldout")}}


UNITS = ("BW B/s; F FLOP/s; kappa KV bytes/token; c_T, c_D, c_V us per sequence; o_D, o_V us per step; "
         "W_t, W_d bytes; C_dense FLOPs/token; C_attn FLOPs/token/context token; *_mape %")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="er-calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF model dir (or its config.json); with --from-json only its shapes are read")
    p.add_argument("--random-weights", action="store_true", help="load_format dummy: config.json is enough")
    p.add_argument("--from-json", help="bench_step records JSON: fit + validate, no measuring")
    p.add_argument("--flops", type=float, help="F [FLOP/s] to use instead of the measured / fitted one")
    p.add_argument("--out", help="roofline JSON (default configs/roofline/<gpu>_tp1_<model>.json)")
    p.add_argument("--png", help="predicted-vs-measured plot (default: --out with .png)")
    p.add_argument("--records-out", help="measured records JSON (default: --out with .records.json)")
    p.add_argument("--name", help="model name in the file name (default: --model's directory name)")
    p.add_argument("--gpu", help="GPU name in the file name (default: from the device, e.g. h200)")
    p.add_argument("--note", help="meta.status of the written config, e.g. 'preliminary: ...'")
    p.add_argument("--force", action="store_true", help="replace existing --out / --png files")
    p.add_argument("--budget-s", type=float, default=600.0, help="wall-clock budget of the measurement")
    p.add_argument("--seqs", type=_ints, default=list(DEFAULT_SEQS))
    p.add_argument("--batches", type=_ints, default=list(DEFAULT_BATCHES))
    p.add_argument("--gammas", type=_ints, default=list(DEFAULT_GAMMAS))
    p.add_argument("--backend", default="flashinfer", choices=["flashinfer", "triton", "fa3"])
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        summary = run(args, shlex.join(["er-calibrate", *argv]))
    except (CalibrationError, ValueError) as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
