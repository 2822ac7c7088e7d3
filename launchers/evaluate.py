"""Evaluate exported model directories (or plain HF checkpoints, as baselines).

    python launchers/evaluate.py ppl-at-k --model runs/liu/export --model runs/cp/export --k 32 \
        [--data DATA_DIR] [--every-position | --sites-per-doc 8] [--dump sites.jsonl] [--bootstrap 1000] --out eval/
    python launchers/evaluate.py mc --model DIR --task hellaswag=hellaswag_val.jsonl \
        --task arc_easy=ARC-Easy-Test.jsonl [--tokenizer TOK] --out eval/
    python launchers/evaluate.py gsm8k --model DIR --shots 8 --limit 100 --out eval/
    python launchers/evaluate.py diagnostics --model DIR [--data DIR | --task T --task-file F] --out eval/
    python launchers/evaluate.py probe --model DIR [--sequences 64] --out eval/   # why latents (don't) help
    python launchers/evaluate.py reasoning --task prosqa --model DIR [--data F.json] [--dump F.jsonl] [--dump-nll F.jsonl] --out eval/
    python launchers/evaluate.py ltm-ppl --model runs/ltm/export [--model runs/cp/export] [--data SHARDS] \
        --steps 0,4,16 [--sequences 64] --out eval/       # ELBO ppl bound of an LTM vs a plain LM's ppl
    python launchers/evaluate.py ltm-generate --model runs/ltm/export --prompt "def main" [--temperature 0.8]

Results go to OUT/<task>.json and .md (plus PNGs for ppl-at-k and diagnostics), and to MLflow
with --mlflow-run ID (an existing run) or --mlflow-experiment NAME (a new run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.paths import shared_data_dir  # noqa: E402
from pipeline.tasks.format import TASKS  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", action="append", required=True, help="model directory (repeatable)")
    common.add_argument("--limit", type=int, help="first N documents / questions only")
    common.add_argument("--out", default="eval", help="output directory (default: eval)")
    common.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    common.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    common.add_argument("--batch-size", type=int, default=None)
    common.add_argument("--mlflow-run", help="log into this existing MLflow run id")
    common.add_argument("--mlflow-experiment", help="log into a new run of this MLflow experiment")
    pk = sub.add_parser("ppl-at-k", parents=[common], help="ppl of the k-th token after augmentation")
    pk.add_argument("--data", help="data-prep dir (default: run_config.data.path of pipeline.json)")
    pk.add_argument("--k", type=int, default=32)
    pk.add_argument("--sites-per-doc", type=int, default=8)
    pk.add_argument("--every-position", action="store_true", help="every allowed site (as paper 002)")
    pk.add_argument("--window", type=int, default=None, metavar="N",
                    help="keep each site's context and k scored tokens in the first N tokens of a document "
                         "(default: the shortest run_config.data.seq_len the models trained on; 0: no bound)")
    pk.add_argument("--sites-per-row", type=int, default=16)
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--dump", help="write the per-site JSON lines here")
    pk.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="site resamples for the 95%% intervals")
    pk.add_argument("--bootstrap-seed", type=int, default=0, metavar="S")
    mc = sub.add_parser("mc", parents=[common], help="zero-shot multiple choice (acc, acc_norm)")
    mc.add_argument("--task", action="append", default=[], metavar="NAME=FILE",
                    help="hellaswag, arc_easy, arc_challenge, piqa, siqa, winogrande (repeatable)")
    mc.add_argument("--tokenizer")
    gs = sub.add_parser("gsm8k", parents=[common], help="GSM8K few-shot greedy exact match")
    gs.add_argument("--test", default=str(shared_data_dir() / "gsm8k" / "test.jsonl"))
    gs.add_argument("--train", default=str(shared_data_dir() / "gsm8k" / "train.jsonl"))
    gs.add_argument("--shots", type=int, default=8)
    gs.add_argument("--seed", type=int, default=0)
    gs.add_argument("--max-new-tokens", type=int, default=256)
    gs.add_argument("--tokenizer")
    dg = sub.add_parser("diagnostics", parents=[common], help="latent cross-capture H, H_off, silhouette")
    dg.add_argument("--data", help="data-prep dir (default: run_config.data.path of pipeline.json)")
    dg.add_argument("--task", help="gsm8k, prosqa or countdown, with --task-file (instead of --data)")
    dg.add_argument("--task-file", help="task examples (JSON list): one site at each question's end")
    dg.add_argument("--sites", type=int, default=256, help="sites n sampled from --data (default 256)")
    dg.add_argument("--tau", type=float, default=0.97, help="variance of each latent's PCA subspace")
    dg.add_argument("--seed", type=int, default=0)
    dg.add_argument("--dump-latents", dest="dump", metavar="F.npz", help="save the collected latents")
    dg.add_argument("--tokenizer")
    pr = sub.add_parser("probe", parents=[common], help="latent scales, gradients per group, oracle ablations")
    pr.add_argument("--data", help="data-prep dir (default: run_config.data.path of pipeline.json)")
    pr.add_argument("--sequences", type=int, default=64, help="held-out sequences (default 64)")
    pr.add_argument("--seed", type=int, default=0)
    rs = sub.add_parser("reasoning", parents=[common], help="GSM8K / ProsQA / Countdown accuracy (greedy, verified)")
    rs.add_argument("--task", required=True, choices=TASKS)
    rs.add_argument("--data", help="task file (JSON list; default: the task's evaluation split)")
    rs.add_argument("--dump", metavar="F.jsonl", help="write one JSON line per (model, question)")
    rs.add_argument("--dump-nll", metavar="F.jsonl",
                    help="per-example teacher-forced answer NLL: {context, targets, nll} per line")
    rs.add_argument("--max-new-tokens", type=int, default=128)
    rs.add_argument("--tokenizer")
    lt = sub.add_parser("ltm-ppl", parents=[common], help="LTM: ELBO ppl bound over inference steps (+ plain LMs)")
    lt.add_argument("--data", help="data-prep dir (default: the LTM's training data)")
    lt.add_argument("--steps", default="0,4,16", help="inference steps T, comma-separated (default 0,4,16)")
    lt.add_argument("--sequences", type=int, default=64, help="held-out windows (default 64)")
    lt.add_argument("--seq-len", type=int, help="window length (default: the LTM's training seq_len)")
    lt.add_argument("--seed", type=int, default=0)
    lg = sub.add_parser("ltm-generate", parents=[common], help="LTM: infer z from a prompt, then decode")
    lg.add_argument("--prompt", required=True)
    lg.add_argument("--steps", type=int, help="inference steps on the prompt (default: the training T_fast)")
    lg.add_argument("--max-new-tokens", type=int, default=64)
    lg.add_argument("--temperature", type=float, default=0.0, help="0 = greedy with z = mu (default)")
    lg.add_argument("--seed", type=int, default=0)
    lg.add_argument("--tokenizer", help="default: the tokenizer recorded in the export")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        import torch

        from pipeline.eval import runner
        from pipeline.eval.ppl import PplConfig
        from pipeline.progress import Progress

        unit = {"ppl-at-k": "sites", "mc": "requests", "gsm8k": "questions", "diagnostics": "sites",
                "probe": "models", "reasoning": "questions", "ltm-ppl": "windows", "ltm-generate": "tokens"}[args.cmd]

        def bar(total: int, desc: str) -> Progress:  # the runner updates it and closes it
            return Progress(total, f"{desc} ({unit})")

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.cmd == "ltm-ppl":
            return _ltm_ppl(args, device, bar)
        if args.cmd == "ltm-generate":
            return _ltm_generate(args, device)
        models = runner.load_models(args.model, device=device, dtype=args.dtype)
        log = dict(mlflow_run=args.mlflow_run, mlflow_experiment=args.mlflow_experiment, bar=bar)
        if args.cmd == "ppl-at-k":
            cfg = PplConfig(k=args.k, sites_per_doc=None if args.every_position else args.sites_per_doc,
                            seed=args.seed, batch_size=args.batch_size or 4, sites_per_row=args.sites_per_row,
                            n_resamples=args.bootstrap, bootstrap_seed=args.bootstrap_seed, window=args.window)
            res = runner.run_ppl_at_k(models, out=args.out, data=args.data, cfg=cfg, limit=args.limit,
                                      dump=args.dump, **log)
            stem = "ppl_at_k"
        elif args.cmd == "mc":
            tasks = dict(_split_task(t) for t in args.task)
            res = runner.run_mc(models, tasks, out=args.out, tokenizer=args.tokenizer, limit=args.limit,
                                batch_size=args.batch_size or 16, **log)
            stem = "multiple_choice"
        elif args.cmd == "diagnostics":
            res = runner.run_diagnostics(models, out=args.out, data=args.data, task=args.task, task_file=args.task_file,
                                         tokenizer=args.tokenizer, limit=args.limit, sites=args.sites, tau=args.tau,
                                         seed=args.seed, batch_size=args.batch_size or 8, dump_latents=args.dump, **log)
            stem = "diagnostics"
        elif args.cmd == "probe":
            res = runner.run_probe(models, out=args.out, data=args.data, sequences=args.sequences, seed=args.seed,
                                   **log)
            stem = "probe"
        elif args.cmd == "reasoning":
            res = runner.run_reasoning(models, task=args.task, out=args.out, data=args.data, tokenizer=args.tokenizer,
                                       limit=args.limit, batch_size=args.batch_size or 16,
                                       max_new_tokens=args.max_new_tokens, dump=args.dump, dump_nll=args.dump_nll, **log)
            stem = "reasoning"
        else:
            res = runner.run_gsm8k(models, out=args.out, test_file=args.test, train_file=args.train,
                                   tokenizer=args.tokenizer, shots=args.shots, seed=args.seed, limit=args.limit,
                                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size or 16, **log)
            stem = "gsm8k"
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pathlib import Path

    print((Path(args.out) / f"{stem}.md").read_text(), end="")
    print(f"results: {Path(args.out) / stem}.json" + (f"; dump: {args.dump}" if getattr(args, "dump", None) else ""))
    return 0 if res else 1


def _ltm_ppl(args: argparse.Namespace, device: str, bar) -> int:
    from pathlib import Path

    from pipeline.ltm.evaluate import ltm_ppl

    try:
        steps = [int(t) for t in args.steps.split(",") if t.strip()]
    except ValueError:
        raise PipelineError(f"--steps {args.steps!r}: expected comma-separated integers, e.g. 0,4,16") from None
    ltm_ppl(args.model, steps=steps, data=args.data, seq_len=args.seq_len, sequences=args.limit or args.sequences,
            batch_size=args.batch_size or 8, seed=args.seed, device=device, out=args.out,
            bar=lambda total, desc: bar(total, desc))
    print((Path(args.out) / "ltm_ppl.md").read_text(), end="")
    print(f"results: {Path(args.out) / 'ltm_ppl'}.json")
    return 0


def _ltm_generate(args: argparse.Namespace, device: str) -> int:
    import torch

    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.ltm import load_ltm
    from pipeline.ltm.evaluate import generate

    decoder, info = load_ltm(args.model[0], device=device)
    tok = load_tokenizer(args.tokenizer or info["tokenizer"].get("path", ""))
    prompt = torch.tensor(tok.encode_batch([args.prompt])[0])
    steps = info["inference"].steps if args.steps is None else args.steps
    out, _ = generate(decoder, prompt, info["inference"], steps=steps, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, seed=args.seed, eos_id=info["tokenizer"].get("eos_id"))
    print(args.prompt + tok.decode(out[len(prompt):].tolist()))
    return 0


def _split_task(spec: str) -> tuple[str, str]:
    if "=" not in spec:
        raise PipelineError(f"--task {spec!r}: expected NAME=FILE, e.g. hellaswag=hellaswag_val.jsonl")
    name, path = spec.split("=", 1)
    return name, path


if __name__ == "__main__":
    sys.exit(main())
