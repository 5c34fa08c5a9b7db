"""Rollouts + rewards -> the trainers' batches (pure torch; no Ray)."""
from __future__ import annotations

import torch

from er_sglang.engine import Rollout
from orchestrator.grpo import group_advantages


def assign_groups(group_costs: list[float], num_engines: int) -> list[list[int]]:
    """Longest-processing-time assignment of prompt groups to engines.

    All G samples of a prompt stay on one engine (shared prefix, and the GRPO group finishes together);
    groups are placed largest expected cost first on the least-loaded engine.
    """
    loads = [0.0] * num_engines
    buckets: list[list[int]] = [[] for _ in range(num_engines)]
    for g in sorted(range(len(group_costs)), key=lambda i: -group_costs[i]):
        e = min(range(num_engines), key=lambda i: loads[i])
        buckets[e].append(g)
        loads[e] += group_costs[g]
    return [sorted(b) for b in buckets]


def make_train_batches(rollouts: list[Rollout], rewards: list[float], group_size: int, num_ranks: int,
                       pad_id: int) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Right-padded [N, T] tensors split evenly over `num_ranks` (padding rows carry no tokens).

    Returns (one batch per rank, advantages [N]). response_mask marks the output tokens; the trainer
    recomputes old log-probs itself (on-policy GRPO).
    """
    advantages = group_advantages(torch.tensor(rewards, dtype=torch.float32), group_size)
    seqs = [r.prompt_ids + r.output_ids for r in rollouts]
    width = max(len(s) for s in seqs)
    per_rank = -(-len(seqs) // num_ranks)
    total = per_rank * num_ranks
    input_ids = torch.full((total, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(total, width, dtype=torch.long)
    response_mask = torch.zeros(total, width, dtype=torch.long)
    adv = torch.zeros(total)
    for i, (r, s) in enumerate(zip(rollouts, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        response_mask[i, len(r.prompt_ids): len(s)] = 1
        adv[i] = advantages[i]
    attention_mask[len(seqs):, 0] = 1  # padding rows: one visible token, no response tokens
    batches = []
    for k in range(num_ranks):
        rows = slice(k * per_rank, (k + 1) * per_rank)
        batches.append({"input_ids": input_ids[rows], "attention_mask": attention_mask[rows],
                        "response_mask": response_mask[rows], "advantages": adv[rows]})
    return batches, advantages
