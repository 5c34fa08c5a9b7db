"""er-calibrate: measure, fit and validate the roofline (er_sglang/roofline.py) of one GPU and model, TP=1.

    er-calibrate --model HF_DIR [--random-weights] [--budget-s 600]       # measure on this GPU, fit, validate
    er-calibrate --from-json RECORDS.json [--model HF_DIR] [--flops F]    # fit + validate existing measurements
    (= python -m er_sglang.calibrate ...; writes configs/roofline/<gpu>_tp1_<model>.json and a PNG next to it)

Measuring (GPU + SGLang): scripts/bench_step.py's run over the planned (S, B) points, each part in a process of
its own: F_eff from a bf16 GEMM benchmark of the model's linear shapes (FLOPs / time over F_TOKENS tokens) and
plain SGLang first (it feeds stage 1 and every measured speedup), then the SD engine with gamma pinned per point
(rpc set_gamma); records are rewritten after every point and the sweep stops at --budget-s. An SD engine that
crashes keeps the AR records. --random-weights: load_format dummy.

Split, fit and validation (held-out points, metrics, targets): er_sglang/calibrate_fit.py.
Bad input: one `error:` line naming the flag or file, exit 2, nothing written.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from er_sglang.calibrate_fit import (  # the F401 names: re-exported for tests and callers of er_sglang.calibrate
    CalibrationError,
    calibrate,
    plan_grid,
    read_records,
    read_records_doc,  # noqa: F401
    split_heldout,  # noqa: F401
    validation_metrics,  # noqa: F401
    write_png,
)
from er_sglang.roofline import model_constants

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SEQS = (512, 2048, 8192)
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_GAMMAS = (0, 1, 2, 3, 4, 5, 7)  # gamma = 0 times the worker's plain step (diagnostic only)
F_TOKENS = (256, 512, 1024, 2048)
MODEL_CONFIG_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "attention_bias")


def gpu_name() -> str:
    """The GPU's name from nvidia-smi: this process must not hold a CUDA context while the measuring children
    size their KV caches from the free memory (torch's name as a fallback)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                         capture_output=True, text=True, check=False).stdout.strip() if shutil.which("nvidia-smi") else ""
    if out:
        return out.splitlines()[0]
    import torch

    return torch.cuda.get_device_name(0)


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


def measure(args, hf_config: dict, records_out: Path, name: str) -> None:
    """scripts/bench_step.py's run over the planned grid, its parts in processes of their own (an SD engine that
    crashes keeps the AR records; one that cannot start retries with B <= 16): F_eff and AR at every point within
    35% of the budget, then SD at every gamma per point until the budget; records -> records_out (rewritten
    after every point). A failed part leaves what it recorded, and the fit says if that is too little."""
    import importlib.metadata

    sys.path.insert(0, str(ROOT))  # scripts/ is not installed; bench_step lives there
    from scripts import bench_step

    points = plan_grid(args.seqs, args.batches)
    argv = ["run", "--model", str(args.model), "--json", str(records_out), "--backend", args.backend,
            "--seqs", ",".join(map(str, args.seqs)), "--batches", ",".join(map(str, args.batches)),
            "--gammas", ",".join(map(str, args.gammas)), "--points", ",".join(f"{s}:{b}" for s, b in points),
            "--limit-s", f"{args.budget_s - 15.0:.0f}", "--ar-budget-s", f"{0.35 * args.budget_s:.0f}",
            "--load-format", "dummy" if args.random_weights else "auto"]  # 15 s left for the fit and the files
    try:
        bench_step.main(argv)
    except SystemExit as exc:
        print(f"er-calibrate: {exc}", file=sys.stderr, flush=True)
    if not records_out.is_file():
        raise CalibrationError(f"measuring wrote no records ({records_out}); its log above says why")
    doc = json.loads(records_out.read_text())
    doc["meta"].update({"model_name": name, "sglang": importlib.metadata.version("sglang"), "plan": points})
    records_out.write_text(json.dumps(doc, indent=1))


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
    if not (Path(args.model) / "config.json").is_file():  # SGLang and bench_step read the directory, not the file
        hint = f"; pass its directory {Path(args.model).parent}" if Path(args.model).name == "config.json" else ""
        raise CalibrationError(f"--model {args.model}: measuring needs an HF model directory with config.json{hint}")
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
        name, device = args.name or model_slug(args.model), gpu_name()
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
    p.add_argument("--model", help="HF model dir (with --from-json also its config.json: only its shapes are read)")
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
