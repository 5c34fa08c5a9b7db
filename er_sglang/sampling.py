"""Lossless chain speculative verification (Leviathan et al. 2023), vectorized over the batch.

For i = 1..gamma accept draft x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
sample from normalize(max(p_i - q_i, 0)) and stop; if all gamma drafts are accepted, sample a bonus token
from p_{gamma+1}. The emitted tokens are distributed exactly as autoregressive sampling from p.
"""
from __future__ import annotations

import torch


def probs_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution of logits [..., V] at `temperature` (0 = greedy one-hot) and nucleus `top_p`."""
    logits = logits.float()
    if temperature <= 0.0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
    drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def logprobs_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) [..., V]; T = 0 reports the T = 1 log-probs (greedy has no density)."""
    scale = temperature if temperature > 0.0 else 1.0
    return torch.log_softmax(logits.float() / scale, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [B, V] -> int64 [B]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def scatter_probs(probs: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A distribution over the token subset `ids` [K] (probs [..., K]) as one over the vocabulary [..., V].

    q[..., ids[j]] = probs[..., j] and exactly 0 elsewhere, so `verify`'s residual max(p - q, 0) is p
    outside the subset: a reduced draft vocabulary stays lossless.
    """
    out = probs.new_zeros(*probs.shape[:-1], vocab_size)
    return out.scatter_(-1, ids.expand_as(probs), probs)


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain rejection sampling of gamma drafted tokens against the target.

    Args:
        draft_tokens: int64 [B, gamma], x_i drawn from q_i.
        draft_probs: [B, gamma, V], q_i (the draft's sampling distribution at each draft position).
        target_probs: [B, gamma+1, V], p_i at the same positions plus the bonus position.
    Returns:
        tokens: int64 [B, gamma+1]; row b holds its num_accepted[b] + 1 emitted tokens, then -1.
        num_accepted: int64 [B], accepted drafts per row (0..gamma).
    """
    batch, gamma = draft_tokens.shape
    device = draft_tokens.device
    idx = draft_tokens.unsqueeze(-1)
    p_x = target_probs[:, :gamma].gather(-1, idx).squeeze(-1).float()  # [B, gamma]
    q_x = draft_probs.gather(-1, idx).squeeze(-1).float()  # [B, gamma]
    u = torch.rand(batch, gamma, generator=generator, device=device)
    # accept iff u < p/q, written without division: q = 0 accepts whenever p > 0, p = 0 never accepts
    accept = u * q_x < p_x
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # leading run of accepts

    rows = torch.arange(batch, device=device)
    p_next = target_probs[rows, num_accepted].float()  # [B, V] p at the first rejection or the bonus slot
    rejected = num_accepted < gamma
    q_next = draft_probs[rows, num_accepted.clamp(max=gamma - 1)].float() * rejected.unsqueeze(-1)
    residual = (p_next - q_next).clamp(min=0.0)  # bonus rows: q_next = 0, so residual = p
    mass = residual.sum(-1, keepdim=True)
    # a rejection implies p != q, so mass > 0 up to rounding; fall back to p if it underflows
    residual = torch.where(mass > 1e-12, residual / mass.clamp(min=1e-30), p_next)
    extra = sample(residual, generator)

    positions = torch.arange(gamma + 1, device=device).unsqueeze(0)  # [1, gamma+1]
    padded = torch.cat([draft_tokens, torch.full((batch, 1), -1, dtype=torch.long, device=device)], 1)
    tokens = torch.where(positions < num_accepted.unsqueeze(1), padded, torch.full_like(padded, -1))
    tokens[rows, num_accepted] = extra
    return tokens, num_accepted


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature-0 verification: accept while the draft equals the target's argmax.

    draft_tokens int64 [B, gamma], target_logits [B, gamma+1, V] -> (tokens [B, gamma+1], num_accepted [B]),
    same layout as `verify`.
    """
    gamma = draft_tokens.shape[1]
    best = target_logits.argmax(-1)  # [B, gamma+1]
    num_accepted = (draft_tokens == best[:, :gamma]).long().cumprod(dim=1).sum(dim=1)
    positions = torch.arange(gamma + 1, device=draft_tokens.device).unsqueeze(0)
    tokens = torch.where(positions <= num_accepted.unsqueeze(1), best, torch.full_like(best, -1))
    return tokens, num_accepted
