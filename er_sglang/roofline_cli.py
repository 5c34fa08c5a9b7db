"""CLI of the roofline model (er_sglang/roofline.py): `python -m er_sglang.roofline_cli CMD`.

Each command prints one JSON line; bad input prints one `error: ...` line on stderr and exits 2;
matplotlib is imported by `plot` only.

    predict  --config C --batch B --seq S --gamma G --accept-len L
    boundary --config C --seq S --gamma G --accept-len L [--threshold 1.05 --max-batch 1024]
    plot     --config C --seq S --gamma G --accept-lens 3,4.5,6 --out speedup.png [--max-batch 256]
    validate --config C --ar AR.json --sd SD.json [--accept-len 6 | 3:3,7:6,11:8]
    fit      --ar AR.json --sd SD.json --flops F --model-shapes {HF config.json | {W_t,W_d,C_dense,C_attn}}
             --out cfg.json [--gpu NAME --model NAME --accept-len ...]
    bstar    --config C --seq S [--alphas 0.6,0.8,0.9 --gammas 1,2,3,4,5,7 --threshold 1 --max-batch 1024 --markdown]
    speedup-map --config C --seq S [--alphas ... --gammas ... --batches 1,2,...,128 --records R.json --markdown]
bstar: B*(gamma, alpha), the largest B where speculation pays (speedup > threshold at L(alpha, gamma));
speedup-map: predicted speedup over B x gamma per alpha, with the measured one where --records has the point.
Records files are lists or {"records": [...]}; each record is AR or SD by its `mode` ('ar'|'sd'), so
--ar and --sd may name the same file. --accept-len defaults to the paper's cold-start table per gamma.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from er_sglang.roofline import (
    COLD_START_ACCEPT_LEN,
    OVERHEAD_KEYS,
    PARAM_KEYS,
    SHAPE_KEYS,
    Roofline,
    RooflineParams,
    expected_accept_len,
    model_constants,
)
from er_sglang.roofline_fit import fit_stage1, fit_stage2, load_records, validate


def _parse_accept_len(text: str):
    """'6' -> 6.0; '3:3,7:6,11:8' -> {3: 3.0, 7: 6.0, 11: 8.0}."""
    try:
        if ":" not in text:
            return float(text)
        return {int(k): float(v) for k, v in (item.split(":") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'gamma:L,...', got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _shapes_from_file(path) -> dict:
    """--model-shapes: an HF config.json (has hidden_size) or a JSON with W_t, W_d, C_dense, C_attn."""
    try:
        with open(path) as f:
            raw = json.load(f)
        if "hidden_size" in raw:
            return model_constants(raw)
        return {key: float(raw[key]) for key in SHAPE_KEYS}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--model-shapes {path}: need an HF config.json or keys {SHAPE_KEYS} ({e!r})") from None


def _cmd_fit(args) -> dict:
    ar, sd = load_records(args.ar, args.sd)
    shapes = _shapes_from_file(args.model_shapes)
    BW, kappa, c_T = fit_stage1(ar, args.flops, shapes["W_t"], shapes["C_dense"], shapes["C_attn"])
    params = RooflineParams(BW=BW, F=args.flops, kappa=kappa, eta_d=1.0, c_T=c_T, c_D=0.0, c_V=0.0,
                            **{k: shapes[k] for k in SHAPE_KEYS})
    for key, value in fit_stage2(sd, params).items():
        setattr(params, key, value)
    report = validate(params, ar, sd, args.accept_len)
    params.meta = {"gpu": args.gpu, "model": args.model, "source": f"fit of {args.ar} + {args.sd}",
                   "accept_len": args.accept_len, "validation": report}
    params.to_json(args.out)
    return {"out": args.out, **{k: getattr(params, k) for k in PARAM_KEYS + OVERHEAD_KEYS}, **report}


def _cmd_plot(args) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, batches = Roofline(RooflineParams.from_json(args.config)), np.arange(1, args.max_batch + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for L in args.accept_lens:
        ax.plot(batches, model.speedup(batches, args.seq, args.gamma, L), label=f"L = {L:g}")
    for level in (1.0, 1.05):
        ax.axhline(level, color="gray", linestyle="--", linewidth=1)
    ax.set(xscale="log", xlabel="active batch B", ylabel="predicted SD speedup",
           title=f"{model.p.meta.get('gpu', '')} {model.p.meta.get('model', '')} S={args.seq:g} gamma={args.gamma}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    return {"out": args.out}


def bstar_table(model: Roofline, seq: float, gammas, alphas, threshold: float = 1.0, max_batch: int = 1024) -> dict:
    """{alpha: {gamma: B*}}: B* = the largest B in [1, max_batch] with speedup(B, S, g, L(alpha, g)) > threshold,
    None where it pays at no B."""
    batches, table = np.arange(1, max_batch + 1), {}
    for a in alphas:
        table[a] = {}
        for g in gammas:
            pays = np.nonzero(np.asarray(model.speedup(batches, seq, g, expected_accept_len(a, g))) > threshold)[0]
            table[a][g] = int(batches[pays[-1]]) if pays.size else None
    return table


def speedup_map(model: Roofline, seq: float, batches, gammas, alphas, records=None) -> dict:
    """{alpha: {B: {gamma: (predicted, measured | None)}}}; measured = L * T_T,meas / T_step,meas from the
    records (a bench_step JSON) at this S."""
    from er_sglang.calibrate_fit import point_rows

    ratio = {}
    if records:
        ar, sd = load_records(records)
        ratio = {(r["B"], r["g"]): r["ratio"] for r in point_rows(model.p, ar, sd)[1] if r["S"] == seq}
    return {a: {b: {g: (float(model.speedup(b, seq, g, expected_accept_len(a, g))),
                        None if ratio.get((b, g)) is None else expected_accept_len(a, g) * ratio[(b, g)])
                    for g in gammas} for b in batches} for a in alphas}


def _markdown(args, result: dict) -> str:
    """The bstar / speedup-map result as markdown tables (docs/benchmarks.md)."""
    if args.cmd == "bstar":
        head = "| γ \\ α | " + " | ".join(f"{a:g}" for a in args.alphas) + " |"
        lines = [head, "|---" * (len(args.alphas) + 1) + "|"]
        for g in args.gammas:
            cells = [result[a][g] for a in args.alphas]
            lines.append(f"| {g} | " + " | ".join("never" if b is None else f"≥ {b}" if b == args.max_batch
                                                   else str(b) for b in cells) + " |")
        return "\n".join(lines)
    blocks = []
    for a in args.alphas:
        lines = [f"α = {a:g} (S = {args.seq:g}): predicted speedup" + (", measured in ()" if args.records else ""),
                 "", "| B \\ γ | " + " | ".join(str(g) for g in args.gammas) + " |", "|---" * (len(args.gammas) + 1) + "|"]
        for b in args.batches:
            cells = [result[a][b][g] for g in args.gammas]
            lines.append(f"| {b} | " + " | ".join(f"{p:.2f}" + ("" if m is None else f" ({m:.2f})") for p, m in cells)
                         + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _run(args) -> dict:
    if args.cmd == "fit":
        return _cmd_fit(args)
    if args.cmd == "plot":
        return _cmd_plot(args)
    if args.cmd in ("bstar", "speedup-map"):
        model = Roofline(RooflineParams.from_json(args.config))
        if args.cmd == "bstar":
            return bstar_table(model, args.seq, args.gammas, args.alphas, args.threshold, args.max_batch)
        return speedup_map(model, args.seq, args.batches, args.gammas, args.alphas, args.records)
    params = RooflineParams.from_json(args.config)
    if args.cmd == "validate":
        return validate(params, *load_records(args.ar, args.sd), args.accept_len)
    model = Roofline(params)
    if args.cmd == "predict":
        return model.predict(args.batch, args.seq, args.gamma, args.accept_len)
    b = model.boundary_batch(args.seq, args.gamma, args.accept_len, args.threshold, args.max_batch)
    return {"seq": args.seq, "gamma": args.gamma, "accept_len": args.accept_len,
            "threshold": args.threshold, "boundary_batch": b}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m er_sglang.roofline_cli", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    cmds = {name: sub.add_parser(name) for name in ("predict", "boundary", "plot", "validate", "fit", "bstar",
                                                      "speedup-map")}
    for name in ("predict", "boundary", "plot", "validate", "bstar", "speedup-map"):
        cmds[name].add_argument("--config", required=True, help="roofline JSON (configs/roofline/*.json)")
    for name in ("bstar", "speedup-map"):
        cmds[name].add_argument("--seq", type=float, required=True, help="mean context tokens S")
        cmds[name].add_argument("--alphas", type=_floats, default=[0.6, 0.8, 0.9], help="per-token acceptance")
        cmds[name].add_argument("--gammas", type=_ints, default=[1, 2, 3, 4, 5, 7])
        cmds[name].add_argument("--markdown", action="store_true", help="markdown tables instead of one JSON line")
    cmds["bstar"].add_argument("--threshold", type=float, default=1.0, help="speculation pays above this speedup")
    cmds["bstar"].add_argument("--max-batch", type=int, default=1024)
    cmds["speedup-map"].add_argument("--batches", type=_ints, default=[1, 2, 4, 8, 16, 32, 64, 128])
    cmds["speedup-map"].add_argument("--records", help="bench_step JSON: measured speedups where it has the point")
    for name in ("predict", "boundary", "plot"):
        cmds[name].add_argument("--seq", type=float, required=True, help="mean context tokens S")
        cmds[name].add_argument("--gamma", type=int, required=True, help="draft length")
    cmds["predict"].add_argument("--batch", type=int, required=True, help="active sequences B")
    for name in ("predict", "boundary"):
        cmds[name].add_argument("--accept-len", type=float, required=True, help="mean accepted length L")
    cmds["boundary"].add_argument("--threshold", type=float, default=1.05)
    cmds["boundary"].add_argument("--max-batch", type=int, default=1024)
    cmds["plot"].add_argument("--accept-lens", required=True,
                              type=lambda s: [float(x) for x in s.split(",")], help="e.g. 3,4.5,6")
    cmds["plot"].add_argument("--max-batch", type=int, default=256)
    cmds["plot"].add_argument("--out", required=True, help="PNG path")
    for name in ("validate", "fit"):
        cmds[name].add_argument("--ar", required=True, help="AR decode timings (records with mode 'ar')")
        cmds[name].add_argument("--sd", required=True, help="SD timings over several gamma (may be the --ar file)")
        cmds[name].add_argument("--accept-len", type=_parse_accept_len,
                                default=dict(COLD_START_ACCEPT_LEN), help="L, or per gamma '3:3,7:6,11:8'")
    fit = cmds["fit"]
    fit.add_argument("--flops", type=float, required=True, help="effective FLOP/s F from a GEMM benchmark")
    fit.add_argument("--model-shapes", required=True, help="HF config.json, or JSON with W_t, W_d, C_dense, C_attn")
    fit.add_argument("--out", required=True, help="roofline JSON to write")
    fit.add_argument("--gpu", default="unknown")
    fit.add_argument("--model", default="unknown")
    return parser


def _json_keys(x):
    """JSON objects need string keys: {0.8: {3: 12}} -> {"0.8": {"3": 12}}."""
    return {str(k): _json_keys(v) for k, v in x.items()} if isinstance(x, dict) else x


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        result = _run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    if getattr(args, "markdown", False):
        print(_markdown(args, result))
        return 0
    print(json.dumps(_json_keys(result), default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
