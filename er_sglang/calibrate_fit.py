"""Roofline calibration without a GPU: held-out split, two-stage fit and validation of bench_step records
(the pure part of er-calibrate, er_sglang/calibrate.py; MAIN_SEQ and MAX_POINT_TOKENS shape its grid plan).

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
"""
from __future__ import annotations

import json

import numpy as np

from er_sglang.roofline import SHAPE_KEYS, Roofline, RooflineParams, expected_accept_len
from er_sglang.roofline_fit import fit_flops, fit_stage1, fit_stage2

MAIN_SEQ = 2048
MAX_POINT_TOKENS = 2 ** 18  # B*S above this at a non-main S: its prefill costs more than the point tells
ALPHAS = (0.6, 0.7, 0.8, 0.9, 0.95)
TARGETS = {"T_T_mape": 5.0, "T_step_mape": 8.0, "sign_accuracy": 0.95}


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
    one forward in t_draft_ms, as in roofline_fit._draft_step_records)."""
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
    variants = sorted({str(r["variant"]) for r in sd + sd0 if r.get("variant")})
    if len(variants) > 1:  # one roofline models one drafter: a fit over several would average their costs
        raise CalibrationError(f"{where}: SD records of several variants ({', '.join(variants)}); calibrate from a "
                               "run of one (bench_step.py run --variants NAME)")
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
