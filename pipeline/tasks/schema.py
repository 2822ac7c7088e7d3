"""The one on-disk schema of reasoning-task data (Coconut's), checked on every read and write.

A task file is a JSON list of examples; each example is

    {"question": str, "steps": [str, ...], "answer": str, ...task fields}

Task fields (checked when present; which are present tells the task, see `task_of`):

    gsm8k      none
    prosqa     idx_to_symbol [str], edges [[int, int]], root, target, neg_target (node indices)
    countdown  numbers [int], target (int)

Writes go through `write_json_atomic` (temporary name, fsync, rename), so a reader never
sees half a file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.data.shards import write_json_atomic
from pipeline.errors import PipelineError

REQUIRED = {"question": str, "steps": list, "answer": str}
PROSQA_FIELDS = ("idx_to_symbol", "edges", "root", "target", "neg_target")


def task_of(example: dict[str, Any]) -> str:
    """The task an example belongs to: countdown (has `numbers`), prosqa (has `edges`), else gsm8k."""
    if "numbers" in example:
        return "countdown"
    if "edges" in example:
        return "prosqa"
    return "gsm8k"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def example_problems(example: Any) -> list[str]:
    """What is wrong with one example (field: problem); empty when it fits the schema."""
    if not isinstance(example, dict):
        return [f"expected a JSON object, got {type(example).__name__}"]
    out = []
    for key, kind in REQUIRED.items():
        if key not in example:
            out.append(f"{key}: missing")
        elif not isinstance(example[key], kind):
            out.append(f"{key}: expected {kind.__name__}, got {type(example[key]).__name__}")
    steps = example.get("steps")
    if isinstance(steps, list):
        out += [f"steps[{i}]: expected str, got {type(s).__name__}"
                for i, s in enumerate(steps) if not isinstance(s, str)]
    task = task_of(example)
    if task == "countdown":
        nums = example["numbers"]
        if not isinstance(nums, list) or not nums or not all(_is_int(n) for n in nums):
            out.append("numbers: expected a non-empty list of integers")
        if not _is_int(example.get("target")):
            out.append("target: expected an integer")
    elif task == "prosqa":
        out += [f"{key}: missing" for key in PROSQA_FIELDS if key not in example]
        names = example.get("idx_to_symbol")
        if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
            out.append("idx_to_symbol: expected a list of strings")
            return out
        n = len(names)
        edges = example["edges"]
        if not isinstance(edges, list) or not all(
                isinstance(e, list) and len(e) == 2 and all(_is_int(v) and 0 <= v < n for v in e)
                for e in edges):
            out.append(f"edges: expected [[int, int], ...] with node indices in [0, {n})")
        for key in ("root", "target", "neg_target"):
            v = example.get(key)
            if key in example and not (_is_int(v) and 0 <= v < n):
                out.append(f"{key}: expected a node index in [0, {n}), got {v!r}")
    return out


def validate_examples(examples: Any, where: str) -> list[dict[str, Any]]:
    """`examples` itself if it is a list of valid examples, else a `PipelineError` naming the first bad one."""
    if not isinstance(examples, list):
        raise PipelineError(f"{where}: expected a JSON list of examples, got {type(examples).__name__}")
    for i, ex in enumerate(examples):
        problems = example_problems(ex)
        if problems:
            raise PipelineError(f"{where}: example {i}: {'; '.join(problems)} "
                                "(expected {\"question\": str, \"steps\": [str], \"answer\": str, ...})")
    return examples


def load_examples(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a task file; errors name the file, the example's index and the field."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({e})") from e
    return validate_examples(data, str(path))


def save_examples(path: str | Path, examples: Sequence[dict[str, Any]]) -> Path:
    """Check, then write `examples` atomically as a JSON list; returns the path."""
    path = Path(path)
    examples = validate_examples(list(examples), f"writing {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, examples)
    return path
