"""Roofline cost model of one decode step (AR vs self-speculative); er_sglang.roofline_fit fits it.

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
from dataclasses import asdict, dataclass, field

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
