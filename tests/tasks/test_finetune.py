"""CoT / no-CoT fine-tuning as a training task: what the loss sees, batch order, skipping, and a
2-rank run through the DeepSpeed loop that exports a model `evaluate.py reasoning` reads."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # this module importable by the spawned ranks

from pipeline.config import from_dict  # noqa: E402
from pipeline.data.tokenizer import load_tokenizer, train_sentencepiece  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.tasks import prosqa  # noqa: E402
from pipeline.tasks.finetune import IGNORE, EncodedExamples, ReasoningConfig, ReasoningSFT  # noqa: E402
from pipeline.tasks.format import prompt_text, target_text  # noqa: E402
from pipeline.tasks.schema import save_examples  # noqa: E402
from pipeline.train.task import BatchLayout  # noqa: E402
from pipeline.train.testing import run_distributed  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = {"vocab_size": 50257, "eos_token_id": 50256, "max_position_embeddings": 320}


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> tuple[Path, list[dict]]:
    """32 mini-ProsQA instances (prompts ~100-220 GPT-2 tokens) in a task file."""
    examples = prosqa.generate_prosqa(32, seed=5, preset="mini")
    return save_examples(tmp_path_factory.mktemp("ft") / "mini.json", examples), examples


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer_dir):
    return load_tokenizer(gpt2_tokenizer_dir)


def config(train_file: Path, **data) -> ReasoningConfig:
    return from_dict(ReasoningConfig, {"model": {"overrides": TINY},
                                       "data": {"train_file": str(train_file), "valid_file": str(train_file),
                                                "max_len": 300, **data},
                                       "tracking": {"enabled": False}})


def layout(micro: int, accum: int = 1, world: int = 1, rank: int = 0) -> BatchLayout:
    return BatchLayout(micro, accum, world, rank, torch.device("cpu"))


@pytest.mark.parametrize("cot", [True, False])
def test_loss_covers_exactly_the_target_and_eos(mini, gpt2, cot):
    _, examples = mini
    rows = EncodedExamples(examples[:6], gpt2, cot=cot, max_len=10_000, where="mini")
    b = rows.batch([0, 1, 2, 3, 4, 5])
    for i, ex in enumerate(examples[:6]):
        prompt = gpt2.encode_batch([prompt_text(ex)])[0]
        target = gpt2.encode_batch([target_text(ex, cot)])[0] + [gpt2.eos_id]
        n = len(prompt) + len(target)
        assert b["lengths"][i] == n
        assert b["input_ids"][i, : len(prompt)].tolist() == prompt  # the evaluator's prompt ids, exactly
        scored = (b["targets"][i] != IGNORE).nonzero().flatten().tolist()
        assert scored == list(range(len(prompt) - 1, n - 1))  # position t predicts token t + 1
        assert b["targets"][i, scored].tolist() == target
        assert (b["input_ids"][i, n:] == gpt2.eos_id).all() and (b["targets"][i, n - 1:] == IGNORE).all()
        # GPT-2's BPE: prompt and target encoded apart == the full text encoded at once
        assert b["input_ids"][i, :n].tolist() == gpt2.encode_batch([prompt_text(ex) + target_text(ex, cot)])[0] + [
            gpt2.eos_id]
    assert "### " in gpt2.decode(b["targets"][0, b["targets"][0] != IGNORE].tolist())


def test_sentencepiece_prompt_is_the_evaluators_prompt(mini, tmp_path):
    """sentencepiece drops the prompt's trailing newline when it is encoded alone; the training
    prompt must still be exactly what the evaluator feeds (prompt_text encoded alone)."""
    _, examples = mini
    tok = train_sentencepiece([prompt_text(e) + target_text(e, True) for e in examples], tmp_path / "spm",
                              vocab_size=400, threads=1)
    ex = examples[0]
    prompt = tok.encode_batch([prompt_text(ex)])[0]
    assert not tok.decode(prompt).endswith("\n")  # the pitfall
    rows = EncodedExamples([ex], tok, cot=True, max_len=10_000, where="mini")
    ids, n_prompt = rows.row(0)
    assert ids[:n_prompt].tolist() == prompt
    assert ids[n_prompt:].tolist() == tok.encode_batch([target_text(ex, True)])[0] + [tok.eos_id]


def test_batches_are_a_pure_function_of_the_step_and_accumulation_covers_the_same(mini):
    file, _ = mini

    def seen(micro: int, accum: int, world: int, steps: int, reverse: bool = False) -> list[list[tuple]]:
        """Per step, the rows (as token tuples) of every rank and micro-batch."""
        tasks = []
        for rank in range(world):
            t = ReasoningSFT(config(file))
            t.build(layout(micro, accum, world, rank))
            tasks.append(t)
        order = [(s, m) for s in range(steps) for m in range(accum)]
        out: dict[int, list[tuple]] = {s: [] for s in range(steps)}
        for s, m in (reversed(order) if reverse else order):
            for t in tasks:
                b = t.batch(s, m)
                out[s] += [tuple(r[: int(n)].tolist()) for r, n in zip(b["input_ids"], b["lengths"], strict=True)]
        return [sorted(out[s]) for s in range(steps)]

    steps = 6  # 6 x 8 = 48 > 32 examples: crosses an epoch boundary
    a = seen(2, 2, 2, steps)
    assert a == seen(2, 2, 2, steps, reverse=True)  # any call order, fresh objects: the same batches
    assert a == seen(4, 1, 2, steps) == seen(8, 1, 1, steps)  # 2 x 2 accumulation == 1 x 4 == one rank of 8
    assert len(set(a[0])) == 8  # no example twice within an epoch's step
    other = ReasoningSFT(config(file, seed=7))
    other.build(layout(8))
    assert sorted(tuple(r.tolist()) for r in other.batch(0, 0)["input_ids"]) != a[0]  # the seed matters


def test_over_long_examples_are_counted_and_skipped_with_one_warning(mini, gpt2, caplog):
    _, examples = mini
    lengths = [len(p) + len(t) + 1 for p, t in zip(gpt2.encode_batch([prompt_text(e) for e in examples]),
                                                   gpt2.encode_batch([target_text(e, True) for e in examples]),
                                                   strict=True)]
    max_len = int(np.median(lengths))
    with caplog.at_level(logging.WARNING, logger="pipeline.tasks.finetune"):
        rows = EncodedExamples(examples, gpt2, cot=True, max_len=max_len, where="mini.json")
    assert rows.too_long == sum(n > max_len for n in lengths) > 0
    assert len(rows) == len(examples) - rows.too_long and rows.lengths.max() <= max_len
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{rows.too_long} of {len(examples)}" in warnings[0].getMessage()
    with pytest.raises(PipelineError, match="no example fits"):
        EncodedExamples(examples, gpt2, cot=True, max_len=10, where="mini.json")


def test_flops_count_real_tokens_only(mini):
    file, _ = mini
    t = ReasoningSFT(config(file))
    t.build(layout(2))
    rows = t.train_rows
    short, long = int(np.argmin(rows.lengths)), int(np.argmax(rows.lengths))
    both = t.flops(rows.batch([short, long]))  # the short row is padded to the long one
    assert both == pytest.approx(t.flops(rows.batch([short])) + t.flops(rows.batch([long])))
    assert t.tokens(rows.batch([short, long])) == rows.lengths[short] + rows.lengths[long]


@pytest.mark.parametrize("change,words", [
    ({"data": {"train_file": ""}}, "data.train_file is not set"),
    ({"data": {"max_len": 400}}, "max_position_embeddings=320"),
    ({"model": {"overrides": {**TINY, "eos_token_id": 0}}}, "ends text with id 0"),
    ({"model": {"overrides": {**TINY, "vocab_size": 1000}}}, "vocabulary of 1000"),
])
def test_config_errors_name_the_fix(mini, change, words):
    file, _ = mini
    raw = {"model": {"overrides": TINY}, "data": {"train_file": str(file), "valid_file": str(file), "max_len": 300}}
    for section, values in change.items():
        raw[section] = {**raw[section], **values}
    with pytest.raises(PipelineError, match=words):
        ReasoningSFT(from_dict(ReasoningConfig, raw)).build(layout(2))


# ---------------------------------------------------------------------- 2 ranks, export, evaluate
def finetune_ranks(out: str, train_file: str) -> dict:
    """Runs on each rank: 6 steps of CoT fine-tuning under ZeRO-2, export at the end."""
    from pipeline.train.trainer import train

    ds = json.loads((ROOT / "ds_configs" / "zero2_cpu.json").read_text())
    ds |= {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}
    ds["optimizer"]["params"]["lr"] = 3e-3
    cfg = config(Path(train_file))
    cfg.train.output_dir, cfg.train.max_steps, cfg.train.eval_every, cfg.train.eval_sequences = out, 6, 3, 4
    res = train(ReasoningSFT(cfg), ds)
    x = torch.arange(100, 120)[None]
    with torch.no_grad():
        logits = res.model.lm(x).logits.numpy()
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"finished": res.finished, "export": str(res.export_dir), "logits": logits,
            "losses": [r["loss"] for r in rows if "lr" in r], "val": [r["val_loss"] for r in rows if "val_loss" in r]}


def test_two_rank_finetune_exports_a_model_the_evaluator_reads(mini, tmp_path):
    from pipeline.eval.models import load_eval_model
    from pipeline.eval.reasoning import rescore

    file, examples = mini
    r0, r1 = run_distributed(finetune_ranks, str(tmp_path / "run"), str(file), world_size=2)
    assert r0["finished"] and r1["finished"] and r0["losses"] == r1["losses"]
    assert r0["losses"][-1] < r0["losses"][0] and len(r0["val"]) == 2  # steps 3 and 6
    export = Path(r0["export"])
    meta = json.loads((export / "pipeline.json").read_text())
    assert meta["variant"] == "continued_pretraining" and meta["run_config"]["task"] == "reasoning_sft"
    assert meta["eos_id"] == 50256 and (export / "base" / "tokenizer.json").is_file()
    model = load_eval_model(export)
    with torch.no_grad():
        exported = model.dual.base(torch.arange(100, 120)[None]).logits.numpy()
    np.testing.assert_allclose(exported, r0["logits"], atol=1e-5)  # the trained weights, tied head and all

    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "launchers" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    dump, out = tmp_path / "dump.jsonl", tmp_path / "eval"
    rc = cli.main(["reasoning", "--task", "prosqa", "--model", str(export), "--data", str(file), "--limit", "6",
                   "--max-new-tokens", "12", "--batch-size", "4", "--dump", str(dump), "--out", str(out),
                   "--device", "cpu"])
    assert rc == 0
    result = json.loads((out / "reasoning.json").read_text())["results"][export.parent.name]
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [r["question"] for r in records] == [e["question"] for e in examples[:6]]
    assert result["n"] == 6 and rescore("prosqa", records)["accuracy"] == result["accuracy"]
