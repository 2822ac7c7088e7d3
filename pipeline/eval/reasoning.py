"""Reasoning-task accuracy (GSM8K, ProsQA, Countdown): prompt, greedy decode, extract, verify.

    examples, source = task_examples("prosqa")          # the official test set by default
    r = evaluate_reasoning(model, tok, "prosqa", examples, batch_size=16)
    r["accuracy"], r["accuracy_stderr"], r["mean_score"], r["records"]

The prompt is `pipeline.tasks.format.prompt_text(example)` (the question and its newline,
what the fine-tuning tasks train on), tokenized alone; a dual model augments once at its
end. Decoding is greedy and batched (`EvalModel.generate_batch`, longest prompts first;
the result does not depend on the batch size) and a row stops at EOS, at a blank line
(`STOP`: a model that skips EOS tends to start a new question there) or after
`max_new_tokens`. The generated text (before EOS, cut at the first stop string) is scored
by `pipeline.tasks.verify.score`: 1.0 correct, 0.0 wrong, and for Countdown 0.1 for a
well-formed but wrong equation. Accuracy is the share of 1.0 scores; the mean score counts
Countdown's 0.1 too. Both come with the standard error of a mean of per-question values
(for accuracy, the binomial one with n - 1), as the multiple-choice evaluation reports.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import PipelineError
from pipeline.eval.gsm8k import cut_at_stop
from pipeline.eval.models import EvalModel, fit_prompts, generate_all
from pipeline.eval.multiple_choice import _stderr as stderr_of_mean
from pipeline.tasks import schema
from pipeline.tasks.countdown import DEFAULT_N, generate_countdown
from pipeline.tasks.format import TASKS, prompt_text, target_text
from pipeline.tasks.gsm8k import load_gsm8k
from pipeline.tasks.prosqa import load_prosqa
from pipeline.tasks.verify import extract_answer, is_correct, score

log = logging.getLogger(__name__)

STOP = ("\n\n",)
MAX_NEW_TOKENS = 128
"""Default generation budget: ProsQA's longest CoT target is 76 GPT-2 tokens, GSM8K's 75."""
COUNTDOWN_OPERANDS = 3
EVAL_SPLITS: dict[str, tuple[str, Callable[[int], list[dict[str, Any]]]]] = {
    "gsm8k": ("GSM8K test", lambda n: load_gsm8k("test")),
    "prosqa": ("ProsQA official test", lambda n: load_prosqa("test")),
    # the first n of Countdown's eval stream are the first n of the full eval file
    "countdown": (f"Countdown eval ({COUNTDOWN_OPERANDS} operands, seed 0)",
                  lambda n: generate_countdown("eval", n, COUNTDOWN_OPERANDS, seed=0)),
}
"""Task -> (name, `load(n)`: its evaluation split, at least its first n examples) when no file is given."""


def task_examples(task: str, data: str | Path | None = None, limit: int | None = None
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(examples, where they came from): `data` (a task file), else the task's evaluation split:
    GSM8K test, ProsQA's official test, Countdown's eval stream with 3 operands and seed 0."""
    if task not in TASKS:
        raise PipelineError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise PipelineError(f"--limit {limit}: must be >= 1")
    if data is not None:
        examples = schema.load_examples(data)[:limit]
        found = sorted({schema.task_of(ex) for ex in examples})
        if found != [task]:
            raise PipelineError(f"{data}: expected {task} examples, found {', '.join(found) or 'none'}")
        return examples, {"file": str(data)}
    name, load = EVAL_SPLITS[task]
    return load(min(limit or DEFAULT_N["eval"], DEFAULT_N["eval"]))[:limit], {"split": name}


def evaluate_reasoning(model: EvalModel, tok: Tokenizer, task: str, examples: list[dict[str, Any]], *,
                       batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS,
                       progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Accuracy, mean score (each ± stderr) and one record per example (`dump_record` fields).

    `progress(n)` after each batch of n questions. Prompts longer than the model's positions
    allow (with `max_new_tokens` after them) keep their last tokens, with one warning."""
    if batch_size < 1:
        raise PipelineError(f"--batch-size must be >= 1, got {batch_size}")
    if not examples:
        raise PipelineError("no examples to evaluate")
    prompts, cut = fit_prompts(model, tok.encode_batch([prompt_text(ex) for ex in examples]), max_new_tokens)
    if cut:
        log.warning("%d of %d prompts are longer than the %d tokens %s allows before %d new tokens; "
                    "their first tokens are dropped", cut, len(prompts), model.last_site(max_new_tokens) + 1,
                    model.name, max_new_tokens)
    new = generate_all(model, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_id, stop_strings=STOP, decode=tok.decode, progress=progress)
    records = []
    for i, ex in enumerate(examples):
        ids = new[i]
        if tok.eos_id in ids:
            ids = ids[: ids.index(tok.eos_id)]
        records.append(dump_record(task, i, ex, cut_at_stop(tok.decode(ids), STOP)))
    return {"n": len(examples), "truncated_prompts": cut, "max_new_tokens": max_new_tokens,
            **summarize(r["score"] for r in records), "records": records}


ANSWER_SIDE = "'### answer' + EOS (the same tokens for every model: what a latent model's last stage predicts after its latents)"


@torch.no_grad()
def answer_nll(model: EvalModel, tok: Tokenizer, examples: list[dict[str, Any]], *, batch_size: int = 16
               ) -> dict[str, Any]:
    """Teacher-forced NLL of each example's answer side after augmentation at the question's end.

    context = the prompt's ids (`prompt_text`, tokenized alone, as generation uses it);
    targets = `target_text(ex, cot=False)` + EOS ("### answer" and EOS): the same tokens for
    every model, so a CoT model is scored on answering directly. Through the model's own
    scorer (`EvalModel.score_answers`: `score_sites` with one site per row at the prompt's last
    token; a Coconut export thinks first). Returns
    the mean per-example answer NLL (nats/token) ± stderr over examples, and one record per
    example in DESIGN.md §3's per-site dump format: {"context", "targets", "nll"}.
    """
    targets = [t + [tok.eos_id] for t in tok.encode_batch([target_text(ex, cot=False) for ex in examples])]
    # contexts too long for the answer after them keep their last tokens, as generation's prompts do
    contexts, cut = fit_prompts(model, tok.encode_batch([prompt_text(ex) for ex in examples]),
                                max(len(t) for t in targets), flag="the answer side")
    if cut:
        log.warning("answer NLL: %d of %d contexts keep only their last tokens to fit %s", cut, len(contexts),
                    model.name)
    records = []
    for a in range(0, len(examples), batch_size):
        ctx, tgt = contexts[a: a + batch_size], targets[a: a + batch_size]
        nll = model.score_answers(ctx, tgt)
        records += [{"context": c, "targets": t, "nll": n} for c, t, n in zip(ctx, tgt, nll, strict=True)]
    per_example = [sum(r["nll"]) / len(r["nll"]) for r in records]
    return {"answer_nll": sum(per_example) / len(per_example), "answer_nll_stderr": stderr_of_mean(per_example),
            "records": records}


def dump_record(task: str, index: int, example: dict[str, Any], generated: str) -> dict[str, Any]:
    """One line of the per-example dump: question, generated text, extracted answer, gold, score
    (Countdown also keeps `numbers` and `target`, so the dump re-scores on its own)."""
    record = {"index": index, "question": example["question"], "generated": generated,
              "extracted": extract_answer(task, generated), "gold": example["answer"],
              "score": score(task, example, generated)}
    if task == "countdown":
        record |= {"numbers": example["numbers"], "target": example["target"]}
    return record


def summarize(scores: Iterable[float]) -> dict[str, float]:
    """accuracy (share of 1.0) and mean score, each with the standard error of its mean."""
    scores = list(scores)
    hits = [float(is_correct(s)) for s in scores]
    return {"accuracy": sum(hits) / len(hits), "accuracy_stderr": stderr_of_mean(hits),
            "mean_score": sum(scores) / len(scores), "mean_score_stderr": stderr_of_mean(scores)}


def rescore(task: str, records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """`summarize` of dump records re-scored from their generated text alone (a check of a dump)."""
    return summarize(score(task, {"answer": r["gold"], **{k: r[k] for k in ("numbers", "target") if k in r}},
                           r["generated"]) for r in records)


def write_dump(path: str | Path, per_model: dict[str, list[dict[str, Any]]]) -> Path:
    """JSON lines, one per (model, example); `model` names the model when there are several."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for name, records in per_model.items():
            for r in records:
                f.write(json.dumps(({"model": name} if len(per_model) > 1 else {}) | r) + "\n")
    return path


def markdown_table(results: dict[str, Any]) -> str:
    """One row per model: n, accuracy ± stderr, mean score ± stderr (percent)."""
    lines = [f"{results['task']} ({results['source'].get('file') or results['source'].get('split')}), "
             f"greedy, up to {results['max_new_tokens']} new tokens\n",
             "| model | n | accuracy (%) | mean score (%) | answer NLL (nats/token) |", "|---|---|---|---|---|"]
    for name, r in results["results"].items():
        nll = f"{r['answer_nll']:.3f} ± {r['answer_nll_stderr']:.3f}" if "answer_nll" in r else "-"
        lines.append(f"| {name} | {r['n']} | {100 * r['accuracy']:.1f} ± {100 * r['accuracy_stderr']:.1f} "
                     f"| {100 * r['mean_score']:.1f} ± {100 * r['mean_score_stderr']:.1f} | {nll} |")
    return "\n".join(lines) + "\n"
