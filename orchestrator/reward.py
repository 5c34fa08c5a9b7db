"""Rule-based math reward: 1.0 if the response's last \\boxed{} answer equals the ground truth, else 0.0.

Equivalence, cheapest first: identical after normalization (units, $, %, degrees, \\left/\\right,
\\dfrac, spaces, `x =`, thousands commas) -> tuples/intervals/lists item by item -> both sides parsed
by a small LaTeX subset parser into sympy (never eval) and compared numerically at fixed points
(rel 1e-6), with `sympy.simplify(a - b) == 0` under a 2 s alarm only where evaluation fails.

No \\boxed -> 0.0 by default: the prompts ask for \\boxed{} (as SimpleRL-Zoo's do) and a lenient
fallback rewards half-formed answers. `allow_unboxed=True` reads the number after a final
"answer is" / "Answer:" / "####" instead (for models too small to follow the format).
"""
from __future__ import annotations

import math
import re
import signal
import threading

import sympy

from er_sglang.data import extract_boxed  # the dataset loader reads MATH answers with it too

MAX_ANSWER_CHARS = 200  # longer answers are compared as strings only
_MAX_DEPTH = 3

_REPLACE = [("\\!", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""),
            ("\\right", ""), ("\\displaystyle", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""),
            ("°", ""), ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""), ("{,}", ""), ("\\,", ""),
            ("\\;", ""), ("\\:", ""), ("\\quad", ""), ("~", ""), ("\\ ", "")]
_TEXT = r"\\(?:text|textbf|textrm|mbox|mathrm)"
_UNIT_SUFFIX = re.compile(_TEXT + r"\{[a-zA-Z .]*\}(\^\{?\d\}?)?$")
_WORD_SUFFIX = re.compile(r"^(-?[\d.,]+)\s*[a-zA-Z]{2,}[a-zA-Z ]*$")  # "72 clips" -> 72
_TEXT_WRAP = re.compile(_TEXT + r"\{([^{}]*)\}")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_FUNCS = {"\\sin": sympy.sin, "\\cos": sympy.cos, "\\tan": sympy.tan, "\\ln": sympy.log,
          "\\log": sympy.log, "\\exp": sympy.exp}
_CONSTS = {"\\pi": sympy.pi, "\\infty": sympy.oo}
_GREEK = ["\\alpha", "\\beta", "\\gamma", "\\theta", "\\lambda", "\\mu", "\\phi", "\\omega"]
_COMMANDS = sorted(["\\frac", "\\sqrt", "\\cdot", "\\times", *_FUNCS, *_CONSTS, *_GREEK], key=len, reverse=True)
_TOKEN = re.compile(r"\d+\.?\d*|\.\d+|" + "|".join(re.escape(c) for c in _COMMANDS) + r"|[a-zA-Z]|[-+*/^(){}\[\]]")
_POINTS = (0.5377, 1.8339, -2.2588, 0.8622, 0.3188, -1.3077, -0.4336, 0.3426)  # pseudo-random, fixed


def normalize_answer(s: str) -> str:
    """Canonical string form (MATH `strip_string` rules plus units, percent, money, commas)."""
    s = s.replace("\n", " ").strip().rstrip(".").strip()
    s = re.sub(r"\\begin\{[pb]matrix\}(.*)\\end\{[pb]matrix\}",
               lambda m: "[" + re.sub(r"\\\\|&", ",", m.group(1)) + "]", s)
    for old, new in _REPLACE:
        s = s.replace(old, new)
    s = _UNIT_SUFFIX.sub("", s).strip() or s
    s = _WORD_SUFFIX.sub(r"\1", s)
    while _TEXT_WRAP.search(s):
        s = _TEXT_WRAP.sub(r"\1", s)
    s = s.replace(" ", "").rstrip(".")
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"^(-?\d+)/(\d+)$", r"\\frac{\1}{\2}", s)
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    while len(s) > 2 and s[0] == "{" and s[-1] == "}" and _wraps(s):
        s = s[1:-1]
    choice = re.match(r"^\(([A-Ea-e])\)$", s)
    return choice.group(1).upper() if choice else s


def is_equiv(pred: str | None, gt: str | None, _depth: int = 0) -> bool:
    if pred is None or gt is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(gt)
    if a == b:
        return True
    if not a or not b or _depth >= _MAX_DEPTH:
        return False
    items_a, items_b = _split_items(a), _split_items(b)
    if items_a or items_b:
        if not (items_a and items_b) or items_a[0] != items_b[0] or len(items_a[1]) != len(items_b[1]):
            return False
        if items_a[0] in ("", "{}"):  # plain lists and sets: order does not matter
            rest = list(items_b[1])
            for x in items_a[1]:
                hit = next((y for y in rest if is_equiv(x, y, _depth + 1)), None)
                if hit is None:
                    return False
                rest.remove(hit)
            return True
        return all(is_equiv(x, y, _depth + 1) for x, y in zip(items_a[1], items_b[1]))
    if len(a) > MAX_ANSWER_CHARS or len(b) > MAX_ANSWER_CHARS:
        return False
    x, y = _to_sympy(a), _to_sympy(b)
    return x is not None and y is not None and _sympy_equal(x, y)


def math_reward(response: str, answer: str, allow_unboxed: bool = False) -> float:
    pred = extract_boxed(response)
    if pred is None and allow_unboxed:
        match = re.search(r"(?:answer is|answer:|####)\s*\$?\s*(-?[\d,]*\.?\d+)[^\d]*$", response,
                          re.IGNORECASE)
        pred = match.group(1) if match else None
    gt = extract_boxed(answer) if "\\boxed" in answer else answer
    return 1.0 if is_equiv(pred, gt) else 0.0


REWARDS = ("math", "math_lenient")


def lenient_math_reward(response: str, answer: str) -> float:
    """math_reward, but a response without \\boxed{} is scored by its last number (tiny CPU models
    rarely box their answer; the paper's runs use the strict `math`)."""
    if extract_boxed(response) is not None:
        return math_reward(response, answer)
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", response)
    return 1.0 if numbers and is_equiv(numbers[-1].rstrip(".,"), answer) else 0.0


def reward_fn(name: str):
    """The reward named by the config key `reward`."""
    if name not in REWARDS:
        raise ValueError(f"reward: expected one of {REWARDS}, got {name!r}")
    return math_reward if name == "math" else lenient_math_reward


def _wraps(s: str) -> bool:
    """True if the bracket opening s[0] closes at s[-1] (not earlier, as in `{a}+{b}`)."""
    depth = 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0:
            return i == len(s) - 1
    return False


def _split_items(s: str) -> tuple[str, list[str]] | None:
    """(brackets, items) for `(1,2)`, `[a,b)`, `\\{1,2\\}`, `1,2`; None if no top-level comma."""
    brackets = ""
    if s.startswith("\\{") and s.endswith("\\}"):
        brackets, s = "{}", s[2:-2]
    elif len(s) > 2 and s[0] in "([" and s[-1] in ")]" and _wraps("(" + s[1:-1] + ")"):
        brackets, s = s[0] + s[-1], s[1:-1]
    items, depth, start = [], 0, 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if c == "," and depth == 0:
            items.append(s[start:i])
            start = i + 1
    return (brackets, items + [s[start:]]) if items else None


def _to_sympy(s: str):
    """sympy expression of a LaTeX subset, or None. Words (2+ letters) are not products of symbols."""
    if re.search(r"[a-zA-Z]{2,}", re.sub(r"\\[a-zA-Z]+", "", s)):
        return None
    tokens = _TOKEN.findall(s)
    if "".join(tokens) != s:  # something outside the subset
        return None
    parser = _Parser(tokens)
    try:
        out = parser.expr()
        return out if parser.peek() is None else None
    except Exception:  # noqa: BLE001 - sympy raises many types; malformed input is "not parseable"
        return None


class _Parser:
    """Recursive descent: expr = term (+|- term)*; term = unary ((*|/|implicit) unary)*; power = atom [^ unary]."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.i = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, want: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (want is not None and tok != want):
            raise ValueError(f"expected {want}, got {tok}")
        self.i += 1
        return tok

    def expr(self):
        out = self.term()
        while self.peek() in ("+", "-"):
            out = out + self.term() if self.take() == "+" else out - self.term()
        return out

    def term(self):
        out = self.unary()
        while (tok := self.peek()) is not None:
            if tok in ("*", "\\cdot", "\\times", "/"):
                self.take()
                out = out / self.unary() if tok == "/" else out * self.unary()
            elif tok[0].isalnum() or tok in ("(", "{") or tok in _COMMANDS:  # implicit product: 2x, 3\sqrt{2}
                out = out * self.power()
            else:
                break
        return out

    def unary(self):
        if self.peek() in ("-", "+"):
            return -self.unary() if self.take() == "-" else self.unary()
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        exponent = self.unary()
        if exponent.is_Number and abs(exponent) > 1000:  # 10^{10^9} would hang sympy's exact ints
            raise ValueError("exponent too large")
        return base ** exponent

    def group(self):
        if self.peek() == "{":
            self.take()
            out = self.expr()
            self.take("}")
            return out
        return self.atom()

    def atom(self):
        tok = self.take()
        if tok[0].isdigit() or tok[0] == ".":
            if len(tok) > 50:
                raise ValueError("number too long")
            return sympy.Rational(tok)
        if tok in ("(", "{"):
            out = self.expr()
            self.take(")" if tok == "(" else "}")
            return out
        if tok == "\\frac":
            return self.group() / self.group()
        if tok == "\\sqrt":
            index = 2
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.take("]")
            return sympy.root(self.group(), index)
        if tok in _FUNCS:
            return _FUNCS[tok](self.power())
        if tok in _CONSTS:
            return _CONSTS[tok]
        if tok.isalpha() or tok in _GREEK:
            return sympy.Symbol(tok.lstrip("\\"))
        raise ValueError(f"unexpected {tok}")


def _sympy_equal(x, y) -> bool:
    if x == y:
        return True
    if x.free_symbols != y.free_symbols:
        return False
    symbols = sorted(x.free_symbols, key=str)
    try:
        for k in range(3):
            point = {sym: _POINTS[(3 * j + k) % len(_POINTS)] for j, sym in enumerate(symbols)}
            vx, vy = complex(x.evalf(subs=point)), complex(y.evalf(subs=point))
            if not all(map(math.isfinite, (vx.real, vx.imag, vy.real, vy.imag))):
                return _simplify_is_zero(x - y)  # inf / nan at this point: try exact algebra
            if abs(vx - vy) > 1e-6 * max(1.0, abs(vy)):
                return False
        return True
    except (TypeError, ValueError, OverflowError):  # non-numeric value: try exact algebra
        return _simplify_is_zero(x - y)


def _raise_timeout(signum, frame):
    raise TimeoutError


def _simplify_is_zero(expr, timeout_s: float = 2.0) -> bool:
    """sympy.simplify(expr) == 0, abandoned after timeout_s; SIGALRM works only on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return bool(sympy.simplify(expr) == 0)
    except TimeoutError:
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
