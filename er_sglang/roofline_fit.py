"""Calibration fit of the roofline model (er_sglang.roofline) from benchmark timings.

Stage 1 fits (BW, kappa, c_T) on AR steps, stage 2 (eta_d, c_D, o_D, c_V, o_V) on SD steps; both minimize
the log-MSE of predicted vs measured step times (relative least squares start, Nelder-Mead refinement).
fit_flops finds F from verify timings when no GEMM measurement exists; validate reports MAPEs and toggle sign
accuracy; load_records reads benchmark JSON files. Pure (numpy only).
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np

from er_sglang.roofline import Roofline, RooflineParams, accept_len_for_gamma


def _columns(records, keys, what):
    """Records (list of dicts) -> one float ndarray per key; a missing key -> ValueError."""
    if not records:
        raise ValueError(f"{what}: no records")
    out = []
    for key in keys:
        try:
            out.append(np.array([float(r[key]) for r in records]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{what}: every record needs a numeric '{key}'") from None
    return out


def _log_mse(pred, meas):
    return float(np.mean((np.log(np.maximum(pred, 1e-12)) - np.log(meas)) ** 2))


def _rel_lstsq(A, t):
    """argmin_x sum(((A x - t)/t)^2): relative least squares, the linear proxy of log-MSE."""
    return np.linalg.lstsq(A / t[:, None], np.ones_like(t), rcond=None)[0]


def _fit_memory_branch(A, t, is_memory_bound):
    """Relative least squares on the points that the current estimate x calls memory-bound
    (is_memory_bound(x) -> bool mask); 3 rounds, starting from all points."""
    use = np.ones(len(t), dtype=bool)
    for _ in range(3):
        x = _rel_lstsq(A[use], t[use])
        mask = is_memory_bound(x)
        use = mask if mask.sum() >= A.shape[1] else use
    return x


def _nelder_mead(f, x0, step, iters: int = 600, ftol: float = 1e-16):
    """Minimize f: R^n -> R from x0 (simplex edges `step`); numpy only, deterministic."""
    x0 = np.asarray(x0, dtype=float)
    simplex = np.vstack([x0] + [x0 + np.eye(len(x0))[i] * step[i] for i in range(len(x0))])
    fvals = np.array([f(x) for x in simplex])
    for _ in range(iters):
        order = np.argsort(fvals)
        simplex, fvals = simplex[order], fvals[order]
        if fvals[-1] - fvals[0] <= ftol:
            break
        centroid = simplex[:-1].mean(axis=0)
        xr = centroid + (centroid - simplex[-1])
        fr = f(xr)
        if fr < fvals[0]:
            xe = centroid + 2.0 * (centroid - simplex[-1])
            fe = f(xe)
            simplex[-1], fvals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < fvals[-2]:
            simplex[-1], fvals[-1] = xr, fr
        else:
            xc = centroid + 0.5 * (simplex[-1] - centroid)
            fc = f(xc)
            if fc < fvals[-1]:
                simplex[-1], fvals[-1] = xc, fc
            else:  # shrink toward the best vertex
                simplex[1:] = simplex[0] + 0.5 * (simplex[1:] - simplex[0])
                fvals[1:] = [f(x) for x in simplex[1:]]
    return simplex[np.argmin(fvals)]


def fit_stage1(ar_records, F, W_t, C_dense, C_attn, kappa=None):
    """(BW [B/s], kappa [B/token], c_T [us/seq]) from AR steps {batch, seq, ms_per_step}, log-MSE.

    Start: on memory-bound points t = W_t*(1/BW) + B*S*(kappa/BW) + B*(c_T*1e-6) is linear; solve it
    by relative least squares, drop points the estimate calls compute-bound, repeat; then refine
    x = (log BW, log kappa, c_T) on the full max() model with Nelder-Mead. A given `kappa` is held fixed
    (needed when all records share one S: kappa*S/BW and c_T are then the same slope in B).
    """
    B, S, ms = _columns(ar_records, ("batch", "seq", "ms_per_step"), "AR records")
    t, compute_s = ms * 1e-3, (B * C_dense + B * S * C_attn) / F
    if kappa is not None:  # fold the fixed KV term into the weight column: t = (W_t + kappa*B*S)/BW + B*c_T
        A = np.column_stack([W_t + kappa * B * S, B])
        inv_bw, c = _fit_memory_branch(A, t, lambda x: x[0] * (W_t + kappa * B * S) >= compute_s)
        x0 = np.array([math.log(1.0 / max(inv_bw, 1e-16)), math.log(kappa), c * 1e6])
    else:
        A = np.column_stack([np.full_like(B, W_t), B * S, B])
        inv_bw, k_over_bw, c = _fit_memory_branch(A, t, lambda x: x[0] * W_t + x[1] * B * S >= compute_s)
        inv_bw, k_over_bw = max(inv_bw, 1e-16), max(k_over_bw, 1e-22)
        x0 = np.array([math.log(1.0 / inv_bw), math.log(k_over_bw / inv_bw), c * 1e6])

    def loss(x):
        log_kappa = x[1] if kappa is None else math.log(kappa)
        pred = np.maximum((W_t + math.exp(log_kappa) * B * S) / math.exp(x[0]), compute_s) + x[2] * B * 1e-6
        return _log_mse(pred, t)

    x = _nelder_mead(loss, x0, step=[0.05, 0.1 if kappa is None else 0.0, max(1.0, abs(x0[2]) * 0.1)])
    return float(math.exp(x[0])), float(math.exp(x[1]) if kappa is None else kappa), float(x[2])


def _draft_step_records(sd_records):
    """SD records with `t_draft_ms` = ONE draft forward: scripts/bench_step.py writes that as
    `t_draft_step_ms` (its `t_draft_ms` is all gamma forwards of a step); records without it (hand-made,
    the published fits) already hold one step in `t_draft_ms`."""
    return [dict(r, t_draft_ms=r["t_draft_step_ms"]) if r.get("t_draft_step_ms") is not None else r
            for r in sd_records]


def _wlstsq(A, y, t):
    """argmin_x sum(((A x - y)/t)^2): least squares relative to the measured times t."""
    return np.linalg.lstsq(A / t[:, None], y / t, rcond=None)[0]


def _fit_verify(B, S, g, tv, p: RooflineParams, refine: bool = True):
    """(c_V, o_V) [us] and the log-MSE: T_V - max(...) = c_V*B*1e-6 + o_V*1e-6 is linear; relative least
    squares, refined on log-MSE. o_V is held at 0 when all points share one B (it is then c_V*B)."""
    work = B * p.C_dense + B * S * p.C_attn
    roof_v = np.maximum((p.W_t + p.kappa * B * S) / p.BW, (g + 1) * work / p.F)
    cols = [B * 1e-6] + ([np.full_like(B, 1e-6)] if len(set(B)) > 1 else [])
    A = np.column_stack(cols)
    x = _wlstsq(A, tv - roof_v, tv)
    if refine:
        x = _nelder_mead(lambda x: _log_mse(roof_v + A @ x, tv), x, step=np.maximum(1.0, np.abs(x) * 0.1))
    return float(x[0]), float(x[1]) if len(x) > 1 else 0.0, _log_mse(roof_v + A @ x, tv)


def fit_stage2(sd_records, params: RooflineParams) -> dict:
    """{eta_d, c_D, o_D, c_V, o_V} from SD steps {batch, seq, gamma, t_draft_ms, t_verify_ms}, log-MSE.

    t_draft_ms is one draft forward (see _draft_step_records), so a step's draft work is g*t_draft_ms.
    BW, kappa, F and the shapes come from `params` (stage 1). On memory-bound draft points
    g*(t_D - kappa*B*S/BW) + ... is linear: g*t_D - g*kv = eta_d*g*W_d/BW + c_D*g*B*1e-6 + o_D*1e-6; solved by
    relative least squares, then refined on log-MSE with Nelder-Mead. o_D is held at 0 with one gamma.
    The verify part is _fit_verify.
    """
    B, S, g, td_ms, tv_ms = _columns(
        _draft_step_records(sd_records), ("batch", "seq", "gamma", "t_draft_ms", "t_verify_ms"), "SD records")
    p, draft_s, tv = params, g * td_ms * 1e-3, tv_ms * 1e-3
    work = B * p.C_dense + B * S * p.C_attn
    kv_s = p.kappa * B * S / p.BW
    with_o_d = len(set(g)) > 1
    A = np.column_stack([g * p.W_d / p.BW, g * B * 1e-6] + ([np.full_like(B, 1e-6)] if with_o_d else []))
    x0 = _fit_memory_branch(A, draft_s - g * kv_s, lambda x: x[0] * p.W_d / p.BW + kv_s >= work / p.F)
    x0 = np.array([math.log(max(x0[0], 1e-3)), *x0[1:]])

    def pred_d(x):
        o_d = x[2] if with_o_d else 0.0
        return o_d * 1e-6 + g * (np.maximum(math.exp(x[0]) * p.W_d / p.BW + kv_s, work / p.F) + x[1] * B * 1e-6)

    xd = _nelder_mead(lambda x: _log_mse(pred_d(x), draft_s), x0,
                      step=np.array([0.05, *np.maximum(1.0, np.abs(x0[1:]) * 0.1)]))
    c_v, o_v, _ = _fit_verify(B, S, g, tv, p)
    return {"eta_d": float(math.exp(xd[0])), "c_D": float(xd[1]), "o_D": float(xd[2]) if with_o_d else 0.0,
            "c_V": c_v, "o_V": o_v}


def fit_flops(sd_records, params: RooflineParams, lo: float = 1e12, hi: float = 1e17) -> float:
    """F [FLOP/s] that best explains the verify timings (log-MSE, (c_V, o_V) re-solved per F): for records
    without a GEMM measurement. Log grid, then golden section; on a flat loss (no point compute-bound)
    the largest F of the flat part, i.e. no compute bound is claimed beyond the data."""
    B, S, g, tv_ms = _columns(sd_records, ("batch", "seq", "gamma", "t_verify_ms"), "SD records")

    def loss(log_f):
        return _fit_verify(B, S, g, tv_ms * 1e-3, replace(params, F=math.exp(log_f)), refine=False)[2]

    grid = np.linspace(math.log(lo), math.log(hi), 121)
    losses = np.array([loss(x) for x in grid])
    i = int(np.nonzero(losses <= losses.min() * (1 + 1e-9) + 1e-15)[0][-1])
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    for _ in range(60):  # golden section on [a, b]
        m1, m2 = b - 0.618 * (b - a), a + 0.618 * (b - a)
        a, b = (a, m2) if loss(m1) < loss(m2) else (m1, b)
    return float(math.exp(0.5 * (a + b)))


def validate(params: RooflineParams, ar_records, sd_records, accept_len) -> dict:
    """MAPE [%] of T_T, T_D (per forward, o_D spread over the g forwards), T_V and toggle sign accuracy [0..1].

    Sign accuracy: over SD points (B,S,g) whose (B,S) also has an AR timing, the fraction where
    (predicted speedup > 1) == (measured speedup > 1), measured = L*T_T/(g*T_D + T_V) from timings
    with the same L (`accept_len`: number or {gamma: L}, see accept_len_for_gamma).
    """
    model = Roofline(params)
    B, S, ms = _columns(ar_records, ("batch", "seq", "ms_per_step"), "AR records")
    sB, sS, sg, td, tv = _columns(_draft_step_records(sd_records),
                                  ("batch", "seq", "gamma", "t_draft_ms", "t_verify_ms"), "SD records")
    t_v_pred = np.array([model.t_verify(b, s, int(k)) for b, s, k in zip(sB, sS, sg)])
    ar_ms = {}
    for b, s, m in zip(B, S, ms):
        ar_ms.setdefault((b, s), []).append(m)
    hits = []
    for b, s, k, d, v in zip(sB, sS, sg, td, tv):
        if (b, s) in ar_ms:
            L = accept_len_for_gamma(accept_len, int(k))
            measured = L * np.mean(ar_ms[(b, s)]) / (k * d + v)
            hits.append((model.speedup(b, s, int(k), L) > 1.0) == (measured > 1.0))

    def mape(pred_s, meas_ms):
        return float(100.0 * np.mean(np.abs(pred_s * 1e3 - meas_ms) / meas_ms))

    return {
        "t_target_mape": mape(model.t_target(B, S), ms),
        "t_draft_mape": mape(np.asarray(model.t_draft(sB, sS)) + params.o_D * 1e-6 / sg, td),
        "t_verify_mape": mape(t_v_pred, tv),
        "toggle_sign_accuracy": float(np.mean(hits)) if hits else None,
        "num_sign_points": len(hits),
    }


def load_records(*paths):
    """Benchmark JSON files (each a list, or {"records": [...]}) -> (ar, sd) record lists. A record is
    AR if its `mode` is 'ar' (or, without a mode, if gamma is 0 or absent), SD otherwise; SD records at
    gamma = 0 (the worker's plain decode step: nothing drafted or verified) are left out."""
    ar, sd = [], []
    for path in dict.fromkeys(paths):  # the same file given twice is read once
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"records file {path}: cannot read ({type(e).__name__}: {e})") from None
        records = raw.get("records") if isinstance(raw, dict) else raw
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"records file {path}: expected a list of objects or {{\"records\": [...]}}")
        for r in records:
            if r.get("mode", "ar" if not r.get("gamma") else "sd") == "ar":
                ar.append(r)
            elif r.get("gamma"):
                sd.append(r)
    return ar, sd
