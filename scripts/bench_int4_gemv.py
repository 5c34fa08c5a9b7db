"""Kernel-level cost of the draft step's linears: int4 (and int8) weight-only GEMV/GEMM vs bf16 (GPU).

    python scripts/bench_int4_gemv.py                                   # Qwen2.5-7B shapes, 300 s budget
    python scripts/bench_int4_gemv.py --model-config cfg.json --ms 1 16 --variants bf16 marlin gemlite
    python scripts/bench_int4_gemv.py --plot-only --json OUT.json --png OUT.png

Every int4 variant computes y = x @ w_hat^T, x [M, K], for ONE quantization: marlin_int4.quantize_rtn (torchao
RTN, asymmetric uint4, group 128: q [N, K], scale s [N, K/128] bf16, integer zero z), w_hat = (q - z) * s,
repacked per kernel: bf16 (F.linear = cuBLAS, the target's cost), marlin (the drafter's own _int4_buffers +
_marlin_apply), tinygemm (aten._weight_int4pack_mm: w = (q - 8) * s + zf, zf = (8 - z) * s rounded to bf16; the
drafter's spec.draft_kernel=tinygemm runs this kernel on torchao's tinygemm RTN instead: same bytes and time),
gemlite (A16W4 Triton, (q - z) * s, the drafter's gemlite_buffers + gemlite_apply; gemlite_fma: q * s + (-z * s)),
exllama (sgl_kernel.gptq_gemm, fp16 only,
GPTQ v1 zeros z - 1: a group with z = 0 cannot be stored), awq_triton (sglang's Triton AWQ GEMM, split-K 8,
fp16 only: it accumulates in the scales' dtype). int8 (per-row absmax, for the lm_head): int8_torch
(aten._weight_int8pack_mm), gemlite_w8 (A16W8).

Timing: the weights are cloned into enough copies to span --rotate-mb (>> the 50 MB L2), one CUDA graph holds
`calls` back-to-back calls cycling over the copies (about --graph-mb of weight traffic), us = median over
--repeats replays of replay_time / calls. bytes = the packed weight + scales + zeros one call reads;
gb_per_s = bytes / us; frac_copy_bw = gb_per_s / a device-to-device copy (read + write) timed in the same run.
max_rel_err = max|y - x w_ref^T| / max|x w_ref^T| (float reference; w_ref = w_hat, the int8 weight, or w).
draft_step: num_layers * (qkv + o + gate_up + down) + lm_head per M and variant, and composites (the
drafter today = marlin + bf16 head; best int4 per layer; best int4 + best int4/int8 head), ratio to bf16.
A variant that fails to import is recorded once and skipped; a failing point records its error line.
Not here, for lack of a kernel: flashinfer 0.6.15 has no dense int-weight GEMM on sm90 (bf16 x fp4 is sm100+);
sgl_kernel 0.4.5's other 4-bit paths quantize the activations (qserve w4a8) or are MoE-only; torchao 0.17's
CUDA int4 beyond tinygemm needs fbgemm/mslk, which the kit lacks.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts.bench_int4_gemv_kernels import GROUP, VARIANTS, int4_bytes, make_layer, tensor_bytes

MS = [1, 2, 4, 8, 16, 32]
COPY_REF_GBS = 4300.0  # H200 device-to-device copy, bytes read + written (device KINDS.md)
QWEN7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
          "num_hidden_layers": 28, "vocab_size": 152064}
DECODER = ("qkv", "o", "gate_up", "down")


def layer_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """HF config -> {layer: (N, K)} of one decoder layer's linears and the lm_head (weights are [N, K])."""
    cfg = cfg.get("text_config", cfg)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * inter, h), "down": (h, inter),
            "lm_head": (cfg["vocab_size"], h)}


def graph_time_us(fns: list, x, calls: int, repeats: int) -> float:
    """Median over `repeats` replays of one CUDA graph of `calls` calls (cycling over fns), per call [us]."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # JIT, autotune and library workspaces happen here, outside the capture
        for f in fns[:2]:
            f(x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)](x)
    g.replay()
    times = []
    for _ in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / calls)
    del g
    return statistics.median(times)


def cpu_time_us(fns: list, x, calls: int, repeats: int) -> float:
    """The CPU stand-in for graph_time_us (tests): wall clock per call."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            fns[i % len(fns)](x)
        times.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(times)


def copy_gb_per_s(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth, bytes read + written, GB/s (the ceiling frac_copy_bw refers to)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_time_us([lambda _: dst.copy_(src)], None, 4, repeats)
    return 2 * nbytes / us / 1e3


def error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def rel_err(y: torch.Tensor, x: torch.Tensor, w_ref: torch.Tensor) -> float:
    ref = x.float() @ w_ref.float().t()
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def run_variant(name: str, builder: Callable, layers: dict, args, timer: Callable, deadline: float,
                res: dict) -> None:
    """All (layer, M) points of one variant; errors and budget skips are recorded, never raised."""
    dev = next(iter(layers.values())).w.device
    for L in layers.values():
        n, k = L.w.shape
        base = {"variant": name, "layer": L.name, "n": n, "k": k}
        if time.time() > deadline:
            res["records"] += [dict(base, m=m, error="budget") for m in args.ms]
            continue
        try:
            b = builder(L)
        except ImportError as e:  # the library is not there: no other layer will do better
            res["variants"][name]["error"] = error_line(e)
            return
        except Exception as e:  # noqa: BLE001 - a shape the kernel refuses: record it, go on
            res["records"] += [dict(base, m=m, error=error_line(e)) for m in args.ms]
            continue
        res["variants"][name]["info"][L.name] = b.info
        nbytes = tensor_bytes(b.weights)
        copies = max(1, math.ceil(args.rotate_mb * 2**20 / nbytes))
        fns = [b.make(b.weights)] + [b.make({k2: t.clone() for k2, t in b.weights.items()})
                                     for _ in range(copies - 1)]
        calls = min(max(copies, math.ceil(args.graph_mb * 2**20 / nbytes)), args.max_calls)
        for m in args.ms:
            rec = dict(base, m=m, bytes=nbytes, copies=copies, calls=calls)
            if time.time() > deadline:
                res["records"].append(dict(rec, error="budget"))
                continue
            try:
                x = torch.randn(m, k, generator=torch.Generator(device=dev).manual_seed(m), device=dev)
                x = x.to(b.x_dtype)
                err = rel_err(fns[0](x), x, b.w_ref)
                us = timer(fns, x, calls, args.repeats)
                gbs = nbytes / us / 1e3
                rec.update(us=round(us, 3), gb_per_s=round(gbs, 1), max_rel_err=err,
                           frac_copy_bw=round(gbs / res["meta"]["copy_gb_per_s"], 4))
                print(f"GEMV {name:12s} {L.name:8s} M={m:3d} {us:9.2f} us {gbs:7.0f} GB/s "
                      f"frac {rec['frac_copy_bw']:.3f} err {err:.2e}", flush=True)
            except Exception as e:  # noqa: BLE001 - any kernel failure is a result, not a crash
                rec["error"] = error_line(e)
                print(f"GEMV {name:12s} {L.name:8s} M={m:3d} error {rec['error']}", flush=True)
            res["records"].append(rec)
        del fns, b
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# (name, decoder pool, lm_head pool): a pool lists variant names or kinds; each layer takes its fastest member
COMPOSITES = [("drafter_now", ("marlin",), ("bf16",)), ("best_int4", ("int4",), ("int4",)),
              ("best_int4_int8head", ("int4",), ("int4", "int8"))]


def draft_step(records: list, kinds: dict, num_layers: int, ms: list) -> list:
    """Per M: num_layers * (qkv + o + gate_up + down) + lm_head [us] for each variant and composite,
    and its ratio to bf16's. A row needs every layer timed."""
    us = {(r["variant"], r["layer"], r["m"]): r["us"] for r in records if r.get("us") is not None}
    rows = [(v, (v,), (v,)) for v in kinds] + COMPOSITES
    out = []
    for m in ms:
        for name, dspec, hspec in rows:
            pick = {}
            for layer in (*DECODER, "lm_head"):
                spec = hspec if layer == "lm_head" else dspec
                cands = [(us[(v, layer, m)], v) for v in kinds
                         if (v in spec or kinds[v] in spec) and (v, layer, m) in us]
                if cands:
                    pick[layer] = min(cands)
            if len(pick) == len(DECODER) + 1:
                total = num_layers * sum(pick[layer][0] for layer in DECODER) + pick["lm_head"][0]
                out.append({"m": m, "variant": name, "linear_us": round(total, 2),
                            "parts": {layer: v for layer, (_, v) in pick.items()}})
    bf16 = {r["m"]: r["linear_us"] for r in out if r["variant"] == "bf16"}
    for r in out:
        r["ratio_to_bf16"] = round(r["linear_us"] / bf16[r["m"]], 4) if r["m"] in bf16 else None
    return out


def versions() -> dict:
    from importlib import metadata

    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("sglang", "sglang-kernel", "torchao", "gemlite", "flashinfer-python", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def bench_meta(args, cfg: dict, shapes: dict) -> dict:
    """Device, versions, date, command and settings; the copy bandwidth is timed here (on CUDA)."""
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {"device": props.name if cuda else "cpu", "versions": versions(), "cmd": " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": args.budget_s, "shapes": {k: list(v) for k, v in shapes.items()}, "ms": args.ms,
            "group_size": GROUP, "num_layers": cfg.get("text_config", cfg)["num_hidden_layers"],
            "l2_bytes": getattr(props, "L2_cache_size", None), "rotate_mb": args.rotate_mb,
            "graph_mb": args.graph_mb, "repeats": args.repeats, "copy_ref_gb_per_s": COPY_REF_GBS,
            "copy_gb_per_s": copy_gb_per_s() if cuda else COPY_REF_GBS}


def run_bench(args, registry: dict = VARIANTS) -> dict:
    """Every variant (in order, each with an equal share of the budget left) on every layer and M."""
    t0 = time.time()
    cfg = QWEN7B
    if args.model_config:
        with open(args.model_config) as f:
            cfg = json.load(f)
    unknown = sorted(set(args.variants) - set(registry)) + sorted(set(args.layers) - set(layer_shapes(cfg)))
    if unknown:
        raise SystemExit(f"error: unknown variants/layers {unknown}; variants: {list(registry)}")
    shapes = {k: v for k, v in layer_shapes(cfg).items() if k in args.layers}
    meta = bench_meta(args, cfg, shapes)
    print(f"device {meta['device']} copy {meta['copy_gb_per_s']:.0f} GB/s; {meta['versions']}", flush=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    layers = {name: make_layer(name, n, k, dev, args.seed) for name, (n, k) in shapes.items()}
    names = list(dict.fromkeys(args.variants))
    res = {"meta": meta, "variants": {v: {"kind": registry[v][0], "error": None, "info": {}} for v in names},
           "records": [], "draft_step": []}
    timer = graph_time_us if dev == "cuda" else cpu_time_us
    deadline_all = t0 + args.budget_s
    for i, name in enumerate(names):
        deadline = time.time() + (deadline_all - time.time()) / (len(names) - i)
        run_variant(name, registry[name][1], layers, args, timer, deadline, res)
        if res["variants"][name]["error"]:
            print(f"GEMV {name:12s} skipped: {res['variants'][name]['error']}", flush=True)
        finish(res, registry, args, t0)  # the JSON after every variant: a killed run keeps what it measured
    return res


def finish(res: dict, registry: dict, args, t0: float) -> None:
    kinds = {v: registry[v][0] for v in res["variants"]}
    res["draft_step"] = draft_step(res["records"], kinds, res["meta"]["num_layers"], args.ms)
    res["meta"]["elapsed_s"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)


def plot(res: dict, png: str) -> None:
    """us vs M per variant, one panel per layer, and the draft step's linear ratio to bf16."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, layers = res["meta"], list(res["meta"]["shapes"])
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    axes = axes.ravel()
    names = list(res["variants"]) + [c for c, _, _ in COMPOSITES]
    color = {v: "k" if v == "bf16" else f"C{i % 10}" for i, v in enumerate(names)}
    for ax, layer in zip(axes, layers):
        for v in res["variants"]:
            pts = sorted((r["m"], r["us"]) for r in res["records"]
                         if r["variant"] == v and r["layer"] == layer and r.get("us") is not None)
            if pts:
                ax.plot(*zip(*pts), "--" if v == "bf16" else "o-", color=color[v], label=v, ms=3)
        n, k = meta["shapes"][layer]
        ax.axhline(int4_bytes(n, k) / meta["copy_gb_per_s"] / 1e3, color="gray", ls=":", label="int4 @ copy bw")
        ax.set(title=f"{layer} [N={n}, K={k}]", yscale="log", ylabel="us per call")
    ax = axes[len(layers)]
    for v in dict.fromkeys(r["variant"] for r in res["draft_step"]):
        pts = sorted((r["m"], r["ratio_to_bf16"]) for r in res["draft_step"] if r["variant"] == v)
        ax.plot(*zip(*pts), "o-", color=color.get(v, "C9"), label=v, ms=3,
                lw=2.5 if v in [c for c, _, _ in COMPOSITES] else 1)
    ax.set(title=f"draft-step linears ({meta['num_layers']} layers + head) / bf16", ylabel="ratio")
    for ax in axes[:len(layers) + 1]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(meta["ms"], [str(m) for m in meta["ms"]])
        ax.set_xlabel("M (tokens)")
        ax.grid(alpha=0.3)
    for ax in axes[len(layers) + 1:]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    axes[len(layers)].legend(fontsize=7)
    fig.suptitle(f"{meta['device']}: weight-only linears, int4 g{meta['group_size']} RTN "
                 f"(copy {meta['copy_gb_per_s']:.0f} GB/s)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=os.path.join(ROOT, "docs", "results", "bench_int4_gemv_h200.json"))
    p.add_argument("--png", default=None, help="default: the --json path with .png")
    p.add_argument("--model-config", default=None, help="HF config.json (default: Qwen2.5-7B)")
    p.add_argument("--ms", type=int, nargs="+", default=MS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--layers", nargs="+", default=[*DECODER, "lm_head"])
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--rotate-mb", type=float, default=512.0, help="weight copies span this much memory")
    p.add_argument("--graph-mb", type=float, default=2048.0, help="weight traffic per graph replay")
    p.add_argument("--max-calls", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args(argv)
    args.png = args.png or os.path.splitext(args.json)[0] + ".png"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.plot_only:
        with open(args.json) as f:
            res = json.load(f)
    else:
        res = run_bench(args)
        for r in res["draft_step"]:
            print(f"STEP M={r['m']:3d} {r['variant']:20s} {r['linear_us']:10.1f} us  "
                  f"ratio {r['ratio_to_bf16']}  {r['parts']}", flush=True)
    try:
        plot(res, args.png)
    except Exception as e:  # noqa: BLE001 - the JSON is already written
        print("plot failed:", error_line(e))
    return res


if __name__ == "__main__":
    main()
