"""CPU/torch reference engine: an HF causal LM + int4 self-drafter + lossless verifier + SpecPolicy.

The batch is ragged: every sequence has its own context length, yet all share one rectangular
`DynamicCache`. Slots whose draft was rejected stay in the cache but are masked out in the 2-D attention
mask (`mask`), and RoPE positions are tracked per row (`pos`), so one forward serves the whole batch.
The drafter runs on the target's cache (it reads the target's KV of the context, as EfficientRollout's
drafter does), and its own entries are cropped before the target verifies: no second KV cache exists.
Finished sequences leave the batch, so the active batch shrinks as in real RL rollouts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from er_sglang.engine import Rollout, SamplingParams, SpecStats, state_dict_checksum
from er_sglang.sampling import logprobs_from_logits, probs_from_logits, sample, verify, verify_greedy


@dataclass
class _Batch:
    """Decode state of the active rows; all tensors are indexed by active row."""

    rows: list[int]  # index into the rollouts list
    cache: DynamicCache
    mask: torch.Tensor  # [B, L] 1 = valid cache slot
    pos: torch.Tensor  # [B] RoPE position of the pending token = valid tokens before it
    pending: torch.Tensor  # [B] last emitted token, not yet in the cache

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.cache.batch_select_indices(index)
        self.mask, self.pos, self.pending = self.mask[index], self.pos[index], self.pending[index]


class ReferenceEngine:
    """RolloutEngine on plain PyTorch; every decision the SGLang path makes runs here too."""

    def __init__(self, model, policy, drafter=None, stop_token_ids=(), verify_fn=verify, progress=False):
        self.model = model.eval()
        self.policy = policy
        self.drafter = drafter
        self.stop_token_ids = set(stop_token_ids)
        self.verify_fn = verify_fn
        self.progress = progress
        self._stats = SpecStats()
        self._calls = 0
        self.is_sleeping = False
        if policy.needs_drafter and drafter is None:
            raise ValueError("spec.mode needs a drafter, but none was built")

    @classmethod
    def from_config(cls, cfg, progress: bool = False) -> ReferenceEngine:
        from transformers import AutoModelForCausalLM

        from er_sglang.models import model_info, resolve_model_path
        from er_sglang.policy import SpecPolicy

        path = resolve_model_path(cfg.model.path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.model.dtype))
        policy = SpecPolicy.from_config(cfg.spec, _load_roofline(cfg.spec))
        drafter = None
        if policy.needs_drafter:
            from er_sglang.drafter import build_drafter

            drafter = build_drafter(model, group_size=cfg.spec.group_size, backend=cfg.spec.drafter_backend)
        return cls(model, policy, drafter, model_info(path).stop_token_ids, progress=progress)

    # ---- RolloutEngine -------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        seed = params.seed if params.seed is not None else self._calls
        self._calls += 1
        gen = torch.Generator().manual_seed(seed)
        self.policy.begin_rollout(len(prompts))
        stops = self.stop_token_ids | set(params.stop_token_ids)
        rollouts = [Rollout(i, list(p), [], [], "") for i, p in enumerate(prompts)]
        batch = self._prefill(rollouts, params, gen, stops)
        bar = _progress_bar(len(prompts)) if self.progress else None
        while batch.rows:
            self._decode_step(batch, rollouts, params, gen, stops)
            keep = [i for i, r in enumerate(batch.rows) if not rollouts[r].finish_reason]
            if bar is not None:
                bar.update(len(batch.rows) - len(keep))
            if len(keep) < len(batch.rows):
                batch.select(keep)
            _maybe_compact(batch)
        if bar is not None:
            bar.close()
        return rollouts

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        """Copy new target weights in place (strict names), then re-quantize the drafter from them."""
        t0 = time.perf_counter()
        _check_state_dict(self.model.state_dict(), state_dict)  # all or nothing: validate before copying
        with torch.no_grad():
            self.model.load_state_dict(state_dict, strict=True)
        load_s = time.perf_counter() - t0
        requant_s = self.drafter.requantize() if self.drafter is not None else 0.0
        self._stats.requant_s += requant_s
        return {"load_s": load_s, "requant_s": requant_s}

    def weights_checksum(self) -> str:
        return state_dict_checksum(self.model.state_dict())

    def draft_check(self) -> dict:
        """{"ok", "num_linears", "num_equal"}: ok iff the drafter equals a fresh quantization of the target."""
        if self.drafter is None or not hasattr(self.drafter, "check"):  # no-sd, or a test's non-int4 drafter
            return {"ok": True, "num_linears": 0, "num_equal": 0}
        c = self.drafter.check()
        return {"ok": c["all_equal"], "num_linears": c["num_linears"], "num_equal": c["num_equal"]}

    def requantize(self) -> float:
        """Re-quantize the drafter from the target's current weights; returns seconds."""
        return self.drafter.requantize() if self.drafter is not None else 0.0

    def sleep(self) -> None:
        self.is_sleeping = True  # nothing to release on CPU

    def wake(self) -> None:
        self.is_sleeping = False

    def stats(self, reset: bool = False) -> SpecStats:
        out = self._stats
        if reset:
            self._stats = SpecStats()
        return out

    def end_rollout(self, num_drafted: int | None = None, num_accepted: int | None = None) -> None:
        self.policy.end_rollout(num_drafted, num_accepted)

    # ---- decoding --------------------------------------------------------------------------------
    def _prefill(self, rollouts, params, gen, stops) -> _Batch:
        """Left-padded prompt forward; the first token is sampled from the target."""
        lengths = [len(r.prompt_ids) for r in rollouts]
        width = max(lengths)
        ids = torch.zeros(len(rollouts), width, dtype=torch.long)
        mask = torch.zeros(len(rollouts), width, dtype=torch.long)
        for i, r in enumerate(rollouts):
            ids[i, width - lengths[i]:] = torch.tensor(r.prompt_ids)
            mask[i, width - lengths[i]:] = 1
        cache = DynamicCache(config=self.model.config)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True).logits[:, -1]
        first = sample(probs_from_logits(logits, params.temperature, params.top_p), gen)
        logp = logprobs_from_logits(logits, params.temperature).gather(-1, first[:, None])[:, 0]
        for i, r in enumerate(rollouts):
            _emit(r, [int(first[i])], [float(logp[i])], params.max_new_tokens, stops)
        batch = _Batch(list(range(len(rollouts))), cache, mask, torch.tensor(lengths), first)
        keep = [i for i in batch.rows if not rollouts[i].finish_reason]
        if len(keep) < len(batch.rows):
            batch.select(keep)
        return batch

    def _decode_step(self, batch: _Batch, rollouts, params, gen, stops) -> None:
        """decide gamma -> draft -> verify -> emit, for every active row at once."""
        num_rows = len(batch.rows)
        gamma = self.policy.choose_gamma(num_rows, float(batch.pos.float().mean()))
        draft_tokens, draft_probs = self._draft(batch, gamma, params, gen) if gamma else (None, None)
        inputs = batch.pending[:, None] if not gamma else torch.cat([batch.pending[:, None], draft_tokens], 1)
        logits = self._forward(self.model, batch, inputs)  # [B, gamma+1, V]
        if not gamma:
            tokens = sample(probs_from_logits(logits[:, 0], params.temperature, params.top_p), gen)[:, None]
            num_accepted = torch.zeros(num_rows, dtype=torch.long)
        elif params.temperature <= 0.0:
            tokens, num_accepted = verify_greedy(draft_tokens, logits)
        else:
            target_probs = probs_from_logits(logits, params.temperature, params.top_p)
            tokens, num_accepted = self.verify_fn(draft_tokens, draft_probs, target_probs, gen)
        # verify slots j > num_accepted hold rejected drafts: mask them out of the shared cache
        width = batch.mask.shape[1]
        slot = torch.arange(gamma + 1)[None, :]
        batch.mask[:, width - gamma - 1:] = (slot <= num_accepted[:, None]).long()
        batch.pos = batch.pos + num_accepted + 1
        batch.pending = tokens.gather(1, num_accepted[:, None])[:, 0]
        logp = logprobs_from_logits(logits, params.temperature).gather(-1, tokens.clamp(min=0)[..., None])[..., 0]
        for i, r in enumerate(batch.rows):
            n = int(num_accepted[i])
            rollout = rollouts[r]
            rollout.num_verify_steps += 1
            rollout.num_drafted += gamma
            rollout.num_accepted += n
            _emit(rollout, tokens[i, : n + 1].tolist(), logp[i, : n + 1].tolist(), params.max_new_tokens, stops)
        self._account(gamma, num_accepted)

    def _draft(self, batch: _Batch, gamma: int, params, gen):
        """gamma single-token drafter forwards on the target's cache, then crop them away."""
        tokens, probs = [], []
        current = batch.pending
        width = batch.mask.shape[1]
        for i in range(gamma):
            logits = self._forward(self.drafter.model, batch, current[:, None], offset=i)[:, -1]
            q = probs_from_logits(logits, params.temperature, params.top_p)
            current = sample(q, gen)
            tokens.append(current)
            probs.append(q)
        batch.cache.crop(-gamma)
        batch.mask = batch.mask[:, :width]
        return torch.stack(tokens, 1), torch.stack(probs, 1)

    @staticmethod
    def _forward(model, batch: _Batch, inputs: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Append `inputs` [B, n] at positions pos+offset.. to the cache; returns logits [B, n, V]."""
        num = inputs.shape[1]
        batch.mask = torch.cat([batch.mask, torch.ones(len(batch.rows), num, dtype=torch.long)], 1)
        position_ids = batch.pos[:, None] + offset + torch.arange(num)[None, :]
        out = model(input_ids=inputs, attention_mask=batch.mask, position_ids=position_ids,
                    past_key_values=batch.cache, use_cache=True)
        return out.logits.float()

    def _account(self, gamma: int, num_accepted: torch.Tensor) -> None:
        s = self._stats
        rows = len(num_accepted)
        s.num_steps += 1
        s.num_seq_steps += rows
        s.num_emitted += int(num_accepted.sum()) + rows
        s.gamma_hist[gamma] = s.gamma_hist.get(gamma, 0) + 1
        if gamma:
            s.num_spec_steps += 1
            s.num_drafted += gamma * rows
            s.num_accepted += int(num_accepted.sum())
            for n, count in zip(*torch.unique(num_accepted, return_counts=True)):
                s.accept_len_hist[int(n)] = s.accept_len_hist.get(int(n), 0) + int(count)
            self.policy.observe(gamma, num_accepted.tolist())


def _emit(rollout: Rollout, tokens: list[int], logprobs: list[float], max_new: int, stops: set[int]) -> None:
    """Append emitted tokens up to a stop token or the length budget; set finish_reason when done."""
    for tok, lp in zip(tokens, logprobs):
        rollout.output_ids.append(tok)
        rollout.logprobs.append(lp)
        if tok in stops:
            rollout.finish_reason = "stop"
            return
        if len(rollout.output_ids) >= max_new:
            rollout.finish_reason = "length"
            return


def _check_state_dict(current: dict, new: dict) -> None:
    """Same names and shapes, finite values; raise ValueError naming the first offender."""
    missing, unexpected = sorted(set(current) - set(new)), sorted(set(new) - set(current))
    if missing or unexpected:
        raise ValueError(f"update_weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in new.items():
        if tuple(tensor.shape) != tuple(current[name].shape):
            raise ValueError(f"update_weights: {name} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(current[name].shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"update_weights: {name} holds non-finite values")


def _maybe_compact(batch: _Batch, min_width: int = 64) -> None:
    """Drop masked-out cache slots once they are over half the cache (rows keep their order)."""
    width = batch.mask.shape[1]
    if width < min_width or not batch.rows:
        return
    valid = batch.mask.sum(1)
    new_width = int(valid.max())
    if new_width * 2 > width:
        return
    # per row: indices of valid slots, right-aligned so the newest tokens stay at the end
    order = torch.sort(batch.mask * torch.arange(1, width + 1)[None, :], dim=1, stable=True).indices
    index = order[:, width - new_width:]  # [B, new_width]
    batch.mask = batch.mask.gather(1, index)
    for layer in batch.cache.layers:
        gather = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, gather)
        layer.values = layer.values.gather(2, gather)


def _load_roofline(spec_cfg):
    if spec_cfg.mode in ("no-sd", "rtn"):
        return None
    from er_sglang.config import resolve_path
    from er_sglang.roofline import Roofline, RooflineParams

    return Roofline(RooflineParams.from_json(resolve_path(spec_cfg.roofline)))


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="rollout", unit="seq", leave=False)
