"""`evaluate.py reasoning`: the accuracy it reports is the verifier's count over its own dump,
whatever the batch size; Countdown's format score; default evaluation splits; comparison tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import PipelineError
from pipeline.eval import reasoning as rs
from pipeline.eval import runner
from pipeline.tasks import countdown, prosqa
from pipeline.tasks.format import prompt_text, target_text
from pipeline.tasks.schema import save_examples
from pipeline.tasks.verify import score


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer_dir):
    return load_tokenizer(gpt2_tokenizer_dir)


class Scripted:
    """A stand-in model whose answers are known: for example i it writes the right CoT target
    (i % 3 == 0), a wrong but well-formed answer (1), or the right target, then a blank line and
    more text that the stop must cut off (2). Finds the example from the decoded prompt."""

    name = "scripted"

    def __init__(self, tok, examples):
        self.tok, self.by_prompt = tok, {prompt_text(e): (i, e) for i, e in enumerate(examples)}

    def last_site(self, k: int, augment: bool = True) -> int:
        return 10_000

    def describe(self) -> dict:
        return {"name": self.name}

    def answer(self, i: int, ex: dict) -> str:
        right = target_text(ex, cot=True)
        if i % 3 == 1:
            return "### <answer>1 + 2 + 3</answer>" if "numbers" in ex else "### Tom is a nothing."
        return right + ("\n\nEvery wumpus is a ### wrong" if i % 3 == 2 else "")

    def generate_batch(self, prompts, *, max_new_tokens, eos_token_id, stop_strings, decode):
        out = []
        for p in prompts:
            i, ex = self.by_prompt[self.tok.decode(p)]
            out.append(self.tok.encode_batch([self.answer(i, ex)])[0] + ([eos_token_id] if i % 3 == 0 else []))
        return out


@pytest.mark.parametrize("task", ["prosqa", "countdown"])
def test_accuracy_is_the_verifiers_count_over_the_dump(gpt2, task, tmp_path):
    examples = (prosqa.load_prosqa("test")[:12] if task == "prosqa"
                else countdown.generate_countdown("eval", 12, operands=3, seed=3))
    model = Scripted(gpt2, examples)
    results = [rs.evaluate_reasoning(model, gpt2, task, examples, batch_size=b, max_new_tokens=512) for b in (1, 5)]
    assert results[0]["records"] == results[1]["records"]  # batching changes nothing
    r = results[0]
    assert r["accuracy"] == pytest.approx(8 / 12)  # i % 3 in {0, 2}: the blank line cut the tail off
    assert r["mean_score"] == pytest.approx((8 + (0.4 if task == "countdown" else 0)) / 12)  # 4 x 0.1
    assert r["accuracy_stderr"] == pytest.approx((8 / 12 * 4 / 12 / 11) ** 0.5)
    dump = rs.write_dump(tmp_path / "d.jsonl", {"scripted": r["records"]})
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    keys = ("accuracy", "accuracy_stderr", "mean_score", "mean_score_stderr")
    assert rs.rescore(task, records) == {k: r[k] for k in keys}
    for rec, ex in zip(records, examples, strict=True):
        assert rec["question"] == ex["question"] and rec["gold"] == ex["answer"]
        assert rec["score"] == score(task, ex, rec["generated"]) and "\n\n" not in rec["generated"]
    assert records[0]["extracted"] == examples[0]["answer"] and records[0]["score"] == 1.0
    assert records[1]["extracted"] == ("1 + 2 + 3" if task == "countdown" else "Tom is a nothing.")


def test_real_models_compare_in_one_table(exports, gpt2_tokenizer_dir, tmp_path):
    """A plain HF model and a liu export (augments at the prompt's end) on 5 Countdown questions."""
    data = save_examples(tmp_path / "cd.json", countdown.generate_countdown("eval", 5, operands=3, seed=1))
    models = runner.load_models([str(exports["hf_base"]), str(exports["liu"])], device="cpu")
    out, dump = tmp_path / "eval", tmp_path / "dump.jsonl"
    res = runner.run_reasoning(models, task="countdown", out=out, data=str(data), tokenizer=str(gpt2_tokenizer_dir),
                               batch_size=2, max_new_tokens=8, dump=str(dump))
    assert set(res["results"]) == {"hf_base", "liu"} and res["n"] == 5
    table = (out / "reasoning.md").read_text()
    assert "| hf_base | 5 |" in table and "| liu | 5 |" in table
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    for name in ("hf_base", "liu"):
        mine = [r for r in records if r["model"] == name]
        assert len(mine) == 5 and rs.rescore("countdown", mine)["mean_score"] == res["results"][name]["mean_score"]
    one = runner.run_reasoning(models[1:], task="countdown", out=tmp_path / "b1", data=str(data),
                               tokenizer=str(gpt2_tokenizer_dir), batch_size=1, max_new_tokens=8,
                               dump=str(tmp_path / "one.jsonl"))
    assert [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()] == [
        {k: v for k, v in r.items() if k != "model"} for r in records if r["model"] == "liu"]
    assert one["results"]["liu"]["accuracy"] == res["results"]["liu"]["accuracy"]


def test_long_prompts_keep_their_end_with_a_count(exports, gpt2, caplog):
    """gpt2-tiny has 128 positions; official ProsQA prompts are ~360 tokens."""
    model = runner.load_models([str(exports["hf_base"])], device="cpu")[0]
    r = rs.evaluate_reasoning(model, gpt2, "prosqa", prosqa.load_prosqa("test")[:2], max_new_tokens=4)
    assert r["truncated_prompts"] == 2 and "2 of 2 prompts are longer" in caplog.text


def test_default_splits_and_file_checks(tmp_path):
    examples, source = rs.task_examples("prosqa", limit=3)
    assert examples == prosqa.load_prosqa("test")[:3] and "test" in source["split"]
    examples, source = rs.task_examples("countdown", limit=4)
    assert examples == countdown.generate_countdown("eval", 4, operands=3, seed=0) and "3 operands" in source["split"]
    data = save_examples(tmp_path / "p.json", prosqa.load_prosqa("valid")[:2])
    assert rs.task_examples("prosqa", data)[1] == {"file": str(data)}
    with pytest.raises(PipelineError, match="expected countdown examples, found prosqa"):
        rs.task_examples("countdown", data)
    with pytest.raises(PipelineError, match="expected one of"):
        rs.task_examples("arith")


def test_cli_surface():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_cli", Path(__file__).parents[2] / "launchers" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = cli.parse(["reasoning", "--task", "gsm8k", "--model", "a", "--model", "b", "--data", "f.json", "--limit",
                      "3", "--batch-size", "4", "--dump", "d.jsonl", "--max-new-tokens", "9", "--dump-nll", "n.jsonl"])
    assert args.dump_nll == "n.jsonl"
    assert (args.task, args.model, args.data, args.limit, args.batch_size, args.dump, args.max_new_tokens) == (
        "gsm8k", ["a", "b"], "f.json", 3, 4, "d.jsonl", 9)


def test_dump_nll_rescores_exactly_through_the_models_own_scorer(exports, gpt2_tokenizer_dir, tmp_path):
    """Each `--dump-nll` line (batched, padded) equals scoring that example alone with `score_sites`
    at its question's last token; the table's answer NLL is the mean of the lines' means."""
    import torch

    data = save_examples(tmp_path / "cd.json", countdown.generate_countdown("eval", 5, operands=3, seed=2))
    models = runner.load_models([str(exports["liu"]), str(exports["h1"]), str(exports["hf_base"])], device="cpu")
    dump = tmp_path / "nll.jsonl"
    res = runner.run_reasoning(models, task="countdown", out=tmp_path / "e", data=str(data),
                               tokenizer=str(gpt2_tokenizer_dir), batch_size=3, max_new_tokens=4, dump_nll=str(dump))
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    tok = load_tokenizer(gpt2_tokenizer_dir)
    for m in models:
        mine = [r for r in lines if r["model"] == m.name]
        assert len(mine) == 5
        for r, ex in zip(mine, countdown.generate_countdown("eval", 5, operands=3, seed=2), strict=True):
            assert r["context"] == tok.encode_batch([prompt_text(ex)])[0]
            assert tok.decode(r["targets"][:-1]) == target_text(ex, cot=False) and r["targets"][-1] == tok.eos_id
            alone = m.score_sites(torch.tensor([r["context"] + r["targets"] + [0]]),
                                  torch.tensor([[len(r["context"]) - 1]]), len(r["targets"]))[0, 0]
            torch.testing.assert_close(torch.tensor(r["nll"]), alone, atol=1e-5, rtol=0)
        mean = sum(sum(r["nll"]) / len(r["nll"]) for r in mine) / 5
        assert res["results"][m.name]["answer_nll"] == pytest.approx(mean)
    assert "answer NLL" in (tmp_path / "e" / "reasoning.md").read_text()
