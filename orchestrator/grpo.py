"""GRPO math: group advantages, clipped token-level policy loss, KL penalties, entropy.

Pure torch, no state. Shapes: N sequences, T tokens, V vocabulary. ``mask`` is 1 on the response
tokens that count (``[N, T]``). Formulas follow VeRL's ``core_algos`` (the trainer EfficientRollout
used), so numbers are comparable with the paper's runs. Defaults are DESIGN §3's: clip 0.2, KL
``low_var_kl`` (coefficient set by the caller, 1e-4 for Qwen), entropy coefficient 0.
"""

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean")
KL_KINDS = ("low_var_kl", "kl", "mse")


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6, norm_by_std: bool = True) -> Tensor:
    """Outcome advantage of each sample relative to its prompt group.

    rewards: ``[N]``, the ``group_size`` samples of one prompt contiguous (N = prompts × group_size).
    ``A_i = (r_i − mean_g) / (std_g + eps)`` with ``std_g`` the *unbiased* (n−1) standard deviation,
    as VeRL's ``compute_grpo_outcome_advantage`` (``torch.std``); ``A_i = r_i − mean_g`` when
    ``norm_by_std`` is False (Dr.GRPO). A group of one sample gets mean 0, std 1 (VeRL's convention).
    Returns ``[N]`` float32.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be [N] with N divisible by group_size={group_size}, got {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)  # [P, G]
    if group_size == 1:
        mean, std = torch.zeros_like(r), torch.ones_like(r)
    else:
        mean, std = r.mean(-1, keepdim=True), r.std(-1, keepdim=True)
    adv = r - mean
    if norm_by_std:
        adv = adv / (std + eps)
    return adv.view(-1)


def masked_mean(x: Tensor, mask: Tensor, denom: float | Tensor | None = None) -> Tensor:
    """``Σ x·mask / denom``; ``denom`` defaults to ``Σ mask`` (clamped ≥ 1 so an empty mask gives 0)."""
    total = (x * mask).sum()
    if denom is None:
        denom = mask.sum().clamp(min=1)
    return total / denom


def aggregate(x: Tensor, mask: Tensor, agg: str = "token-mean", denom: float | Tensor | None = None) -> Tensor:
    """Reduce a per-token quantity ``x [N, T]`` to a scalar.

    ``token-mean``: ``Σ_{n,t} x·mask / denom``, every valid token weighs the same; ``denom`` defaults
    to the number of valid tokens here. ``seq-mean-token-mean``: each sequence's token mean, summed
    and divided by ``denom`` (default: N). Pass the *global* count (over micro-batches and ranks) as
    ``denom`` and the per-call results add up to the exact mini-batch aggregate.
    """
    if agg == "token-mean":
        return masked_mean(x, mask, denom)
    if agg == "seq-mean-token-mean":
        seq = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [N]
        return seq.sum() / (seq.numel() if denom is None else denom)
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
    agg: str = "token-mean",
    denom: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, aggregated over tokens.

    logp, old_logp, mask: ``[N, T]``; advantages ``[N]`` (broadcast over tokens) or ``[N, T]``.
    ``ρ = exp(clamp(logp − old_logp, ±20))``,
    ``ℓ = max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high))``, and for ``A < 0`` dual clip
    ``ℓ = min(ℓ, −A·clip_ratio_c)`` (VeRL's default 3; ``None`` disables it).
    Returns (loss scalar, metrics): ``clip_frac`` = share of tokens where the clipped branch is
    active, ``approx_kl`` = mean of ``old_logp − logp`` (VeRL's ``ppo_kl``), ``ratio_mean`` = mean ρ;
    every metric aggregated like the loss.
    """
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_tok = torch.maximum(loss_unclipped, loss_clipped)
    if clip_ratio_c is not None:
        # Dual clip: bounds the loss of a negative-advantage token whose ratio exploded.
        loss_tok = torch.where(advantages < 0, torch.minimum(loss_tok, -advantages * clip_ratio_c), loss_tok)
    with torch.no_grad():
        metrics = {
            "clip_frac": aggregate((loss_clipped > loss_unclipped).float(), mask, agg, denom),
            "approx_kl": aggregate(-log_ratio, mask, agg, denom),
            "ratio_mean": aggregate(ratio, mask, agg, denom),
        }
    return aggregate(loss_tok, mask, agg, denom), metrics


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "low_var_kl") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from sampled tokens' log-probs (Schulman's k1/k2/k3).

    ``kl`` (k1): ``logp − ref_logp``; ``mse`` (k2): ``½ (logp − ref_logp)²``;
    ``low_var_kl`` (k3): with ``d = clamp(ref_logp − logp, ±20)``, ``exp(d) − d − 1`` clamped to
    [−10, 10] (VeRL). Shapes as the inputs.
    """
    if kind == "kl":
        return logp - ref_logp
    if kind == "mse":
        return 0.5 * (logp - ref_logp).square()
    if kind == "low_var_kl":
        d = (ref_logp - logp).clamp(-20.0, 20.0)
        return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"kl_type must be one of {KL_KINDS}, got {kind!r}")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits): ``H = logsumexp(z) − Σ softmax(z)·z``. ``[..., V] → [...]``, float32."""
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    kl_coef: float = 1e-4,
    kl_type: str = "low_var_kl",
    entropy_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
    agg: str = "token-mean",
    denom: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``L = pg_loss + kl_coef · agg(KL(logp, ref_logp)) − entropy_coef · agg(H)``.

    Token tensors ``[N, T]``; ``entropy`` is the per-token entropy (``entropy_from_logits``), needed
    only for ``entropy_coef ≠ 0`` (then it must carry grad) and otherwise just logged. ``ref_logp``
    is required when ``kl_coef > 0``. All terms use the same ``agg``/``denom`` (see ``aggregate``).
    Metrics (detached scalars): ``train/pg_loss``, ``train/kl``, ``train/entropy``,
    ``train/clip_frac``, ``train/approx_kl``, ``train/ratio_mean``.
    """
    pg_loss, pg_metrics = policy_loss(
        logp, old_logp, advantages, mask, clip_low, clip_high, clip_ratio_c, agg, denom
    )
    loss = pg_loss
    zero = pg_loss.new_zeros(())
    kl = zero
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("grpo_loss: kl_coef > 0 needs ref_logp")
        kl = aggregate(kl_penalty(logp, ref_logp, kl_type), mask, agg, denom)
        loss = loss + kl_coef * kl
    ent = zero
    if entropy is not None:
        ent = aggregate(entropy, mask, agg, denom)
        if entropy_coef != 0:
            loss = loss - entropy_coef * ent
    elif entropy_coef != 0:
        raise ValueError("grpo_loss: entropy_coef != 0 needs entropy")
    metrics = {
        "train/pg_loss": pg_loss.detach(),
        "train/kl": kl.detach(),
        "train/entropy": ent.detach(),
        "train/clip_frac": pg_metrics["clip_frac"],
        "train/approx_kl": pg_metrics["approx_kl"],
        "train/ratio_mean": pg_metrics["ratio_mean"],
    }
    return loss, metrics
