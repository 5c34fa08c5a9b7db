"""Rollouts + rewards -> the trainers' batches, and a batch -> its micro-batches (pure torch; no Ray)."""
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


def seq_spans(attention_mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """First and last column holding a token, per row of ``attention_mask [n, T]`` (an empty row: 0, 0)."""
    has = attention_mask.bool()
    cols = torch.arange(has.shape[1], device=has.device).expand_as(has)
    last = torch.where(has, cols, 0).max(-1).values
    first = torch.minimum(torch.where(has, cols, has.shape[1]).min(-1).values, last)
    return first.tolist(), last.tolist()


def column_span(attention_mask: torch.Tensor) -> slice:
    """The columns a micro-batch ``attention_mask [n, T]`` is trimmed to: first to last with any token.

    Exact: the cut columns are padding in every row, positions come from the mask's cumsum (a leading
    cut shifts none), and a cut trailing column is seen by no kept one (causal attention).
    """
    first, last = seq_spans(attention_mask)
    return slice(min(first), max(last) + 1)


def micro_batches(attention_mask: torch.Tensor, max_seqs: int = 0, max_tokens: int = 0,
                  min_count: int = 1) -> list[torch.Tensor]:
    """Row indices of each micro-batch of a mini-batch ``attention_mask [n, T]``.

    ``max_tokens = 0``: runs of ``max_seqs`` consecutive rows. ``max_tokens > 0``: rows sorted longest
    first (ties: lower index first), packed greedily while ``rows × width <= max_tokens``, ``width``
    being the micro-batch's ``column_span``; a row longer than ``max_tokens`` goes alone. Then the
    micro-batch with the most padded tokens is halved until there are ``min_count`` of them (every FSDP
    rank must run as many forwards as the others).
    """
    n = attention_mask.shape[0]
    if not max_tokens:
        return [torch.arange(i, min(i + max_seqs, n)) for i in range(0, n, max_seqs)]
    if not 1 <= min_count <= n:
        raise ValueError(f"min_count must be in [1, {n}] (the number of rows), got {min_count}")
    first, last = seq_spans(attention_mask)

    def padded(rows: list[int]) -> int:  # tokens of the trimmed micro-batch
        return len(rows) * (max(last[i] for i in rows) - min(first[i] for i in rows) + 1)

    groups: list[list[int]] = []
    for i in sorted(range(n), key=lambda i: (first[i] - last[i], i)):
        if groups and padded(groups[-1] + [i]) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    while len(groups) < min_count:
        k = max((j for j in range(len(groups)) if len(groups[j]) > 1), key=lambda j: (padded(groups[j]), -j))
        rows = groups[k]
        groups[k:k + 1] = [rows[:(len(rows) + 1) // 2], rows[(len(rows) + 1) // 2:]]
    return [torch.tensor(rows) for rows in groups]
