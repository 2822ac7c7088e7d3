"""Zero-shot multiple choice by log-likelihood, as lm-evaluation-harness scores it.

Tasks are read from local files in their public release formats (`TASK_FORMATS`):
each question becomes one (context, continuation) request per choice, encoded as the
harness does (context and context+continuation encoded whole, the continuation = the
extra tokens; trailing spaces of the context move to the continuation). The model
augments once at the end of the context (site p = last context token) and scores the
continuation's tokens: `score_sites` with the site at the context end and k = the
continuation length. A plain checkpoint scores with the Base alone.

acc = argmax of the summed log-likelihood; acc_norm = argmax of log-likelihood divided
by the choice's length in characters (lm-eval's definition). Winogrande varies the
context, not the continuation, so it has acc only (as in lm-eval).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import PipelineError
from pipeline.eval.models import EvalModel

TASK_FORMATS = {
    "hellaswag": "jsonl (rowanz/hellaswag hellaswag_val.jsonl, or the HF Rowan/hellaswag rows): "
                 "activity_label, ctx_a, ctx_b, endings [4], label",
    "arc_easy": "jsonl (allenai ARC-V1 ARC-Easy-Test.jsonl): question {stem, choices [{text, label}]}, "
                "answerKey; or HF rows: question (str), choices {text [], label []}, answerKey",
    "arc_challenge": "as arc_easy (ARC-Challenge-Test.jsonl)",
    "piqa": "jsonl (ybisk/piqa valid.jsonl): goal, sol1, sol2, and label (0/1) in the row or "
            "one per line in the sibling <name>-labels.lst",
    "siqa": "jsonl (socialiqa dev.jsonl): context, question, answerA, answerB, answerC, and label "
            "(1/2/3) in the row or one per line in the sibling <name>-labels.lst",
    "winogrande": "jsonl (winogrande_1.1 dev.jsonl): sentence (with one '_'), option1, option2, "
                  "answer ('1'/'2')",
}


@dataclasses.dataclass
class MCDoc:
    """One question: a context per choice (usually all equal) and the continuations."""

    contexts: list[str]
    continuations: list[str]
    """What is scored, target delimiter included (lm-eval: ' ' + choice)."""
    norm_lengths: list[int] | None
    """Characters per choice for acc_norm (None: no acc_norm for this task)."""
    gold: int


# ---------------------------------------------------------------------- readers
def require_fields(row: dict[str, Any], keys: list[str], where: str) -> None:
    for key in keys:
        if key not in row:
            raise PipelineError(f"{where}: missing field {key!r} (expected: {', '.join(keys)})")


def read_jsonl_rows(path: Path) -> list[tuple[dict[str, Any], str]]:
    if not path.is_file():
        raise PipelineError(f"{path}: no such file")
    rows = []
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}: not valid JSON ({e})") from e
        return [(row, f"{path}: item {i}") for i, row in enumerate(data)]
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise PipelineError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append((row, f"{path}:{n}"))
    return rows


def _labels_beside(path: Path, n_rows: int) -> list[str] | None:
    lst = path.with_name(path.stem + "-labels.lst")
    if not lst.is_file():
        return None
    labels = [x.strip() for x in lst.read_text().splitlines() if x.strip()]
    if len(labels) != n_rows:
        raise PipelineError(f"{lst}: {len(labels)} labels for {n_rows} rows of {path}")
    return labels


def _hellaswag_pre(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _index(value: Any, n: int, where: str, field: str, base: int = 0) -> int:
    try:
        i = int(value) - base
    except (TypeError, ValueError):
        raise PipelineError(f"{where}: field {field!r} = {value!r} is not an answer index") from None
    if not 0 <= i < n:
        raise PipelineError(f"{where}: field {field!r} = {value!r} is out of range for {n} choices")
    return i


def _mc(context: str, choices: list[str], gold: int) -> MCDoc:
    return MCDoc([context] * len(choices), [" " + c for c in choices], [len(c) for c in choices], gold)


def read_task(task: str, path: str | Path) -> list[MCDoc]:
    """Questions of `task` from its released file; errors name the file, line and field."""
    if task not in TASK_FORMATS:
        raise PipelineError(f"unknown task {task!r}; known: {', '.join(TASK_FORMATS)}")
    path = Path(path)
    rows = read_jsonl_rows(path)
    docs = []
    labels = _labels_beside(path, len(rows)) if task in ("piqa", "siqa") else None
    for i, (row, where) in enumerate(rows):
        if task == "hellaswag":
            require_fields(row, ["activity_label", "ctx_a", "ctx_b", "endings", "label"], where)
            ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
            choices = [_hellaswag_pre(e) for e in row["endings"]]
            docs.append(_mc(_hellaswag_pre(row["activity_label"] + ": " + ctx), choices,
                            _index(row["label"], len(choices), where, "label")))
        elif task in ("arc_easy", "arc_challenge"):
            require_fields(row, ["question", "answerKey"], where)
            q = row["question"]
            if isinstance(q, dict):  # the allenai release
                require_fields(q, ["stem", "choices"], where + " question")
                stem, texts, keys = q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
            else:  # the Hugging Face rows
                require_fields(row, ["choices"], where)
                stem, texts, keys = q, row["choices"]["text"], row["choices"]["label"]
            if row["answerKey"] not in keys:
                raise PipelineError(f"{where}: answerKey {row['answerKey']!r} is not a choice label {keys}")
            docs.append(_mc(f"Question: {stem}\nAnswer:", texts, keys.index(row["answerKey"])))
        elif task == "piqa":
            require_fields(row, ["goal", "sol1", "sol2"] + ([] if labels else ["label"]), where)
            label = labels[i] if labels else row["label"]
            docs.append(_mc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]],
                            _index(label, 2, where, "label")))
        elif task == "siqa":
            require_fields(row, ["context", "question", "answerA", "answerB", "answerC"] + ([] if labels else ["label"]),
                     where)
            label = labels[i] if labels else row["label"]
            docs.append(_mc(f"Q: {row['context']} {row['question']}\nA:",
                            [row["answerA"], row["answerB"], row["answerC"]], _index(label, 3, where, "label", 1)))
        else:  # winogrande: the option completes the context; the rest of the sentence is scored
            require_fields(row, ["sentence", "option1", "option2", "answer"], where)
            s = row["sentence"]
            if "_" not in s:
                raise PipelineError(f"{where}: field 'sentence' has no '_' blank")
            cut = s.index("_")
            rest = " " + s[cut + 1 :].strip()
            docs.append(MCDoc([s[:cut] + row["option1"], s[:cut] + row["option2"]], [rest, rest], None,
                              _index(row["answer"], 2, where, "answer", 1)))
    if not docs:
        raise PipelineError(f"{path}: no questions")
    return docs


# ---------------------------------------------------------------------- scoring
def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces move to the continuation; continuation tokens are
    those of encode(context + continuation) after the first len(encode(context))."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole, ctx = tok.encode_batch([context + continuation, context])
    if not context:
        return [tok.eos_id], whole
    return ctx, whole[len(ctx):]


def score_requests(model: EvalModel, requests: list[tuple[list[int], list[int]]], *,
                   batch_size: int = 16, pad_id: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each continuation after its context.

    The context is cut from the left where the model's positions require (as lm-eval
    truncates); rows are sorted by length and right-padded (all passes are causal).
    `progress(done, total)` is called after each batch with the number of requests scored.
    """
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    prepared = []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise PipelineError(f"request {i}: empty continuation")
        keep = model.last_site(len(cont)) + 1  # context tokens that fit before the continuation
        if keep < 1:
            raise PipelineError(f"request {i}: continuation of {len(cont)} tokens does not fit the "
                                f"model's {model.max_positions} positions")
        ctx = ctx[-keep:]
        prepared.append((i, ctx, cont))
    prepared.sort(key=lambda r: -(len(r[1]) + len(r[2])))
    done = 0
    for batch in _batches(model, prepared, batch_size):
        k = max(len(c) for _, _, c in batch)
        seq = max(len(x) for _, x, _ in batch) + k
        ids = torch.full((len(batch), seq), pad_id, dtype=torch.long)
        sites = torch.zeros((len(batch), 1), dtype=torch.long)
        for j, (_, ctx, cont) in enumerate(batch):
            ids[j, : len(ctx) + len(cont)] = torch.tensor(ctx + cont)
            sites[j, 0] = len(ctx) - 1
        nll, greedy = model.site_logprobs(ids, sites, k)
        for j, (i, _, cont) in enumerate(batch):
            n = len(cont)
            out[i] = (-float(nll[j, 0, :n].double().sum()), bool(greedy[j, 0, :n].all()))
        done += len(batch)
        if progress is not None:
            progress(done, len(requests))
    return out  # type: ignore[return-value]


def _batches(model: EvalModel, prepared: list, batch_size: int) -> list[list]:
    """Consecutive groups of at most `batch_size` whose padded row still fits the positions
    (every row is padded to the longest context + the longest continuation)."""
    batches: list[list] = []
    for req in prepared:
        cur = batches[-1] if batches else None
        if cur is not None and len(cur) < batch_size:
            k = max(len(req[2]), *(len(c) for _, _, c in cur))
            longest = max(len(req[1]), *(len(x) for _, x, _ in cur))
            if longest - 1 <= model.last_site(k):
                cur.append(req)
                continue
        batches.append([req])
    return batches


def evaluate_docs(model: EvalModel, tok: Tokenizer, docs: list[MCDoc], *, batch_size: int = 16,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """acc, acc_norm (where defined) and their standard errors over `docs`.

    `progress(done, total)` counts requests (one per choice), as `score_requests`.
    """
    requests, owner = [], []
    for q, doc in enumerate(docs):
        for ctx, cont in zip(doc.contexts, doc.continuations, strict=True):
            requests.append(encode_pair(tok, ctx, cont))
            owner.append(q)
    scores = score_requests(model, requests, batch_size=batch_size, pad_id=tok.eos_id, progress=progress)
    per_doc: list[list[float]] = [[] for _ in docs]
    for q, (ll, _) in zip(owner, scores, strict=True):
        per_doc[q].append(ll)
    acc, acc_norm = [], []
    for doc, lls in zip(docs, per_doc, strict=True):
        acc.append(float(_argmax(lls) == doc.gold))
        if doc.norm_lengths is not None:
            acc_norm.append(float(_argmax([ll / n for ll, n in zip(lls, doc.norm_lengths, strict=True)]) == doc.gold))
    result = {"n": len(docs), "acc": _mean(acc), "acc_stderr": _stderr(acc)}
    if len(acc_norm) == len(docs):
        result |= {"acc_norm": _mean(acc_norm), "acc_norm_stderr": _stderr(acc_norm)}
    result["loglikelihoods"] = per_doc
    return result


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first of ties, as numpy


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _stderr(xs: list[float]) -> float:
    """Standard error of the mean (lm-eval's sample stderr)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)
