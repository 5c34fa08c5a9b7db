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

from er_sglang.draft_vocab import DraftVocab, install_subset_head
from er_sglang.engine import Rollout, SamplingParams, SpecStats, call_seed, state_dict_checksum
from er_sglang.sampling import (
    logprobs_from_logits,
    probs_from_logits,
    sample,
    scatter_probs,
    verify,
    verify_greedy,
)
from er_sglang.weight_probe import probe_tensor, tied_aliases


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

    def __init__(self, model, policy, drafter=None, stop_token_ids=(), verify_fn=verify, progress=False,
                 draft_vocab: DraftVocab | None = None):
        self.model = model.eval()
        self.policy = policy
        self.drafter = drafter
        self.draft_vocab = draft_vocab if drafter is not None else None  # spec.draft_vocab > 0
        self._draft_ids = None  # [K] token ids the draft head scores; None = the full vocabulary
        self.stop_token_ids = set(stop_token_ids)
        self.verify_fn = verify_fn
        self.progress = progress
        self._stats = SpecStats.fresh()
        self._calls = 0
        self.is_sleeping = False
        if policy.needs_drafter and drafter is None:
            raise ValueError("spec.mode needs a drafter, but none was built")

    @classmethod
    def from_config(cls, cfg, progress: bool = False) -> ReferenceEngine:
        from transformers import AutoModelForCausalLM

        from er_sglang.models import draft_vocab_always, load_tokenizer, model_info, resolve_model_path
        from er_sglang.policy import SpecPolicy

        path = resolve_model_path(cfg.model.path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.model.dtype))
        policy = SpecPolicy.from_config(cfg.spec, _load_roofline(cfg.spec))
        drafter = None
        if policy.needs_drafter:
            from er_sglang.drafter import build_drafter

            drafter = build_drafter(model, group_size=cfg.spec.group_size, backend=cfg.spec.drafter_backend,
                                    head=cfg.spec.draft_head, kernel=cfg.spec.draft_kernel)
        tokenizer = load_tokenizer(path)
        stops = model_info(path, tokenizer).stop_token_ids
        draft_vocab = None
        if drafter is not None and cfg.spec.draft_vocab:  # stop and special tokens are always drafted
            draft_vocab = DraftVocab(model.get_output_embeddings().weight.shape[0], cfg.spec.draft_vocab,
                                     draft_vocab_always(stops, tokenizer),
                                     soft=cfg.spec.draft_vocab_counts == "soft")
        return cls(model, policy, drafter, stops, progress=progress, draft_vocab=draft_vocab)

    # ---- RolloutEngine -------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        # one generator per call: the same seeds and the same batch give the same rollouts, bit for bit
        # (docs/reproducibility.md); another split of the batch across engines samples differently
        t0 = time.perf_counter()  # Rollout.latency_s counts from here
        self._require_awake("generate")
        seed = call_seed(params, fallback=self._calls)
        self._calls += 1
        gen = torch.Generator().manual_seed(seed)
        self.policy.begin_rollout(len(prompts))
        stops = self.stop_token_ids | set(params.stop_token_ids)
        rollouts = [Rollout(i, list(p), [], [], "") for i, p in enumerate(prompts)]
        self._refresh_draft_vocab(prompts)
        batch = self._prefill(rollouts, params, gen, stops)
        _stamp_finished(rollouts, range(len(rollouts)), t0)
        bar = _progress_bar(len(prompts)) if self.progress else None
        while batch.rows:
            self._decode_step(batch, rollouts, params, gen, stops)
            _stamp_finished(rollouts, batch.rows, t0)
            keep = [i for i, r in enumerate(batch.rows) if not rollouts[r].finish_reason]
            if bar is not None:
                bar.update(len(batch.rows) - len(keep))
            if len(keep) < len(batch.rows):
                batch.select(keep)
            _maybe_compact(batch)
        if bar is not None:
            bar.close()
        if self.draft_vocab is not None and not self.draft_vocab.soft:
            self.draft_vocab.observe([r.output_ids for r in rollouts])
        return rollouts

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        """Copy new target weights in place (strict names), then re-quantize the drafter from them."""
        self._require_awake("update_weights")
        t0 = time.perf_counter()
        _check_state_dict(self.model.state_dict(), state_dict)  # all or nothing: validate before copying
        with torch.no_grad():
            self.model.load_state_dict(state_dict, strict=True)
        load_s = time.perf_counter() - t0
        requant_s = self.drafter.requantize() if self.drafter is not None else 0.0
        if self.draft_vocab is not None:
            self.draft_vocab.mark_stale()  # new subset at the next generate (head rows re-gathered already)
        self._stats.requant_s += requant_s
        return {"load_s": load_s, "requant_s": requant_s}

    def weights_dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def begin_weight_update(self, shapes: dict[str, list[int]]) -> None:
        """Same names and shapes as the model's state dict (all of them but tied aliases, which follow their
        parameter); ValueError naming the first offender."""
        self._require_awake("begin_weight_update")
        aliases = tied_aliases(self.model)
        _check_shapes({k: v for k, v in self.model.state_dict().items() if k not in aliases or k in shapes}, shapes)

    def load_weights(self, named: list[tuple[str, torch.Tensor]], last: bool) -> dict[str, float]:
        """One bucket copied in place (names and shapes checked by begin_weight_update); after the last, the
        drafter is re-quantized from the new weights, once."""
        self._require_awake("load_weights")
        t0 = time.perf_counter()
        held = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in named:
                held[name].copy_(tensor)
        load_s = time.perf_counter() - t0
        if not last:
            return {"load_s": load_s, "requant_s": 0.0}
        requant_s = self.drafter.requantize() if self.drafter is not None else 0.0
        if self.draft_vocab is not None:
            self.draft_vocab.mark_stale()
        self._stats.requant_s += requant_s
        return {"load_s": load_s, "requant_s": requant_s}

    def weights_checksum(self) -> str:
        return state_dict_checksum(self.model.state_dict())

    def weights_probe(self, shapes: dict, num_values: int) -> dict:
        """What the model holds under each sent name (er_sglang/weight_probe.py); names it lacks left out."""
        held = self.model.state_dict()
        return {name: probe_tensor(held[name], shape, num_values) for name, shape in shapes.items() if name in held}

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
        self.is_sleeping = True  # nothing to release on CPU; the GPU engine's lifecycle is enforced all the same

    def wake(self) -> None:
        self.is_sleeping = False  # waking an awake engine is a no-op, as on the GPU

    def _require_awake(self, what: str) -> None:
        """A sleeping GPU engine has released its weights and KV cache: generating or writing weights then
        would touch unmapped memory. The CPU engine refuses the same calls, so CI catches a wrong order."""
        if self.is_sleeping:
            raise RuntimeError(f"{what} on a sleeping engine: wake() it first")

    def stats(self, reset: bool = False) -> SpecStats:
        out = self._stats
        if reset:
            self._stats = SpecStats.fresh()
        return out

    def end_rollout(self, num_drafted: int | None = None, num_accepted: int | None = None) -> None:
        self.policy.end_rollout(num_drafted, num_accepted)

    def policy_state(self) -> dict | None:
        return self.policy.state_dict()

    def load_policy_state(self, state: dict | None) -> None:
        if state is not None:
            self.policy.load_state_dict(state)

    # ---- decoding --------------------------------------------------------------------------------
    def _refresh_draft_vocab(self, prompts) -> None:
        """Count the prompts; rebuild the draft subset on the first call and the first after a weight update."""
        if self.draft_vocab is None:
            return
        self.draft_vocab.observe(prompts)
        if self.draft_vocab.is_stale:
            install_subset_head(self.drafter.model, self.draft_vocab.refresh())
            self._draft_ids = self.draft_vocab.ids

    def _count_probs(self, logits: torch.Tensor, num_accepted: torch.Tensor, params) -> None:
        """Soft draft-vocab counts: the target's p at every emitted position (logits [B, n, V]; row b emits
        positions 0..num_accepted[b]; a row's last step may count positions past its stop token)."""
        if self.draft_vocab is None or not self.draft_vocab.soft:
            return
        emitted = torch.arange(logits.shape[1])[None, :] <= num_accepted[:, None]  # [B, n]
        self.draft_vocab.observe_probs(probs_from_logits(logits[emitted], params.temperature, params.top_p))

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
        self._count_probs(logits[:, None], torch.zeros(len(rollouts), dtype=torch.long), params)
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
        self._count_probs(logits, num_accepted, params)
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
            logits = self._forward(self.drafter.model, batch, current[:, None], offset=i)[:, -1]  # [B, K or V]
            q = probs_from_logits(logits, params.temperature, params.top_p)
            current = sample(q, gen)
            ids = self._draft_ids
            if ids is not None:  # subset index -> token id; q over the vocabulary, exactly 0 off the subset
                current, q = ids[current], scatter_probs(q, ids, self.draft_vocab.vocab_size)
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
        accepted = num_accepted.tolist()
        self._stats.observe(gamma, accepted)
        if gamma:
            self.policy.observe(gamma, accepted)


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


def _stamp_finished(rollouts: list[Rollout], rows, t0: float) -> None:
    """latency_s = seconds since t0 of the `rows` that finished in the step just run (first stamp kept)."""
    now = time.perf_counter() - t0
    for r in rows:
        if rollouts[r].finish_reason and rollouts[r].latency_s is None:
            rollouts[r].latency_s = now


def _check_shapes(current: dict, shapes: dict) -> None:
    """A bucketed update's names and shapes against the model's: all present, none unknown, same shapes."""
    missing, unexpected = sorted(set(current) - set(shapes)), sorted(set(shapes) - set(current))
    if missing or unexpected:
        raise ValueError(f"update_weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, shape in shapes.items():
        if tuple(shape) != tuple(current[name].shape):
            raise ValueError(f"update_weights: {name} has shape {tuple(shape)}, expected {tuple(current[name].shape)}")


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
