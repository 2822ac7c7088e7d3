"""Prompts and budgets longer than the model's context, in every evaluation and in `generate`.

The tiny exports have 128 positions (the main job's own Base has 128 too). Before,
`evaluate.py gsm8k` with its default 8 shots and 256 new tokens died with an IndexError in
the position embedding, as did `reasoning` with its default 128 new tokens. The rule now:
a prompt that is too long keeps its last tokens (left-truncation, as lm-eval does, with a
counted warning); a budget that leaves no room for any prompt is an `error:` naming the
context size, the flag and the largest value that fits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launchers"))

import evaluate  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory, shared_data) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("long")
    long_question = " ".join(["The wumpus is a yumpus."] * 60)
    prosqa = json.loads((shared_data / "prosqa" / "test.json").read_text())[:2]
    prosqa[0]["question"] = long_question + " " + prosqa[0]["question"]
    (root / "prosqa.json").write_text(json.dumps(prosqa))
    arc = {"question": long_question, "choices": {"text": ["yes " * 150, "no"], "label": ["A", "B"]}, "answerKey": "B"}
    (root / "arc.jsonl").write_text(json.dumps(arc) + "\n")
    return {"prosqa": root / "prosqa.json", "arc": root / "arc.jsonl"}


def _run(argv: list[str], tmp_path: Path, capsys) -> tuple[int, str]:
    rc = evaluate.main([*argv, "--out", str(tmp_path / "out")])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["liu", "hf_base"])
def test_gsm8k_defaults_on_a_short_context_are_an_error_naming_the_flag(exports, gpt2_tokenizer_dir, tmp_path,
                                                                       capsys, kind):
    rc, err = _run(["gsm8k", "--model", str(exports[kind]), "--limit", "2", "--tokenizer", str(gpt2_tokenizer_dir)],
                   tmp_path, capsys)
    assert rc == 2 and err.startswith("error: ") and "IndexError" not in err
    assert "--max-new-tokens 256" in err and "128 positions" in err and "at most" in err


def test_gsm8k_prompts_longer_than_the_context_keep_their_end(exports, gpt2_tokenizer_dir, tmp_path, capsys,
                                                             caplog):
    rc, _ = _run(["gsm8k", "--model", str(exports["liu"]), "--limit", "2", "--max-new-tokens", "16",
                  "--tokenizer", str(gpt2_tokenizer_dir)], tmp_path, capsys)
    assert rc in (0, 1)  # ran (1 = nothing correct, which a random tiny model may well score)
    records = json.loads((tmp_path / "out" / "gsm8k.json").read_text())["results"]["liu"]["records"]
    assert all(r["prompt_tokens"] <= 128 - 16 for r in records)
    assert "2 of 2 prompts are longer than" in caplog.text


def test_reasoning_default_budget_on_a_short_context_is_an_error(exports, gpt2_tokenizer_dir, files, tmp_path,
                                                                 capsys):
    rc, err = _run(["reasoning", "--task", "prosqa", "--model", str(exports["liu"]), "--data", str(files["prosqa"]),
                    "--tokenizer", str(gpt2_tokenizer_dir)], tmp_path, capsys)
    assert rc == 2 and "--max-new-tokens 128" in err and "128 positions" in err


def test_reasoning_long_prompts_keep_their_end(exports, gpt2_tokenizer_dir, files, tmp_path, capsys, caplog):
    rc, _ = _run(["reasoning", "--task", "prosqa", "--model", str(exports["h1"]), "--data", str(files["prosqa"]),
                  "--tokenizer", str(gpt2_tokenizer_dir), "--max-new-tokens", "8"], tmp_path, capsys)
    assert rc in (0, 1) and "prompts are longer than" in caplog.text


def test_ppl_at_k_beyond_the_context_names_k(exports, shard_dir, tmp_path, capsys):
    rc, err = _run(["ppl-at-k", "--model", str(exports["liu"]), "--data", str(shard_dir), "--k", "200",
                    "--limit", "2"], tmp_path, capsys)
    assert rc == 2 and "--k 200" in err and "128 positions" in err


def test_mc_continuation_beyond_the_context_is_an_error(exports, gpt2_tokenizer_dir, files, tmp_path, capsys):
    rc, err = _run(["mc", "--model", str(exports["liu"]), "--task", f"arc_easy={files['arc']}",
                    "--tokenizer", str(gpt2_tokenizer_dir)], tmp_path, capsys)
    assert rc == 2 and "128 positions" in err and "IndexError" not in err


def test_diagnostics_long_task_prompts_keep_their_end(exports, gpt2_tokenizer_dir, files, tmp_path, capsys, caplog):
    rc, _ = _run(["diagnostics", "--model", str(exports["liu"]), "--task", "prosqa", "--task-file", str(files["prosqa"]),
                  "--tokenizer", str(gpt2_tokenizer_dir), "--sites", "2"], tmp_path, capsys)
    assert rc == 0 and "prompts cut to their last" in caplog.text


def test_lm_eval_generation_truncates_the_context_and_refuses_an_impossible_budget(exports, gpt2_tokenizer_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from pipeline.eval.lm_eval_adapter import DualLM

    lm = DualLM(pretrained=str(exports["liu"]), tokenizer=str(gpt2_tokenizer_dir), device="cpu")
    long = " ".join(["The wumpus is a yumpus."] * 60)

    def req(max_gen: int) -> Instance:
        return Instance(request_type="generate_until", doc={}, idx=0,
                        arguments=(long, {"until": ["\n\n"], "max_gen_toks": max_gen}))

    [text] = lm.generate_until([req(4)])
    assert isinstance(text, str)
    with pytest.raises(PipelineError, match="max_gen_toks 300 does not fit .* 128 positions"):
        lm.generate_until([req(300)])


def test_generate_with_a_prompt_beyond_the_positions_is_a_clear_error():
    from pipeline.dual import augment_and_generate
    from pipeline.dual.inference import augment_and_generate_batch
    from pipeline.models.generate import generate

    from .conftest import tiny_dual

    dual = tiny_dual("liu")
    long = torch.randint(3, 1000, (1, 200))
    with pytest.raises(PipelineError, match="a prompt of 200 tokens does not fit the model's 128 positions"):
        augment_and_generate(dual, long, max_new_tokens=4)
    with pytest.raises(PipelineError, match="a prompt of 200 tokens"):
        augment_and_generate_batch(dual, [long[0].tolist()], max_new_tokens=4)
    with pytest.raises(PipelineError, match="beyond the model's 128 positions"):
        generate(dual.base, long, max_new_tokens=4, use_cache=False)
    assert augment_and_generate(dual, long[:, -125:], max_new_tokens=1).shape == (1, 1)  # the longest that fits
