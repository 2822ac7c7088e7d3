"""Verifiers: Coconut's exact match for GSM8K/ProsQA, TinyZero's rule for Countdown (hand-written cases)."""

from __future__ import annotations

import pytest

from pipeline.errors import PipelineError
from pipeline.tasks.format import target_text
from pipeline.tasks.verify import accuracy, evaluate_equation, extract_answer, is_correct, score

GSM = {"question": "q", "steps": ["3*2=6"], "answer": "1234"}
PQ = {"question": "q", "steps": [], "answer": "Tom is a lempus.", "idx_to_symbol": ["Tom", "lempus", "Max", "zumpus"],
      "edges": [[0, 1], [2, 3]], "root": 0, "target": 1, "neg_target": 3}
CD = {"question": "q", "steps": [], "answer": "(44 - 19) * 4", "numbers": [44, 19, 4], "target": 100}


@pytest.mark.parametrize("text,want", [
    ("3*2=6\n### 1234", "1234"),
    ("### 1,234", "1234"),                      # commas removed
    ("#### 1,234 ", "1234"),                    # the last '#' counts, whitespace stripped
    ("### 12 # 34", "34"),
    ("### 1234 apples", "1234 apples"),         # trailing text stays (and makes it wrong)
    ("### ", ""),
    ("1234", None),                             # no '#': no answer
    ("", None),
])
def test_gsm8k_extraction(text, want):
    assert extract_answer("gsm8k", text) == want


@pytest.mark.parametrize("text,want", [
    ("3*2=6\n### 1234", 1.0), ("### 1,234", 1.0), ("### 1234\n", 1.0),
    ("### 1234 apples", 0.0), ("### 1235", 0.0), ("1234", 0.0), ("### 1234.0", 0.0),
])
def test_gsm8k_score(text, want):
    assert score("gsm8k", GSM, text) == want


@pytest.mark.parametrize("text,want", [
    ("Tom is a wumpus.\nEvery wumpus is a lempus.\n### Tom is a lempus.", 1.0),
    ("### Tom is a lempus. ", 1.0),
    ("### Tom is a zumpus.", 0.0),
    ("### Tom is a lempus", 0.0),   # the sentence must match exactly, full stop included
    ("Tom is a lempus.", 0.0),
])
def test_prosqa_score(text, want):
    assert score("prosqa", PQ, text) == want


@pytest.mark.parametrize("text,want", [
    ("<answer>(44 - 19) * 4</answer>", 1.0),
    ("44-19=25\n25*4=100\n### <answer>(44-19)*4</answer>", 1.0),
    ("<answer>  4 * (44 - 19)\t</answer>", 1.0),                  # whitespace anywhere
    ("<answer>(44 - 19) * 4 + 0</answer>", 0.1),                  # extra number
    ("<answer>(44 - 19) * 4 * 1</answer>", 0.1),                  # extra number, same value
    ("<answer>(44 - 19) * 4 - 4 + 4</answer>", 0.1),              # operand reused
    ("<answer>(44 - 4) * 4</answer>", 0.1),                       # operand reused, 19 missing
    ("<answer>44 * 4</answer>", 0.1),                             # operand missing
    ("<answer>44 + 19 + 4</answer>", 0.1),                        # right numbers, wrong value
    ("<answer>100</answer>", 0.1),
    ("<answer>(44 - 19) * 4 = 100</answer>", 0.1),                # '=' is not allowed
    ("<answer>(44 - 19) x 4</answer>", 0.1),                      # letters are not allowed
    ("<answer>(44 - 19) ** 4</answer>", 0.1),                     # no power
    ("<answer>(44 - 19) // 4</answer>", 0.1),                     # no floor division
    ("<answer>(44 - 19) * 4.0</answer>", 0.1),                    # no decimals
    ("<answer>(44 - 19) * (4</answer>", 0.1),                     # unbalanced
    ("<answer>(44 - 19)(4)</answer>", 0.1),                       # no implicit product
    ("<answer></answer>", 0.1),
    ("<answer>1</answer> then <answer>(44 - 19) * 4</answer>", 1.0),   # the last block counts
    ("<answer>(44 - 19) * 4</answer> then <answer>1</answer>", 0.1),
    ("### (44 - 19) * 4", 0.0),                                   # no answer block
    ("<answer>(44 - 19) * 4", 0.0),
    ("<answer>(44 - 19)\n* 4</answer>", 0.0),                     # a block is one line
    ("", 0.0),
])
def test_countdown_score(text, want):
    assert score("countdown", CD, text) == want


@pytest.mark.parametrize("numbers,target,equation,want", [
    ([7, 2, 2], 7, "7 / 2 * 2", 1.0),                    # a fractional intermediate is fine
    ([3, 7], 1, "7 / 3", 0.1),                           # a fractional value is not the target
    ([1, 3, 4, 6], 24, "6 / (1 - 3 / 4)", 1.0),
    ([2, 3, 5], 0, "5 - (2 + 3)", 1.0),                  # target 0
    ([5, 5], 0, "5 / (5 - 5)", 0.1),                     # division by zero: malformed
    ([3, 5], 2, "-3 + 5", 1.0),                          # a unary sign, as TinyZero's eval allows
    ([3, 5], 8, "5 - -3", 1.0),
    ([50, 50, 50], 3, "50 / 50 + 50 / 50", 0.1),         # one 50 too many
    ([50, 50, 50], 3, "(50 + 50 + 50) / 50", 0.1),       # reused
    ([1, 50, 50], 100, "50 + 50 * 1", 1.0),              # repeated operands: a multiset
])
def test_countdown_edge_cases(numbers, target, equation, want):
    ex = {"question": "q", "steps": [], "answer": equation, "numbers": numbers, "target": target}
    assert score("countdown", ex, f"<answer>{equation}</answer>") == want


def test_countdown_value_within_1e_5_of_the_target_counts():
    ex = {"question": "q", "steps": [], "answer": "", "numbers": [1, 100000], "target": 0}
    assert score("countdown", ex, "<answer>1 / 100000</answer>") == 0.1   # exactly 1e-5 away
    ex = {**ex, "numbers": [1, 100001]}
    assert score("countdown", ex, "<answer>1 / 100001</answer>") == 1.0   # just under 1e-5


def test_evaluate_equation_is_exact_and_safe():
    assert evaluate_equation("6 / (1 - 3 / 4)") == (24, [6, 1, 3, 4])
    for bad in ("__import__('os')", "1 if 1 else 2", "abs(-3)", "1_000", "(" * 300 + "1" + ")" * 300, "9" * 2000):
        assert evaluate_equation(bad) is None


def test_the_reference_target_text_scores_1_for_every_task():
    for task, ex in (("gsm8k", GSM), ("prosqa", PQ), ("countdown", CD)):
        assert score(task, ex, target_text(ex, cot=True)) == 1.0
        assert score(task, ex, target_text(ex, cot=False)) == 1.0


def test_countdown_extraction_and_accuracy():
    assert extract_answer("countdown", "<answer> 1 + 2 </answer>x<answer>3</answer>") == "3"
    assert extract_answer("countdown", "no block") is None
    assert [is_correct(s) for s in (1.0, 0.1, 0.0)] == [True, False, False]
    assert accuracy([1.0, 0.1, 0.0, 1.0]) == 0.5 and accuracy([]) == 0.0


def test_unknown_task():
    with pytest.raises(PipelineError, match="unknown task 'math'"):
        score("math", GSM, "### 1")
