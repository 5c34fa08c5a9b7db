"""How far the int4 self-drafter is from its target on a real checkpoint, per backend (CPU).

For a few chat prompts the target greedily continues each by --new-tokens tokens; on the positions
that predict those response tokens we compare target logits l_t (p) with drafter logits l_d (q):
    rel_logit_err = ||l_d - l_t|| / ||l_t||          top1_agree = mean [argmax l_d == argmax l_t]
    kl = mean KL(p || q) per token (nats)            accept_prob = mean sum_x min(p, q) = 1 - TV,
the chance a temperature-1 draft token is accepted. Also: drafter bytes ratio, build / requantize
seconds, and one decode step (1 new token per sequence on a --context-token KV cache) of the drafter
vs the target at batch 1 and 8. Prints one JSON line; --out writes the same JSON.

    python scripts/drafter_error.py [--model PATH_OR_ALIAS] [--out runs/drafter_error.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from er_sglang.drafter import build_drafter

PROMPTS = [
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
     "How many clips did Natalia sell altogether in April and May?"),
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is in two sentences.",
    "What is the capital of France, and what river flows through it?",
]


def load_target(spec: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from er_sglang.models import resolve_model_path

    path = resolve_model_path(spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def make_sequences(model, tokenizer, new_tokens: int) -> list[tuple[torch.Tensor, int]]:
    """(ids [1, T], prompt_len) per prompt: chat-templated prompt + the target's greedy continuation."""
    out = []
    for text in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        full = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=tokenizer.eos_token_id)
        out.append((full, ids.shape[1]))
    return out


@torch.no_grad()
def error_metrics(target, drafter, sequences) -> dict:
    """Metrics over the positions that predict response tokens (prompt_len-1 .. T-2)."""
    lts, lds = [], []
    for ids, plen in sequences:
        lts.append(target(input_ids=ids).logits[0, plen - 1:-1])  # [T - plen, V]
        lds.append(drafter.model(input_ids=ids).logits[0, plen - 1:-1])
    lt, ld = torch.cat(lts), torch.cat(lds)
    logp, logq = lt.log_softmax(-1), ld.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # [N]
    accept = torch.minimum(logp.exp(), logq.exp()).sum(-1)
    return {
        "num_tokens": lt.shape[0],
        "rel_logit_err": ((ld - lt).norm() / lt.norm()).item(),
        "top1_agree": (ld.argmax(-1) == lt.argmax(-1)).float().mean().item(),
        "kl_per_token": kl.mean().item(),
        "accept_prob": accept.mean().item(),
    }


@torch.no_grad()
def decode_step_s(target, drafter, batch: int, context: int, reps: int) -> tuple[float, float]:
    """Median seconds (target, drafter) of one decode forward (1 token per sequence) on a
    `context`-token cache; the two are timed alternately so load from other processes hits both."""
    from transformers import DynamicCache

    vocab = target.config.vocab_size
    cache = DynamicCache(config=target.config)
    target(input_ids=torch.randint(0, vocab, (batch, context)), past_key_values=cache, use_cache=True)
    step = torch.randint(0, vocab, (batch, 1))
    pos = torch.full((batch, 1), context)
    times: dict[int, list[float]] = {0: [], 1: []}
    for rep in range(reps + 1):  # rep 0 warms up
        for i, model in enumerate((target, drafter.model)):
            t0 = time.perf_counter()
            model(input_ids=step, position_ids=pos, past_key_values=cache, use_cache=True)
            if rep:
                times[i].append(time.perf_counter() - t0)
            cache.crop(-1)
    return tuple(sorted(t)[len(t) // 2] for t in times.values())


def run_backend(target, backend: str, group_size: int, sequences, args) -> dict:
    t0 = time.perf_counter()
    drafter = build_drafter(target, group_size=group_size, backend=backend)
    build_s = time.perf_counter() - t0
    requant_s = min(drafter.requantize() for _ in range(3))  # min: other processes share the CPU
    res = {"backend": drafter.backend, "build_s": build_s, "requantize_s": requant_s,
           "group_sizes": sorted(set(drafter.group_sizes.values())),
           "num_quantized": drafter.num_quantized, **error_metrics(target, drafter, sequences),
           "bytes": drafter.weight_bytes()}
    for b in (1, 8):
        t_t, t_d = decode_step_s(target, drafter, b, args.context, args.reps)
        res[f"decode_b{b}"] = {"target_s": t_t, "draft_s": t_d, "ratio": t_d / t_t}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="HF checkpoint dir or er_sglang alias")
    ap.add_argument("--backends", default="rtn,torchao")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--context", type=int, default=64, help="KV-cache tokens in the decode timing")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); 1 is steadier on a CPU shared with others")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path, target, tokenizer = load_target(args.model)
    sequences = make_sequences(target, tokenizer, args.new_tokens)
    result = {"model": str(path), "dtype": "float32", "threads": torch.get_num_threads(),
              "torch": torch.__version__, "backends": {}}
    for backend in args.backends.split(","):
        result["backends"][backend] = run_backend(target, backend, args.group_size, sequences, args)
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
