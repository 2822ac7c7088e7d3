"""GSM8K few-shot generation: k-shot prompts from the train split, greedy, exact match.

Prompt (lm-eval's `gsm8k` layout): k solved train problems, then the test question,
each as "Question: {q}\\nAnswer: {a}" separated by a blank line. The model augments
once at the end of the prompt, then decodes greedily; the generation is cut at the
first "Question:" or blank line and its final number compared with the reference's
`#### N` (commas, `$` and trailing zeros after a decimal point ignored).

Questions are decoded in batches of similar prompt length (`batch_size`); a row stops
as soon as its text holds a stop string, EOS or its token budget, which leaves the
cut text exactly what one-question-at-a-time decoding gives.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import PipelineError
from pipeline.eval.models import EvalModel, fit_prompts, generate_all
from pipeline.eval.multiple_choice import read_jsonl_rows, require_fields

log = logging.getLogger(__name__)

STOP = ("Question:", "\n\n")
_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_HASH = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY = re.compile(_NUMBER)


def read_gsm8k(path: str | Path) -> list[dict[str, str]]:
    """Rows {"question", "answer"} of a GSM8K jsonl file; errors name the file and line."""
    path = Path(path)
    rows = []
    for row, where in read_jsonl_rows(path):
        require_fields(row, ["question", "answer"], where)
        rows.append({"question": row["question"], "answer": row["answer"]})
    if not rows:
        raise PipelineError(f"{path}: no problems")
    return rows


def normalize_number(text: str) -> str | None:
    """Canonical form of a number: '1,234' -> '1234', '$5.50' -> '5.5', '-3.0' -> '-3'."""
    s = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final answer: the number after '####' if present, else the last number; None if none."""
    m = _HASH.search(text)
    if m:
        return normalize_number(m.group(1))
    nums = _ANY.findall(text)
    return normalize_number(nums[-1]) if nums else None


def cut_at_stop(text: str, stops: tuple[str, ...] = STOP) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]


def build_prompt(shots: list[dict[str, str]], question: str) -> str:
    parts = [f"Question: {s['question']}\nAnswer: {s['answer']}" for s in shots]
    parts.append(f"Question: {question}\nAnswer:")
    return "\n\n".join(parts)


def evaluate_gsm8k(model: EvalModel, tok: Tokenizer, test: list[dict[str, str]], train: list[dict[str, str]],
                   *, shots: int = 8, seed: int = 0, max_new_tokens: int = 256, batch_size: int = 16,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Exact-match accuracy; per-question records keep prompt size, generation and answers.

    `batch_size` questions decode together (longest prompts first, so memory peaks in the
    first batch); the results do not depend on it. `progress(n)` after each batch.
    """
    if shots > len(train):
        raise PipelineError(f"--shots {shots} exceeds the {len(train)} train problems")
    if batch_size < 1:
        raise PipelineError(f"--batch-size must be >= 1, got {batch_size}")
    stops = STOP  # the same strings end a row's decoding and cut its text
    rng = random.Random(seed)
    texts = [build_prompt(rng.sample(train, shots), row["question"]) for row in test]
    prompts, cut = fit_prompts(model, tok.encode_batch(texts), max_new_tokens)
    if cut:  # the few-shot examples are dropped first: the question is at the end
        log.warning("%d of %d prompts are longer than the %d tokens %s allows before %d new tokens; their first "
                    "tokens are dropped (fewer --shots keeps whole examples)", cut, len(prompts),
                    model.last_site(max_new_tokens) + 1, model.name, max_new_tokens)
    generations = generate_all(model, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     eos_token_id=tok.eos_id, stop_strings=stops, decode=tok.decode,
                                     progress=progress)
    records, correct = [], 0
    for i, row in enumerate(test):
        new = generations[i]
        if tok.eos_id in new:
            new = new[: new.index(tok.eos_id)]
        text = cut_at_stop(tok.decode(new), stops)
        pred, gold = extract_answer(text), extract_answer(row["answer"])
        ok = pred is not None and pred == gold
        correct += ok
        records.append({"index": i, "prompt_tokens": len(prompts[i]), "generation": text, "pred": pred,
                        "gold": gold, "correct": ok})
    return {"n": len(test), "shots": shots, "exact_match": correct / len(test), "records": records}
