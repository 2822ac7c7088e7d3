"""Answer extraction and scoring of generated text, one rule per task (DESIGN.md §5).

`generated_text` is what the model wrote after the prompt (`format.prompt_text`), up to EOS.

GSM8K, ProsQA (Coconut's rule): the answer is the text after the last "#", commas removed,
stripped; it must equal the example's answer exactly (GSM8K: the number, "1234"; ProsQA:
the sentence, "Tom is a lempus."). Anything after the answer counts: "### 72 apples" is
wrong, as in Coconut. Text without "#" has no answer.

Countdown (TinyZero's rule, `verl/utils/reward_score/countdown.py`): the equation is the
content of the LAST `<answer>...</answer>` block (one line; stripped). Score 1.0 when it
uses exactly the example's numbers (as a multiset), is made of integers, + - * /,
parentheses and whitespace only, and its value is within 1e-5 of the target; 0.1 (the
format score) when a block exists but any of that fails; 0.0 without a block. Fractional
intermediates are fine ("(7 / 2) * 2" = 7). Differences from TinyZero, all on the safe
side: the equation is parsed with `ast` and a whitelist and evaluated exactly with
`fractions.Fraction`, never `eval`; `**` and `//` (which TinyZero's `eval` would run as
power and floor division) and decimals like "3.0" are malformed (0.1); unary signs are
accepted as TinyZero's `eval` accepts them ("-3 + 5"). TinyZero also looks only at the
text's last line (after "Assistant:"); here any line counts, the last block wins.

`accuracy` is the share of scores that are `is_correct` (1.0); the 0.1 format score never
counts as correct.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

from pipeline.errors import PipelineError
from pipeline.tasks.format import TASKS

FORMAT_SCORE = 0.1
TOLERANCE = Fraction(1, 100_000)
MAX_EQUATION_CHARS = 1_000
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>")
_EQUATION_CHARS = re.compile(r"^[\d+\-*/()\s]+$")
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise PipelineError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")


def extract_answer(task: str, text: str) -> str | None:
    """The model's answer in `text`: Countdown's last <answer> block, else the text after the last '#'."""
    _check_task(task)
    if task == "countdown":
        blocks = _ANSWER_BLOCK.findall(text)
        return blocks[-1].strip() if blocks else None
    if "#" not in text:
        return None
    return text.split("#")[-1].replace(",", "").strip()


class _Malformed(ValueError):
    pass


def _evaluate(node: ast.AST, numbers: list[int]) -> Fraction:
    """Exact value of a whitelisted expression tree; collects its integer literals into `numbers`."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, numbers)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        numbers.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _evaluate(node.left, numbers), _evaluate(node.right, numbers)
        if isinstance(node.op, ast.Div) and b == 0:
            raise _Malformed("division by zero")
        return _BINARY[type(node.op)](a, b)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _evaluate(node.operand, numbers)
        return -v if isinstance(node.op, ast.USub) else v
    raise _Malformed(f"not allowed: {type(node).__name__}")


def evaluate_equation(equation: str) -> tuple[Fraction, list[int]] | None:
    """(exact value, integer literals in order) of an arithmetic equation, or None if malformed."""
    if len(equation) > MAX_EQUATION_CHARS or not _EQUATION_CHARS.match(equation):
        return None
    try:
        numbers: list[int] = []
        return _evaluate(ast.parse(equation.strip(), mode="eval"), numbers), numbers
    except (SyntaxError, _Malformed, RecursionError, MemoryError, ValueError):
        return None


def score_countdown(numbers: list[int], target: int, text: str) -> float:
    """TinyZero's Countdown score of `text`: 1.0, 0.1 (format only) or 0.0 (no answer block)."""
    equation = extract_answer("countdown", text)
    if equation is None:
        return 0.0
    got = evaluate_equation(equation)
    if got is None:
        return FORMAT_SCORE
    value, used = got
    if sorted(used) != sorted(numbers) or abs(value - target) >= TOLERANCE:
        return FORMAT_SCORE
    return 1.0


def score(task: str, example: dict[str, Any], generated_text: str) -> float:
    """1.0 for a correct answer, 0.0 for a wrong one; Countdown also 0.1 (well-formed, wrong)."""
    _check_task(task)
    if task == "countdown":
        return score_countdown(example["numbers"], example["target"], generated_text)
    got = extract_answer(task, generated_text)
    return 1.0 if got is not None and got == example["answer"].replace(",", "").strip() else 0.0


def is_correct(score: float) -> bool:
    """Whether a score counts as solved (only 1.0 does)."""
    return score >= 1.0


def accuracy(scores: Iterable[float]) -> float:
    """Share of scores that are correct (0.0 for none)."""
    scores = list(scores)
    return sum(map(is_correct, scores)) / len(scores) if scores else 0.0
