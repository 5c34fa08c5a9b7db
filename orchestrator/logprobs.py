"""Token log-probs and entropies of a causal LM without a vocabulary-sized logits tensor (the trainer's
forward): inside ``head_returns_scores`` the lm_head returns each position's ``log p(target)`` (and entropy)
instead of its logits, ``chunk_tokens`` positions at a time, checkpointed under autograd."""

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from orchestrator import grpo
from orchestrator.batch import column_span


def head_scores(project, hidden: Tensor, targets: Tensor, temperature: float, with_entropy: bool,
                 entropy_grad: bool) -> Tensor:
    """``[c, H], [c] -> [c, 1 or 2]``: ``log softmax(z)[target]`` (and the entropy of softmax(z)) with
    ``z = lm_head(hidden).float() / temperature`` — the only vocabulary-sized tensors, ``[c, V]``."""
    z = project(hidden).float() / temperature
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(z, -1)
    if not with_entropy:
        return logp[:, None]
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = grpo.entropy_from_logits(z if entropy_grad else z.detach())
    return torch.stack([logp, entropy], -1)


@contextlib.contextmanager
def head_returns_scores(model, targets: Tensor, temperature: float, chunk_tokens: int, with_entropy: bool,
                         entropy_grad: bool):
    """Inside the block the model's lm_head maps hidden states ``[B, T, H]`` to ``head_scores``
    ``[B·T, 1 or 2]`` of ``targets [B, T]``, ``chunk_tokens`` of the B·T positions at a time, instead of
    to logits ``[B, T, V]``. It still runs inside the model's forward, so FSDP2 gathers (and reduces the
    gradient of) the head's weight, tied or not, as for plain logits. Under autograd each chunk is
    checkpointed: backward recomputes one chunk's logits at a time instead of keeping all of them.
    ``chunk_tokens = 0``: all positions at once, logits kept for backward (the unchunked computation).
    """
    head = model.get_output_embeddings()
    project, patched = head.forward, head.__dict__.get("forward")

    def forward(hidden: Tensor) -> Tensor:  # [B, T, H] -> [B·T, 1 or 2], a new tensor (not a view) for FSDP2
        flat, size = hidden.reshape(-1, hidden.shape[-1]), chunk_tokens or hidden.shape[:-1].numel()
        is_checkpointed = chunk_tokens > 0 and torch.is_grad_enabled()
        return torch.cat([checkpoint(head_scores, project, h, y, temperature, with_entropy, entropy_grad,
                                     use_reentrant=False, preserve_rng_state=False) if is_checkpointed
                          else head_scores(project, h, y, temperature, with_entropy, entropy_grad)
                          for h, y in zip(flat.split(size), targets.reshape(-1).split(size))])

    head.forward = forward
    try:
        yield
    finally:
        if patched is None:
            del head.forward
        else:
            head.forward = patched


def token_scores(model, input_ids: Tensor, attention_mask: Tensor, temperature: float, with_entropy: bool = False,
             entropy_grad: bool = False, chunk_tokens: int = 0) -> tuple[Tensor, Tensor | None]:
    """Token log-probs ``[B, T]`` (and entropies ``[B, T]``) of one micro-batch; see compute_logprobs.

    One decoder forward; the head's logits exist ``chunk_tokens`` positions at a time
    (``head_returns_scores``).
    """
    # Positions from the mask, so left-padded prompts get the positions the rollout engine used.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    targets = F.pad(input_ids[:, 1:], (0, 1))  # position t predicts token t+1 (the last one: nothing)
    with head_returns_scores(model, targets, temperature, chunk_tokens, with_entropy, entropy_grad):
        scores = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits.view(*input_ids.shape, -1)  # [B, T, 1 or 2]
    scores = F.pad(scores[:, :-1], (0, 0, 1, 0))  # token t's score at t; token 0 has no context: 0
    return scores[..., 0], scores[..., 1] if with_entropy else None


@torch.no_grad()
def compute_logprobs(model, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor,
                     temperature: float = 1.0, micro_batches: list[Tensor] | None = None,
                     chunk_tokens: int = 0) -> Tensor:
    """``out[b, t] = log softmax(logits[b, t-1] / temperature)[input_ids[b, t]]`` for response tokens.

    All inputs ``[B, T]`` on the model's device. Alignment: position ``t`` holds the log-prob of token
    ``t`` given tokens ``< t`` (logits[:, :-1] against ids[:, 1:], shifted right by one), so it lines
    up with ``response_mask``; positions outside the response (and t = 0) are 0. Logits are cast to
    float32 before the temperature. ``micro_batches``: the row indices of each forward (default: all
    rows in one), each trimmed to its own ``column_span``; logits exist ``chunk_tokens`` positions at
    a time (0: one ``[b, w, V]`` tensor per micro-batch of b rows and w columns).
    """
    out = torch.zeros(input_ids.shape, device=input_ids.device)
    for rows in micro_batches or [torch.arange(input_ids.shape[0])]:
        rows = rows.to(input_ids.device)
        cols = column_span(attention_mask[rows])
        out[rows, cols] = token_scores(model, input_ids[rows, cols], attention_mask[rows, cols], temperature,
                                   chunk_tokens=chunk_tokens)[0]
    return out * response_mask
