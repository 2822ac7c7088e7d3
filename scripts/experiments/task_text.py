"""Write a task file's full chain-of-thought text (prompt + steps + answer), one JSON line per
example, for training a task-specific tokenizer (`python -m data_prep tokenizer train`).

    python scripts/experiments/task_text.py runs/tasks/prosqa-train.json runs/tasks/prosqa-train-text.jsonl
"""

from __future__ import annotations

import json
import sys

from pipeline.tasks.format import prompt_text, target_text


def main(src: str, dst: str) -> None:
    with open(src) as f:
        examples = json.load(f)
    with open(dst, "w") as f:
        for e in examples:
            f.write(json.dumps({"text": prompt_text(e) + target_text(e, True)}) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
