"""The prompt side of a run: dataset, template, tokenizer and the resumable batch iterator."""
from __future__ import annotations

from er_sglang.data import PromptIterator, load_dataset
from er_sglang.models import load_tokenizer, resolve_model_path
from er_sglang.rollout import encode_prompts


class PromptSource:
    def __init__(self, cfg):
        self.cfg = cfg
        examples = load_dataset(cfg.data.train, size=cfg.data.size, seed=cfg.data.seed)
        self.iterator = PromptIterator(examples, cfg.data.prompts_per_step, seed=cfg.data.seed)
        self.tokenizer = load_tokenizer(resolve_model_path(cfg.model.path))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def next_batch(self):
        return self.iterator.next_batch()

    def encode(self, examples) -> list[list[int]]:
        """Token ids of each prompt, repeated samples_per_prompt times (a group stays contiguous)."""
        return encode_prompts(examples, self.cfg.data.template, self.tokenizer, self.cfg.data.samples_per_prompt)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def state_dict(self) -> dict:
        return self.iterator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.iterator.load_state_dict(state)
