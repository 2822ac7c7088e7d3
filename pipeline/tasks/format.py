"""The text a model reads and writes for one example (DESIGN.md §5, Coconut's layout).

    CoT:     question \\n step_1 \\n ... step_n \\n ### answer
    no-CoT:  question \\n ### answer

`prompt_text` is the question and its newline (the model's prompt; the loss never covers
it); `target_text` is everything after it, ending right after the answer (the caller adds
EOS). Steps and answers are written as they stand in the example, so GSM8K and ProsQA
match Coconut's files token for token.

Countdown: the example's `answer` holds the bare equation (e.g. "(44 - 19) * 4"), and the
text after "### " wraps it as `<answer>(44 - 19) * 4</answer>`, the block TinyZero's
verifier looks for (`pipeline.tasks.verify`); steps are the solution's intermediate
equations ("44-19=25", "25*4=100").
"""

from __future__ import annotations

from typing import Any

from pipeline.tasks.schema import task_of

TASKS = ("gsm8k", "prosqa", "countdown")
ANSWER_MARK = "### "


def answer_text(example: dict[str, Any]) -> str:
    """What follows "### ": the answer, or for Countdown the equation in an <answer> block."""
    if task_of(example) == "countdown":
        return f"<answer>{example['answer']}</answer>"
    return example["answer"]


def prompt_text(example: dict[str, Any]) -> str:
    """The model's prompt: the question followed by a newline."""
    return example["question"] + "\n"


def target_text(example: dict[str, Any], cot: bool) -> str:
    """What follows the prompt: the steps (one a line) when `cot`, then "### " and the answer."""
    steps = "".join(s + "\n" for s in example["steps"]) if cot else ""
    return steps + ANSWER_MARK + answer_text(example)
