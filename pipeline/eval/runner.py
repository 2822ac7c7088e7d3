"""The evaluation subcommands as functions: load models, run, write JSON/markdown/plots/MLflow.

`launchers/evaluate.py` parses arguments and calls these; tests call them directly.
`bar(total, desc)` makes a progress display with `update(done)` and `close()` (the
launcher's `pipeline.progress.Progress`; nothing by default): library code shows nothing itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.eval import diagnostics as dg
from pipeline.eval import gsm8k as g8
from pipeline.eval import multiple_choice as mc
from pipeline.eval import ppl as pk
from pipeline.eval import reasoning as rs
from pipeline.eval.models import EvalModel, load_eval_model, resolve_tokenizer, unique_names
from pipeline.eval.plots import plot_cross_capture, plot_ppl_at_k, plot_silhouettes
from pipeline.eval.report import log_mlflow, write_results

Bar = Callable[[int, str], Any]
OnProgress = Callable[[int, int], None]
"""`progress(done, total)`, what the scoring loops call after each batch."""


class _NoBar:
    def update(self, done: int, **postfix: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _no_bar(total: int, desc: str) -> Any:
    return _NoBar()


@contextlib.contextmanager
def _shown(bar: Bar, total: int, desc: str) -> Iterator[OnProgress]:
    """A `progress(done, total)` callback that moves `bar(total, desc)`, closed at the end."""
    shown = bar(total, desc)
    try:
        yield lambda done, _total: shown.update(done)
    finally:
        shown.close()


def _from_increments(progress: OnProgress, total: int) -> Callable[[int], None]:
    """Adapt a loop that reports increments (gsm8k: one per question) to `progress(done, total)`."""
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    return step


def load_models(paths: list[str], *, device: str, dtype: str = "float32") -> list[EvalModel]:
    if not paths:
        raise PipelineError("give at least one --model DIR")
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    models = [load_eval_model(p, device=device, dtype=dt) for p in paths]
    unique_names(models)
    return models


def _data_of(models: list[EvalModel], data: str | None) -> str:
    """`--data`, else the one shard directory every model's pipeline.json records."""
    if data is not None:
        return data
    paths = {m.data_path() for m in models} - {None}
    if not paths:
        raise PipelineError("no --data given and no model's pipeline.json records run_config.data.path")
    if len(paths) > 1:
        raise PipelineError(f"the models trained on different data ({', '.join(sorted(paths))}); pass --data")
    return paths.pop()


def _manifest_for(models: list[EvalModel], data: str) -> Any:
    """The shard directory's manifest, once its token ids are known to fit every model."""
    from pipeline.data.shards import load_manifest

    manifest = load_manifest(data)
    for m in models:
        if manifest.vocab_size > m.dual.base.config.vocab_size:
            raise PipelineError(f"{data}: vocab {manifest.vocab_size} exceeds model {m.name}'s "
                                f"{m.dual.base.config.vocab_size}")
    return manifest


def run_ppl_at_k(models: list[EvalModel], *, out: str | Path, data: str | None = None,
                 cfg: pk.PplConfig | None = None, limit: int | None = None, dump: str | None = None,
                 mlflow_run: str | None = None, mlflow_experiment: str | None = None,
                 bar: Bar = _no_bar) -> dict[str, Any]:
    """ppl of the k-th token after augmentation for each model, on the same sites."""
    cfg = cfg or pk.PplConfig()
    data = _data_of(models, data)
    docs = pk.load_documents(data, limit=limit)
    manifest = _manifest_for(models, data)
    for m in models:
        if m.last_site(cfg.k) < cfg.min_context - 1:
            raise PipelineError(f"--k {cfg.k} does not fit {m.name}'s context of {m.max_positions} positions "
                                "(a site, its latent slots and the k scored tokens together); lower --k")
    windows = [m.trained_window for m in models if m.trained_window]
    window = cfg.window if cfg.window is not None else min(windows, default=0)
    last = min(m.last_site(cfg.k) for m in models)
    if window:
        if window - 1 - cfg.k < cfg.min_context - 1:
            raise PipelineError(f"--k {cfg.k} leaves no site inside the {window}-token training window; lower --k "
                                "or widen it with --window")
        last = min(last, window - 1 - cfg.k)
    plan = pk.plan_sites(docs, cfg, last)
    summaries, dumps = [], []
    for m in models:
        with _shown(bar, len(plan), f"{m.name} augmented" if m.augments else m.name) as progress:
            nll = pk.score_plan(m, docs, plan, cfg, augment=True, pad_id=manifest.eos_id, progress=progress)
        nll_base = nll
        if m.augments:
            with _shown(bar, len(plan), f"{m.name} base alone") as progress:
                nll_base = pk.score_plan(m, docs, plan, cfg, augment=False, pad_id=manifest.eos_id,
                                         progress=progress)
        summaries.append(pk.summarize(m, nll, nll_base, cfg))
        dumps.append((m.name, nll, nll_base if m.augments else None))
    results = {
        "task": "ppl_at_k", "k": cfg.k, "data": str(data), "n_documents": len(docs),
        "n_sites": len(plan), "sites_per_doc": cfg.sites_per_doc, "seed": cfg.seed, "window": window,
        "bootstrap": pk.bootstrap_settings(cfg), "models": summaries,
    }
    files = write_results(results, out, "ppl_at_k", pk.markdown_table(results))
    files.append(plot_ppl_at_k(results, Path(out) / "ppl_at_k.png"))
    if dump:
        Path(dump).parent.mkdir(parents=True, exist_ok=True)
        with open(dump, "w") as f:
            for name, nll, nll_base in dumps:
                for line in pk.dump_lines(docs, plan, cfg.k, nll, nll_base, name if len(models) > 1 else None):
                    f.write(line + "\n")
    metrics = [(f"ppl_at_k/{s['name']}/{key}", v, k + 1)
               for s in summaries for key in ("ppl", "ppl_base", "reduction_pct") for k, v in enumerate(s[key])]
    log_mlflow(metrics, files, run_id=mlflow_run, experiment=mlflow_experiment,
               params={"eval.ppl_at_k.k": cfg.k, "eval.ppl_at_k.data": data, "eval.ppl_at_k.sites": len(plan)})
    results["files"] = [str(f) for f in files]
    return results


def run_mc(models: list[EvalModel], tasks: dict[str, str], *, out: str | Path, tokenizer: str | None = None,
           limit: int | None = None, batch_size: int = 16, mlflow_run: str | None = None,
           mlflow_experiment: str | None = None, bar: Bar = _no_bar) -> dict[str, Any]:
    """acc / acc_norm of every model on every task (`tasks`: name -> local file)."""
    if not tasks:
        raise PipelineError("give at least one task file, e.g. --task hellaswag=path/hellaswag_val.jsonl")
    tok = resolve_tokenizer(models, tokenizer)
    questions = {t: mc.read_task(t, p)[:limit] for t, p in tasks.items()}
    table: dict[str, dict[str, Any]] = {}
    for m in models:
        for t, docs in questions.items():
            with _shown(bar, sum(len(d.contexts) for d in docs), f"{m.name} {t}") as progress:
                r = mc.evaluate_docs(m, tok, docs, batch_size=batch_size, progress=progress)
            r.pop("loglikelihoods")
            table.setdefault(m.name, {"model": m.describe()})[t] = r
    results = {"task": "multiple_choice", "files": dict(tasks), "limit": limit, "results": table}
    head = ["model"] + [f"{t} {metric}" for t in tasks for metric in ("acc", "acc_norm")] + ["mean acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in table.items():
        cells = [name]
        for t in tasks:
            cells += [f"{100 * row[t]['acc']:.1f}",
                      f"{100 * row[t]['acc_norm']:.1f}" if "acc_norm" in row[t] else "–"]
        cells.append(f"{100 * sum(row[t]['acc'] for t in tasks) / len(tasks):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    files = write_results(results, out, "multiple_choice", "\n".join(lines) + "\n")
    metrics = [(f"mc/{name}/{t}/{k}", row[t][k], None) for name, row in table.items() for t in tasks
               for k in ("acc", "acc_norm") if k in row[t]]
    log_mlflow(metrics, files, run_id=mlflow_run, experiment=mlflow_experiment)
    return results


def run_gsm8k(models: list[EvalModel], *, out: str | Path, test_file: str, train_file: str,
              tokenizer: str | None = None, shots: int = 8, seed: int = 0, limit: int | None = None,
              max_new_tokens: int = 256, mlflow_run: str | None = None, mlflow_experiment: str | None = None,
              bar: Bar = _no_bar, batch_size: int = 16) -> dict[str, Any]:
    tok = resolve_tokenizer(models, tokenizer)
    test, train = g8.read_gsm8k(test_file)[:limit], g8.read_gsm8k(train_file)
    table = {}
    for m in models:
        with _shown(bar, len(test), f"{m.name} gsm8k") as progress:
            table[m.name] = {"model": m.describe(), **g8.evaluate_gsm8k(
                m, tok, test, train, shots=shots, seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size,
                progress=_from_increments(progress, len(test)))}
    results = {"task": "gsm8k", "test": test_file, "train": train_file, "shots": shots, "results": table}
    lines = ["| model | n | shots | exact match |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['n']} | {shots} | {100 * r['exact_match']:.2f} |" for n, r in table.items()]
    files = write_results(results, out, "gsm8k", "\n".join(lines) + "\n")
    log_mlflow([(f"gsm8k/{n}/exact_match", r["exact_match"], None) for n, r in table.items()], files,
               run_id=mlflow_run, experiment=mlflow_experiment)
    return results


def run_reasoning(models: list[EvalModel], *, task: str, out: str | Path, data: str | None = None,
                  tokenizer: str | None = None, limit: int | None = None, batch_size: int = 16,
                  max_new_tokens: int = rs.MAX_NEW_TOKENS, dump: str | None = None, dump_nll: str | None = None,
                  mlflow_run: str | None = None, mlflow_experiment: str | None = None,
                  bar: Bar = _no_bar) -> dict[str, Any]:
    """Accuracy, mean score and teacher-forced answer NLL of each model on one reasoning task
    (`pipeline.eval.reasoning`): `data` (a task file) or the task's evaluation split;
    OUT/reasoning.{json,md}; with `dump`, one JSON line per (model, example); with `dump_nll`,
    the per-example answer NLL in the per-site dump format."""
    tok = resolve_tokenizer(models, tokenizer)
    examples, source = rs.task_examples(task, data, limit)
    table, records, nll_records = {}, {}, {}
    for m in models:
        with _shown(bar, len(examples), f"{m.name} {task}") as progress:
            r = rs.evaluate_reasoning(m, tok, task, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                      progress=_from_increments(progress, len(examples)))
        records[m.name] = r.pop("records")
        nll = rs.answer_nll(m, tok, examples, batch_size=batch_size)
        nll_records[m.name] = nll.pop("records")
        table[m.name] = {"model": m.describe(), **r, **nll}
    results = {"task": task, "source": source, "n": len(examples), "max_new_tokens": max_new_tokens,
               "stop": list(rs.STOP), "answer_side": rs.ANSWER_SIDE, "results": table}
    files = write_results(results, out, "reasoning", rs.markdown_table(results))
    if dump:
        rs.write_dump(dump, records)
    if dump_nll:
        rs.write_dump(dump_nll, nll_records)
    metrics = [(f"reasoning/{task}/{name}/{key}", r[key], None) for name, r in table.items()
               for key in ("accuracy", "accuracy_stderr", "mean_score", "answer_nll", "answer_nll_stderr")]
    log_mlflow(metrics, files, run_id=mlflow_run, experiment=mlflow_experiment,
               params={"eval.reasoning.task": task, "eval.reasoning.source": source, "eval.reasoning.n": len(examples)})
    results["files"] = [str(f) for f in files]
    return results


Rows = list[tuple[np.ndarray, np.ndarray]]


def _task_rows(models: list[EvalModel], task: str, task_file: str, tokenizer: str | None, limit: int | None,
               last: int) -> tuple[Rows, int, np.ndarray, dict[str, Any]]:
    """One row per example (its prompt, the site at the prompt's last token); pad id; sites; source."""
    from pipeline.tasks.format import TASKS, prompt_text
    from pipeline.tasks.schema import load_examples, task_of

    if task not in TASKS:
        raise PipelineError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    examples = load_examples(task_file)[:limit]
    found = sorted({task_of(ex) for ex in examples})
    if found != [task]:
        raise PipelineError(f"{task_file}: expected {task} examples, found {', '.join(found) or 'none'}")
    tok = resolve_tokenizer(models, tokenizer)
    rows = dg.prompt_rows(tok.encode_batch([prompt_text(ex) for ex in examples]), last)
    sites = np.array([[i, int(s[0])] for i, (_, s) in enumerate(rows)])
    source = {"kind": "task", "task": task, "file": str(task_file), "n_examples": len(examples),
              "site": "last token of the tokenized prompt (question + newline)"}
    return rows, tok.eos_id, sites, source


def _shard_rows(models: list[EvalModel], data: str | None, cfg: dg.DiagnosticsConfig, limit: int | None,
                k: int, last: int) -> tuple[Rows, int, np.ndarray, dict[str, Any]]:
    """Seeded sites per held-out document, one row per document; pad id; sites; source."""
    data = _data_of(models, data)
    manifest = _manifest_for(models, data)
    docs = pk.load_documents(data, limit=limit)
    plan = dg.plan_pretraining_sites(docs, cfg.sites, k, last, cfg.seed)
    source = {"kind": "pretraining", "data": str(data), "split": "validation", "n_documents": len(docs),
              "site": f"sampled per document (seed {cfg.seed}) with its {k} next tokens inside the document"}
    return dg.plan_rows(docs, plan), manifest.eos_id, np.stack([plan.doc, plan.site], axis=1), source


def run_diagnostics(models: list[EvalModel], *, out: str | Path, data: str | None = None, task: str | None = None,
                    task_file: str | None = None, tokenizer: str | None = None, limit: int | None = None,
                    sites: int = 256, tau: float = 0.97, seed: int = 0, batch_size: int = 8,
                    max_points: int = 10_000, dump_latents: str | None = None, mlflow_run: str | None = None,
                    mlflow_experiment: str | None = None, bar: Bar = _no_bar) -> dict[str, Any]:
    """Latent cross-capture H, H_off and silhouettes of each model (`pipeline.eval.diagnostics`),
    all on the same sites: seeded per document of held-out shards (`data`, default the models'
    training data), or one per example of a task file at the question's end (`task`, `task_file`).
    `sites`, `tau`, `seed`, `batch_size`, `max_points`: `diagnostics.DiagnosticsConfig`.

    Writes OUT/diagnostics.{json,md}, OUT/cross_capture.png, OUT/silhouette.png, and with
    `dump_latents` an .npz of the collected latents (`diagnostics.load_latents` reads it).
    """
    cfg = dg.DiagnosticsConfig(tau=tau, sites=sites, seed=seed, batch_size=batch_size, max_points=max_points)
    for m in models:
        dg.check_latent_model(m)
    if (task is None) != (task_file is None):
        raise PipelineError("give --task and --task-file together (e.g. --task prosqa --task-file test.json)")
    if task is not None and data is not None:
        raise PipelineError("give either --data (pretraining shards) or --task with --task-file, not both")
    k, last = dg.last_site(models)
    rows, pad_id, at, source = (_task_rows(models, task, task_file, tokenizer, limit, last) if task
                                else _shard_rows(models, data, cfg, limit, k, last))
    latents, summaries = {}, []
    for m in models:
        with _shown(bar, len(at), f"{m.name} latents") as progress:
            latents[m.name] = dg.collect_latents(m, rows, batch_size=cfg.batch_size, pad_id=pad_id,
                                                 progress=progress)
        summaries.append(dg.summarize(m, latents[m.name], cfg))
    results = {"task": "latent_diagnostics", "source": source, "n_sites": len(at), "tau": cfg.tau,
               "seed": cfg.seed, "centring": dg.CENTRING, "paper_000": dg.PAPER_000, "models": summaries}
    files = write_results(results, out, "diagnostics", dg.markdown_table(results))
    files.append(plot_cross_capture(results, Path(out) / "cross_capture.png"))
    files.append(plot_silhouettes(results, Path(out) / "silhouette.png"))
    if dump_latents:
        dg.save_latents(dump_latents, latents, at)
    metrics = [(f"diagnostics/{s['name']}/{key}", s[key], None) for s in summaries
               for key in ("H_off", "silhouette") if s[key] is not None]
    metrics += [(f"diagnostics/{s['name']}/silhouette_per_latent", v, i + 1) for s in summaries
                for i, v in enumerate(s["silhouette_per_latent"] or [])]
    log_mlflow(metrics, files, run_id=mlflow_run, experiment=mlflow_experiment,
               params={"eval.diagnostics.source": source.get("data") or source.get("file"),
                       "eval.diagnostics.sites": len(at), "eval.diagnostics.tau": cfg.tau})
    results["files"] = [str(f) for f in files]
    return results


def run_probe(models: list[EvalModel], *, out: str | Path, data: str | None = None, sequences: int = 64,
              seed: int = 0, mlflow_run: str | None = None, mlflow_experiment: str | None = None,
              bar: Bar = _no_bar) -> dict[str, Any]:
    """`pipeline.eval.probe` for each model on the first held-out sequences of its run's length."""
    from pipeline.eval import probe as pr
    from pipeline.train.data import PackedSequences

    data = _data_of(models, data)
    manifest = _manifest_for(models, data)
    table, text = {}, []
    for m in models:
        seq_len = int(((m.meta or {}).get("run_config") or {}).get("data", {}).get("seq_len", 64))
        val = PackedSequences(manifest, "validation", seq_len)
        x = val.batch(list(range(min(sequences, len(val))))).to(m.device)
        with _shown(bar, 1, f"{m.name} probe") as progress:
            table[m.name] = pr.probe(m.dual.float(), x, seed=seed)
            progress(1, 1)
        text.append(f"## {m.name}\n\n{pr.markdown(table[m.name])}")
    results = {"task": "probe", "data": data, "sequences": sequences, "seed": seed, "models": table}
    files = write_results(results, out, "probe", "\n".join(text))
    metrics = [(f"probe/{name}/{row}", value, None) for name, r in table.items()
               for row, value in r["delta_vs_base"].items()]
    log_mlflow([(k.replace(" ", "_").replace(":", ""), v, s) for k, v, s in metrics], files,
               run_id=mlflow_run, experiment=mlflow_experiment)
    return results
