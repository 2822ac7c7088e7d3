"""`data-prep` / `python -m data_prep`: corpora -> tokenizer -> Megatron token shards; task data.

A thin layer over `pipeline.data` and `pipeline.tasks`: parse arguments, call the library,
print for people.
Problems a user can fix end as `error: <message>` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from pipeline.errors import PipelineError

EPILOG = """\
examples:
  data-prep tokenizer train --input builtin:pydocs --output runs/tok/spm --vocab-size 8000
  data-prep build --input 'corpus/*.jsonl.zst' --tokenizer ../shared/data/tokenizers/gpt2 \\
      --output runs/data/gpt2
  data-prep verify runs/data/gpt2
  data-prep inspect runs/data/gpt2
reasoning tasks (Coconut's JSON schema):
  data-prep tasks gsm8k --split valid --output runs/tasks/gsm8k-valid.json
  data-prep tasks prosqa --preset full --output runs/tasks/prosqa-train.json
  data-prep tasks prosqa --stats
  data-prep tasks countdown --operands 4 --split eval --output runs/tasks/countdown4-eval.json
scale-out (N machines, each with its own I):
  data-prep build ... --output runs/data/big --partition I/N
  data-prep merge-manifests runs/data/big
"""

INPUT_HELP = ("corpus files or globs (quote them): .jsonl/.json/.parquet/.txt, optionally .gz/.zst; "
              "a directory (its corpus files, or a datasets.save_to_disk dataset); or builtin:pydocs "
              "(English docs bundled with Python, no download)")


def _add_reader_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", "-i", nargs="+", required=True, metavar="GLOB", help=INPUT_HELP)
    p.add_argument("--text-key", default="text", help="JSON key / column holding the text (default: text)")
    p.add_argument("--txt-unit", default="file", choices=["file", "paragraph", "line"],
                   help="what one document is in .txt inputs (default: the whole file)")
    p.add_argument("--on-error", default="fail", choices=["fail", "skip"],
                   help="on a bad record: stop with its file:line (fail, default) or skip and count it")
    p.add_argument("--max-doc-chars", type=int, default=4_000_000, metavar="N",
                   help="documents longer than this are bad records (default: 4000000; tokenizing "
                   "takes ~130 bytes of memory a character)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="data-prep", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = sub.add_parser("tokenizer", help="train or show a tokenizer")
    tsub = tok.add_subparsers(dest="tok_command", required=True, metavar="ACTION")
    train = tsub.add_parser(
        "train", help="train a sentencepiece model on the same inputs build reads",
        description="Train a sentencepiece tokenizer (writes PREFIX.model and PREFIX.vocab). "
        "Ids 0-3 are <unk>, <s>, </s> (EOS), <pad>; --special-tokens follow and are never split.")
    _add_reader_args(train)
    train.add_argument("--output", "-o", required=True, metavar="PREFIX",
                       help="output path without suffix, e.g. runs/tok/spm -> runs/tok/spm.model")
    train.add_argument("--vocab-size", type=int, default=32000, help="default: 32000")
    train.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    train.add_argument("--special-tokens", nargs="*", default=[], metavar="TOKEN",
                       help="extra tokens kept whole, e.g. '<|latent|>'")
    train.add_argument("--no-byte-fallback", action="store_true",
                       help="map unseen characters to <unk> instead of UTF-8 byte tokens")
    train.add_argument("--character-coverage", type=float, default=0.9995)
    train.add_argument("--max-sentences", type=int, default=2_000_000,
                       help="lines sampled for training (default: 2M)")
    train.add_argument("--workers", type=int, default=0, help="training threads (default: all cores)")
    train.add_argument("--seed", type=int, default=0)
    show = tsub.add_parser("show", help="load a tokenizer and print what build would record")
    show.add_argument("path", help="a .model file, a tokenizer.json, or a Hugging Face tokenizer dir")
    show.add_argument("--eos-token", help="EOS token, if the tokenizer does not name one")
    show.add_argument("--text", help="also print the ids of this text")

    b = sub.add_parser(
        "build", help="tokenize corpora into Megatron .bin/.idx shards with a manifest",
        description="Tokenize documents (one document = one sequence, EOS appended) into "
        "bounded megatron-core shards under OUTPUT/{train,validation}/ plus OUTPUT/manifest.json. "
        "Rerunning the same command after a crash resumes where it stopped.")
    _add_reader_args(b)
    b.add_argument("--tokenizer", "-t", required=True, metavar="PATH",
                   help="sentencepiece .model, tokenizer.json, or Hugging Face tokenizer dir")
    b.add_argument("--output", "-o", required=True, metavar="DIR", help="new (or empty) directory")
    b.add_argument("--eos-token", help="EOS token, if the tokenizer does not name one")
    b.add_argument("--workers", type=int, default=0,
                   help="tokenizer threads (default: all cores); output does not depend on it")
    b.add_argument("--val-fraction", type=float, default=0.01,
                   help="share of documents in validation, chosen by a seeded hash of the text (default: 0.01)")
    b.add_argument("--seed", type=int, default=1234, help="seed of the train/validation split")
    b.add_argument("--shard-size", default="256M", help="max .bin bytes per shard, e.g. 64M, 1G (default: 256M)")
    b.add_argument("--partition", default="0/1", metavar="I/N",
                   help="build only part I (0-based) of N into OUTPUT/part-I-of-N; then merge-manifests")
    b.add_argument("--overwrite", action="store_true", help="replace a finished or different build in OUTPUT")
    b.add_argument("--tokenizer-backend", default="auto", choices=["auto", "gigatoken", "hf", "sentencepiece"],
                   help="library that computes the ids (never changes them): the tokenizer's own (hf, "
                   "sentencepiece), gigatoken (optional extra, used only once checked exact), or auto "
                   "(the faster for this tokenizer kind, default)")

    mg = sub.add_parser("merge-manifests", help="combine partition builds into one dataset (no copying)",
                        description="Write DIR/manifest.json listing the shards of DIR/part-*-of-* "
                        "(or of the PART directories given, which must lie inside DIR).")
    mg.add_argument("dir", metavar="DIR")
    mg.add_argument("parts", nargs="*", metavar="PART")

    ins = sub.add_parser("inspect", help="counts, length histogram and decoded samples of a dataset")
    ins.add_argument("dir", metavar="DIR")
    ins.add_argument("--samples", type=int, default=3, help="documents to decode (default: 3)")
    ins.add_argument("--chars", type=int, default=300, help="characters shown per sample")
    ins.add_argument("--tokenizer", help="decode with this tokenizer instead of the recorded one")

    ver = sub.add_parser("verify", help="re-read every shard; check index, data and checksums")
    ver.add_argument("dir", metavar="DIR")
    _add_task_parsers(sub)
    return parser


def _add_task_parsers(sub) -> None:
    tk = sub.add_parser(
        "tasks", help="reasoning-task data (GSM8K, ProsQA, Countdown) as Coconut-schema JSON",
        description="Write a JSON list of {question, steps, answer, ...task fields} "
        "(pipeline.tasks; text layout in pipeline/tasks/format.py).")
    tsub = tk.add_subparsers(dest="task", required=True, metavar="TASK")

    def common(p: argparse.ArgumentParser, output_required: bool = True) -> None:
        p.add_argument("--output", "-o", required=output_required, metavar="F.json",
                       help="JSON file to write (atomically; parent directories are created)")
        p.add_argument("--seed", type=int, default=0, help="seed (default: 0); same seed, same file")

    g = tsub.add_parser(
        "gsm8k", help="GSM8K: steps = the <<...>> annotations, answer = the number after ####",
        description="GSM8K from train.jsonl/test.jsonl. There is no official validation split: "
        "valid is a seeded sample of --n-valid train problems and train is the rest.")
    common(g)
    g.add_argument("--split", default="train", choices=["train", "valid", "test"],
                   help="default: train (the train problems not in valid)")
    g.add_argument("--n", type=int, metavar="N", help="keep the first N examples (default: all)")
    g.add_argument("--n-valid", type=int, default=500, help="size of the valid split (default: 500)")
    g.add_argument("--data-dir", metavar="DIR", help="directory with train.jsonl and test.jsonl "
                   "(default: the shared data's gsm8k/)")

    p = tsub.add_parser(
        "prosqa", help="ProsQA: official valid/test, or generated training instances",
        description="--split valid/test copies the official file; --split train generates new "
        "instances in the same schema and distribution (never equal to an official one). "
        "--stats prints official vs generated statistics.")
    common(p, output_required=False)
    p.add_argument("--split", default="train", choices=["train", "valid", "test"],
                   help="train: generate (default); valid/test: the official file")
    p.add_argument("--preset", default="full", choices=["full", "mini"],
                   help="train generator: full (matches the official files, default) or mini "
                   "(about 10 concepts, depth 2-3, for tiny models)")
    p.add_argument("--n", type=int, metavar="N",
                   help="train: instances to generate (default: 17886, Coconut's train size); "
                   "valid/test: keep the first N")
    p.add_argument("--stats", action="store_true",
                   help="print a markdown table: official valid/test vs generated full and mini "
                   "samples (--stats-n each); --output is then optional")
    p.add_argument("--stats-n", type=int, default=1000, help="generated sample size for --stats")
    p.add_argument("--data-dir", metavar="DIR", help="directory with the official valid.json and "
                   "test.json (default: the shared data's prosqa/)")

    c = tsub.add_parser(
        "countdown", help="Countdown: reach a target with + - * /, each operand once (solvable only)",
        description="Operands uniform in 1-50, target uniform in 0-100; only instances an "
        "exhaustive search proves solvable (exact rationals). train and eval come from separate "
        "seeded streams and train excludes the eval problems.")
    common(c)
    c.add_argument("--split", default="train", choices=["train", "eval"],
                   help="eval: distinct problems; train (default): independent draws, which repeat "
                   "problems at 3 operands (only 144,848 are solvable), never an eval problem")
    c.add_argument("--n", type=int, metavar="N", help="instances (default: 262144 train, 1024 eval)")
    c.add_argument("--operands", type=int, default=3, choices=[3, 4, 5], help="operands per instance")


def _bar(unit: str):
    from tqdm import tqdm

    return tqdm(unit=unit, unit_scale=True, disable=None, file=sys.stderr)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from pipeline.data import readers, tokenizer

    if args.tok_command == "show":
        tok = tokenizer.load_tokenizer(args.path, args.eos_token)
        for k, v in tok.identity().items():
            print(f"{k}: {v}")
        if args.text is not None:
            print("ids:", tok.encode_batch([args.text])[0])
        return 0
    reader = readers.Reader(readers.resolve_inputs(args.input), args.text_key, args.on_error, args.txt_unit,
                            max_chars=args.max_doc_chars)
    t0 = time.time()
    tok = tokenizer.train_sentencepiece(
        (text for text, _, _ in reader), args.output, args.vocab_size, args.model_type,
        args.special_tokens, not args.no_byte_fallback, args.character_coverage,
        args.max_sentences, args.workers, args.seed)
    print(f"wrote {tok.path} ({args.model_type}, vocab {tok.vocab_size}, EOS {tok.eos_token!r}="
          f"{tok.eos_id}) in {time.time() - t0:.1f}s; skipped: {dict(reader.skips) or 'none'}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from pipeline.data import build

    opts = build.BuildOptions(
        inputs=args.input, tokenizer=args.tokenizer, output=args.output, text_key=args.text_key,
        workers=args.workers, val_fraction=args.val_fraction, seed=args.seed,
        shard_size=build.parse_size(args.shard_size), on_error=args.on_error, txt_unit=args.txt_unit,
        max_chars=args.max_doc_chars, eos_token=args.eos_token, partition=build.parse_partition(args.partition),
        overwrite=args.overwrite, tokenizer_backend=args.tokenizer_backend,
        command=["data-prep", *sys.argv[1:]])
    t0 = time.time()
    bar = _bar("tok")

    def progress(docs: int, tokens: int) -> None:
        bar.update(tokens - bar.n)
        bar.set_postfix(docs=docs, refresh=False)

    with bar:
        m = build.build(opts, progress)
    dt = time.time() - t0
    tot = m.totals()
    if m.provenance.get("already_complete"):
        print(f"already complete: {m.root} holds this build ({tot['all']['documents']} documents, "
              f"{tot['all']['tokens']} tokens); nothing to do (--overwrite rebuilds it)")
        return 0
    print(f"wrote {m.root}: {tot['all']['documents']} documents, {tot['all']['tokens']} tokens "
          f"({m.dtype}) in {tot['all']['shards']} shards; train {tot['train']['documents']} docs, "
          f"validation {tot['validation']['documents']} docs; {tot['all']['tokens'] / dt:,.0f} tok/s")
    backend = m.provenance["tokenizer_backend"]
    print(f"tokenizer backend: {backend['name']} {backend['version']}"
          + (f" (not gigatoken: {backend['fallback_reason']})" if backend["fallback_reason"] else ""))
    if m.skipped:
        print("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(m.skipped.items())))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from pipeline.data import shards

    m = shards.merge_manifests(args.dir, args.parts or None, {"command": ["data-prep", *sys.argv[1:]]})
    tot = m.totals()["all"]
    print(f"wrote {m.root / shards.MANIFEST}: {len(m.provenance['merged_from'])} parts, "
          f"{tot['shards']} shards, {tot['documents']} documents, {tot['tokens']} tokens")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from pipeline.data import report, tokenizer

    s = report.summarize(args.dir)
    m = s.manifest
    print(f"{m.root}: tokenizer {m.tokenizer['kind']} {m.tokenizer['path']} (vocab {m.vocab_size}, "
          f"EOS {m.eos_id}), dtype {m.dtype}")
    for split, t in m.totals().items():
        print(f"  {split:10s} {t['shards']:5d} shards {t['documents']:10d} documents {t['tokens']:12d} tokens")
    print(f"  skipped: {m.skipped or 'none'}")
    for split in ("train", "validation"):
        lens = s.lengths[split]
        if lens.size:
            print(f"{split} document length (tokens): min {lens.min()}, median {int(np.median(lens))}, "
                  f"mean {lens.mean():.1f}, max {lens.max()}")
            peak = max(c for _, _, c in s.histogram(split)) or 1
            for lo, hi, c in s.histogram(split):
                print(f"  {lo:>8d}-{hi - 1:<8d} {c:8d} {'#' * round(40 * c / peak)}")
    if args.samples:
        tok = tokenizer.load_tokenizer(args.tokenizer or m.tokenizer["path"], m.tokenizer.get("eos_token"))
        for prefix, i, ids in report.sample_documents(m, args.samples):
            text = tok.decode(ids.tolist())
            if len(text) > args.chars:  # keep the end visible: it shows the EOS
                text = f"{text[: args.chars - 60]} [...] {text[-60:]}"
            print(f"--- {prefix} document {i} ({len(ids)} tokens) ---\n{text}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.data import shards

    bar = _bar("shard")
    with bar:
        m = shards.verify_dataset(args.dir, lambda s: bar.update(1))
    tot = m.totals()["all"]
    tok = ("tokenizer files match their sha256" if shards.check_tokenizer(m)  # small files: cheap again
           else f"tokenizer not found at {m.tokenizer.get('path')}, not checked")
    print(f"OK {m.root}: {tot['shards']} shards, {tot['documents']} documents, {tot['tokens']} tokens; "
          f"indexes match data, checksums and totals match manifest; {tok}")
    return 0


def _first(examples: list, n: int | None) -> list:
    if n is not None and not 0 <= n <= len(examples):
        raise PipelineError(f"--n {n}: the split has {len(examples)} examples")
    return examples if n is None else examples[:n]


def _prosqa_stats(args: argparse.Namespace) -> None:
    from pipeline.tasks import prosqa

    official = {s: prosqa.load_prosqa(s, args.data_dir) for s in prosqa.OFFICIAL_SPLITS}
    exclude = official["valid"] + official["test"]
    columns = {f"official {s}": prosqa.prosqa_stats(ex) for s, ex in official.items()}
    for preset in prosqa.PRESETS:
        sample = prosqa.generate_prosqa(args.stats_n, args.seed, preset, exclude)
        columns[f"generated {preset}"] = prosqa.prosqa_stats(sample)
    print(prosqa.stats_table(columns))


def cmd_tasks(args: argparse.Namespace) -> int:
    from pipeline.tasks import schema

    t0 = time.time()
    if args.task == "gsm8k":
        from pipeline.tasks import gsm8k

        examples = _first(gsm8k.load_gsm8k(args.split, args.data_dir, n_valid=args.n_valid, seed=args.seed),
                          args.n)
    elif args.task == "prosqa":
        from pipeline.tasks import prosqa

        if args.stats:
            _prosqa_stats(args)
            if args.output is None:
                return 0
        elif args.output is None:
            raise PipelineError("tasks prosqa: --output is required (unless --stats)")
        if args.split == "train":
            try:
                exclude = [ex for s in prosqa.OFFICIAL_SPLITS for ex in prosqa.load_prosqa(s, args.data_dir)]
            except PipelineError as e:
                raise PipelineError(f"{e} (generation reads the official valid/test files to stay distinct "
                                    "from them; pass --data-dir)") from e
            n = 17_886 if args.n is None else args.n
            with _bar("ex") as bar:
                examples = prosqa.generate_prosqa(n, args.seed, args.preset, exclude, bar.update)
        else:
            examples = _first(prosqa.load_prosqa(args.split, args.data_dir), args.n)
    else:
        from pipeline.tasks import countdown

        with _bar("ex") as bar:
            examples = countdown.generate_countdown(args.split, args.n, args.operands, args.seed, bar.update)
    path = schema.save_examples(args.output, examples)
    what = (f", {args.operands} operands" if args.task == "countdown" else
            f", preset {args.preset}" if args.task == "prosqa" and args.split == "train" else "")
    print(f"wrote {len(examples)} {args.task} examples ({args.split}{what}) to {path} "
          f"in {time.time() - t0:.1f}s")
    return 0


COMMANDS = {"tokenizer": cmd_tokenizer, "build": cmd_build, "merge-manifests": cmd_merge,
            "inspect": cmd_inspect, "verify": cmd_verify, "tasks": cmd_tasks}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
