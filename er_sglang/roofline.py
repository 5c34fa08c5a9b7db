"""Roofline cost model of one decode step (AR vs self-speculative) and its calibration fit.

B active sequences, S mean context tokens, gamma drafts per verify step. W bytes, kappa KV bytes per
token, C_dense FLOPs per token, C_attn FLOPs per token per context token, BW bytes/s, F FLOP/s,
c_* microseconds per sequence, o_* microseconds per step; every time is in seconds unless its name says ms:

    T_T(B,S)    = max((W_t + kappa*B*S)/BW,       (B*C_dense + B*S*C_attn)/F)        + c_T*B*1e-6
    T_D(B,S)    = max((eta_d*W_d + kappa*B*S)/BW, (B*C_dense + B*S*C_attn)/F)        + c_D*B*1e-6
    T_V(B,S,g)  = max((W_t + kappa*B*S)/BW,       (g+1)*(B*C_dense + B*S*C_attn)/F)  + c_V*B*1e-6 + o_V*1e-6
    T_SD(B,S,g) = o_D*1e-6 + g*T_D + T_V   (one speculative step: g draft forwards, one verify; g = 0: T_T)
    L(alpha,g)  = (1 - alpha^(g+1)) / (1 - alpha)     speedup(g) = L*T_T / T_SD

o_D, o_V are the fixed work of a speculative step (draft setup, rejection sampling); the published A100 fit
has none (0). T_D is ONE draft forward.

Pure (numpy only): no plotting and no CLI here; `python -m er_sglang.roofline_cli` is the command line
(predict, boundary, plot, validate, fit) over this model.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

PARAM_KEYS = ("BW", "F", "kappa", "eta_d", "c_T", "c_D", "c_V", "W_t", "W_d", "C_dense", "C_attn")
OVERHEAD_KEYS = ("o_D", "o_V")  # optional in a config file, 0 when absent
SHAPE_KEYS = ("W_t", "W_d", "C_dense", "C_attn")
# The paper's cold-start mean accepted length per gamma (before any rollout has been measured).
COLD_START_ACCEPT_LEN = {3: 3.0, 5: 4.5, 7: 6.0, 9: 7.0, 11: 8.0}


@dataclass
class RooflineParams:
    """Calibrated constants of one (GPU, model, TP) pair; units as in the module docstring."""

    BW: float
    F: float
    kappa: float
    eta_d: float
    c_T: float
    c_D: float
    c_V: float
    W_t: float
    W_d: float
    C_dense: float
    C_attn: float
    o_D: float = 0.0
    o_V: float = 0.0
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for key in ("BW", "F", "W_t", "W_d", "eta_d"):
            if not getattr(self, key) > 0:
                raise ValueError(f"roofline param {key} must be > 0, got {getattr(self, key)}")

    @classmethod
    def from_json(cls, path) -> RooflineParams:
        """Read a config written by `to_json`; any problem -> ValueError naming the file and key."""
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"roofline config {path}: cannot read ({type(e).__name__}: {e})") from None
        values = {}
        for key in PARAM_KEYS + OVERHEAD_KEYS:
            if key in OVERHEAD_KEYS and isinstance(raw, dict) and key not in raw:
                continue
            if not isinstance(raw, dict) or key not in raw:
                raise ValueError(f"roofline config {path}: missing key '{key}'")
            try:
                values[key] = float(raw[key])
            except (TypeError, ValueError):
                raise ValueError(f"roofline config {path}: key '{key}' is not a number: {raw[key]!r}") from None
        try:
            return cls(**values, meta=dict(raw.get("meta") or {}))
        except ValueError as e:
            raise ValueError(f"roofline config {path}: {e}") from None

    def to_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)
            f.write("\n")


def _out(x):
    """0-d results come back as float, anything else as an ndarray."""
    x = np.asarray(x, dtype=float)
    return float(x) if x.ndim == 0 else x


def expected_accept_len(alpha, gamma: int):
    """Mean tokens emitted per verify step, L = (1 - alpha^(g+1))/(1 - alpha); alpha -> 1 gives g+1."""
    a = np.asarray(alpha, dtype=float)
    near_one = np.isclose(a, 1.0, rtol=0.0, atol=1e-12)
    safe = np.where(near_one, 0.5, a)
    return _out(np.where(near_one, gamma + 1.0, (1.0 - safe ** (gamma + 1)) / (1.0 - safe)))


def alpha_from_accept_len(accept_len: float, gamma: int) -> float:
    """Per-token acceptance alpha in [0, 1] with expected_accept_len(alpha, gamma) = L (bisection)."""
    if accept_len <= 1.0:
        return 0.0
    if accept_len >= gamma + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):  # L is increasing in alpha; 2^-60 is far below float noise
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if expected_accept_len(mid, gamma) < accept_len else (lo, mid)
    return 0.5 * (lo + hi)


def accept_len_for_gamma(accept_len, gamma: int) -> float:
    """L for this gamma from a number (clipped to [1, g+1]) or a {gamma: L} dict; a gamma missing from
    the dict gets the alpha of the nearest listed gamma, i.e. L = expected_accept_len(alpha, gamma)."""
    if not isinstance(accept_len, dict):
        return float(min(max(float(accept_len), 1.0), gamma + 1.0))
    if gamma in accept_len:
        return float(accept_len[gamma])
    g0 = min(accept_len, key=lambda g: (abs(g - gamma), g))
    return float(expected_accept_len(alpha_from_accept_len(accept_len[g0], g0), gamma))


class Roofline:
    """Step times and speedups of the roofline model; B and S may be numpy arrays (broadcast)."""

    def __init__(self, params: RooflineParams):
        self.p = params

    def _roof(self, weight_bytes, B, S, num_tokens):
        """max(memory_s, compute_s): memory_s = (weight_bytes + kappa*B*S)/BW,
        compute_s = num_tokens*(B*C_dense + B*S*C_attn)/F."""
        p, B, S = self.p, np.asarray(B, dtype=float), np.asarray(S, dtype=float)
        memory_s = (weight_bytes + p.kappa * B * S) / p.BW
        compute_s = num_tokens * (B * p.C_dense + B * S * p.C_attn) / p.F
        return np.maximum(memory_s, compute_s)

    def _step(self, weight_bytes, B, S, num_tokens, c_us):
        """Roof plus per-sequence overhead: max(memory_s, compute_s) + c_us*B*1e-6 [s]."""
        return _out(self._roof(weight_bytes, B, S, num_tokens) + c_us * np.asarray(B, dtype=float) * 1e-6)

    def t_target(self, B, S):
        """T_T [s] = max((W_t + kappa*B*S)/BW, (B*C_dense + B*S*C_attn)/F) + c_T*B*1e-6."""
        return self._step(self.p.W_t, B, S, 1, self.p.c_T)

    def t_draft(self, B, S):
        """T_D [s], one draft step = max((eta_d*W_d + kappa*B*S)/BW, (B*C_dense + B*S*C_attn)/F) + c_D*B*1e-6."""
        return self._step(self.p.eta_d * self.p.W_d, B, S, 1, self.p.c_D)

    def t_verify(self, B, S, gamma: int):
        """T_V [s] = max((W_t + kappa*B*S)/BW, (g+1)*(B*C_dense + B*S*C_attn)/F) + c_V*B*1e-6 + o_V*1e-6."""
        return _out(np.asarray(self._step(self.p.W_t, B, S, gamma + 1, self.p.c_V)) + self.p.o_V * 1e-6)

    def t_sd_step(self, B, S, gamma: int):
        """T_SD [s], one decode step at gamma = o_D*1e-6 + g*T_D + T_V; gamma = 0 is the plain step T_T."""
        if gamma == 0:
            return self.t_target(B, S)
        return _out(self.p.o_D * 1e-6 + gamma * np.asarray(self.t_draft(B, S)) + self.t_verify(B, S, gamma))

    def speedup(self, B, S, gamma: int, accept_len: float):
        """speedup = L*T_T / T_SD (dimensionless); gamma = 0 is plain decoding, 1.0."""
        _check_point(B, S, gamma, accept_len)
        if gamma == 0:
            return _out(np.ones(np.broadcast(np.asarray(B), np.asarray(S)).shape))
        return _out(accept_len * np.asarray(self.t_target(B, S)) / self.t_sd_step(B, S, gamma))

    def tokens_per_s(self, B, S, gamma: int, accept_len: float):
        """Tokens/s: B/T_T for gamma = 0, else B*L/T_SD."""
        _check_point(B, S, gamma, accept_len)
        B = np.asarray(B, dtype=float)
        if gamma == 0:
            return _out(B / self.t_target(B, S))
        return _out(B * accept_len / self.t_sd_step(B, S, gamma))

    def predict(self, B, S, gamma: int, accept_len: float) -> dict:
        """All model outputs at one point: step times [s], speedup, AR and SD tokens/s."""
        return {
            "batch": B, "seq": S, "gamma": gamma, "accept_len": accept_len,
            "speedup": self.speedup(B, S, gamma, accept_len),
            "T_T_s": self.t_target(B, S), "T_D_s": self.t_draft(B, S), "T_V_s": self.t_verify(B, S, gamma),
            "T_SD_s": self.t_sd_step(B, S, gamma),
            "tokens_per_s_ar": self.tokens_per_s(B, S, 0, 1.0),
            "tokens_per_s_sd": self.tokens_per_s(B, S, gamma, accept_len),
        }

    def boundary_batch(self, S, gamma: int, accept_len: float, threshold: float = 1.05,
                       max_batch: int = 1024) -> int | None:
        """First B in [1, max_batch] with speedup(B) < threshold; None if SD pays at every B."""
        batches = np.arange(1, max_batch + 1)
        below = np.nonzero(np.asarray(self.speedup(batches, S, gamma, accept_len)) < threshold)[0]
        return int(batches[below[0]]) if below.size else None


def _check_point(B, S, gamma, accept_len):
    if np.any(np.asarray(B) < 1) or np.any(np.asarray(S) < 0):
        raise ValueError(f"batch must be >= 1 and seq >= 0, got batch={B}, seq={S}")
    if int(gamma) != gamma or gamma < 0:
        raise ValueError(f"gamma must be an integer >= 0, got {gamma}")
    if gamma > 0 and not 1.0 <= accept_len <= gamma + 1 + 1e-9:
        raise ValueError(f"accept_len must be in [1, gamma+1] = [1, {gamma + 1}], got {accept_len}")


def model_constants(hf_config: dict, dtype_bytes: int = 2, draft_bits: int = 4, group_size: int = 128) -> dict:
    """Architecture constants of a dense decoder from its HF config.json dict.

    P_lin   = layers*(2*H*nh*hd + 2*H*nkv*hd + 3*H*I)   (q, o, k, v, gate, up, down)  [params]
    P_small = layers*(2*H + qkv biases) + H (norms, biases)    P_emb = V*H (x2 unless tied)
    W_t     = (P_lin + P_small + P_emb) * dtype_bytes                                  [bytes]
    W_d     = P_lin*draft_bits/8 + (P_lin/group_size)*2*dtype_bytes (scale + zero per group)
              + (P_small + P_emb)*dtype_bytes                                          [bytes]
    C_dense = 2*(P_lin + P_small + V*H)  (non-embedding params incl. lm_head)         [FLOPs/token]
    C_attn  = 4*layers*nh*hd  (QK^T and PV)                         [FLOPs/token/context token]
    kappa_theory = 2*layers*nkv*hd*dtype_bytes  (K and V)                              [bytes/token]
    Qwen2.5-7B: W_t 15.23e9, W_d 5.65e9 (the paper's 5.44e9 counts the int4 payload without the
    group scales/zeros; eta_d absorbs the difference), C_dense 1.414e10, C_attn 401408, kappa 57344.
    """
    H, inter = hf_config["hidden_size"], hf_config["intermediate_size"]
    layers, nh = hf_config["num_hidden_layers"], hf_config["num_attention_heads"]
    nkv = hf_config.get("num_key_value_heads") or nh
    hd = hf_config.get("head_dim") or H // nh
    vocab, tied = hf_config["vocab_size"], bool(hf_config.get("tie_word_embeddings", False))
    has_qkv_bias = hf_config.get("attention_bias", hf_config.get("model_type") == "qwen2")
    p_lin = layers * (2 * H * nh * hd + 2 * H * nkv * hd + 3 * H * inter)
    p_small = layers * (2 * H + (nh * hd + 2 * nkv * hd) * bool(has_qkv_bias)) + H
    p_emb = vocab * H * (1 if tied else 2)
    w_d_lin = p_lin * draft_bits / 8 + p_lin / group_size * 2 * dtype_bytes
    return {
        "W_t": float((p_lin + p_small + p_emb) * dtype_bytes),
        "W_d": float(w_d_lin + (p_small + p_emb) * dtype_bytes),
        "C_dense": float(2 * (p_lin + p_small + vocab * H)),
        "C_attn": float(4 * layers * nh * hd),
        "kappa_theory": float(2 * layers * nkv * hd * dtype_bytes),
    }


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
