"""GSM8K in the task schema, as Coconut preprocesses it.

From `gsm8k/{train,test}.jsonl` (`{"question", "answer"}`): steps are the calculator
annotations `<<48/2=24>>` of the worked answer, in order, without the brackets
("48/2=24"); the answer is the text after "####", commas removed ("1,234" -> "1234").

GSM8K ships no validation split: `valid` is a seeded sample of `n_valid` train problems
and `train` is the rest (both keep the file's order), so the two never share a problem.
The jsonl is read by `pipeline.eval.gsm8k.read_gsm8k` (errors name file and line).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.eval.gsm8k import read_gsm8k
from pipeline.paths import shared_data_dir

SPLITS = ("train", "valid", "test")
N_VALID = 500
_ANNOTATION = re.compile(r"<<(.*?)>>")


def to_example(row: dict[str, str], where: str = "") -> dict[str, Any]:
    """One GSM8K row -> {"question", "steps", "answer"}."""
    solution = row["answer"]
    if "####" not in solution:
        raise PipelineError(f"{where or 'GSM8K row'}: answer has no '#### N' line")
    return {"question": row["question"].strip(),
            "steps": [s.strip() for s in _ANNOTATION.findall(solution)],
            "answer": solution.split("####")[-1].strip().replace(",", "")}


def load_gsm8k(split: str, data_dir: str | Path | None = None, *, n_valid: int = N_VALID,
               seed: int = 0) -> list[dict[str, Any]]:
    """The `train`, `valid` or `test` split; `data_dir` holds train.jsonl and test.jsonl
    (default: the shared data's gsm8k/)."""
    if split not in SPLITS:
        raise PipelineError(f"GSM8K split {split!r}: expected one of {', '.join(SPLITS)}")
    root = Path(data_dir) if data_dir is not None else shared_data_dir() / "gsm8k"
    path = root / ("test.jsonl" if split == "test" else "train.jsonl")
    rows = read_gsm8k(path)
    examples = [to_example(row, f"{path}: problem {i + 1}") for i, row in enumerate(rows)]
    if split == "test":
        return examples
    if not 0 < n_valid < len(examples):
        raise PipelineError(f"GSM8K n_valid={n_valid}: must be between 1 and {len(examples) - 1} "
                            f"(the {len(examples)} problems of {path})")
    valid = set(random.Random(f"gsm8k-valid:{seed}").sample(range(len(examples)), n_valid))
    return [ex for i, ex in enumerate(examples) if (i in valid) == (split == "valid")]
