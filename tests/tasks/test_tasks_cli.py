"""`data-prep tasks ...` end to end: files that `load_examples` reads back, --stats, errors, help."""

from __future__ import annotations

import pytest

from data_prep.cli import main
from pipeline.tasks.prosqa import check_prosqa
from pipeline.tasks.schema import load_examples
from pipeline.tasks.verify import score


def run(*argv: str) -> int:
    return main(["tasks", *argv])


def test_gsm8k(tmp_path, shared_data, capsys):
    out = tmp_path / "g.json"
    assert run("gsm8k", "--split", "valid", "--n", "20", "--data-dir", str(shared_data / "gsm8k"), "-o", str(out)) == 0
    examples = load_examples(out)
    assert len(examples) == 20 and all(set(ex) == {"question", "steps", "answer"} for ex in examples)
    assert f"wrote 20 gsm8k examples (valid) to {out}" in capsys.readouterr().out


def test_prosqa_official_and_generated(tmp_path, shared_data, prosqa_official):
    d = str(shared_data / "prosqa")
    assert run("prosqa", "--split", "test", "--data-dir", d, "-o", str(tmp_path / "t.json")) == 0
    assert load_examples(tmp_path / "t.json") == prosqa_official["test"]
    for preset in ("full", "mini"):
        path = tmp_path / f"{preset}.json"
        assert run("prosqa", "--preset", preset, "--n", "30", "--seed", "2", "--data-dir", d, "-o", str(path)) == 0
        examples = load_examples(path)
        assert len(examples) == 30 and not any(check_prosqa(ex) for ex in examples)


def test_prosqa_stats_prints_the_comparison(shared_data, capsys):
    assert run("prosqa", "--stats", "--stats-n", "50", "--data-dir", str(shared_data / "prosqa")) == 0
    table = capsys.readouterr().out
    assert table.startswith("| | official valid | official test | generated full | generated mini |")
    assert "| examples | 300 | 500 | 50 | 50 |" in table


def test_countdown(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert run("countdown", "--split", "eval", "--operands", "4", "--n", "25", "--seed", "1", "-o", str(out)) == 0
    examples = load_examples(out)
    assert len(examples) == 25 and all(len(ex["numbers"]) == 4 for ex in examples)
    assert all(score("countdown", ex, f"<answer>{ex['answer']}</answer>") == 1.0 for ex in examples)
    assert "(eval, 4 operands)" in capsys.readouterr().out


def test_errors_exit_2(tmp_path, capsys):
    assert run("prosqa", "--split", "valid") == 2
    assert "error: tasks prosqa: --output is required" in capsys.readouterr().err
    assert run("gsm8k", "--data-dir", str(tmp_path), "-o", str(tmp_path / "x.json")) == 2
    assert "train.jsonl: no such file" in capsys.readouterr().err
    assert run("prosqa", "--data-dir", str(tmp_path), "-o", str(tmp_path / "x.json")) == 2
    assert "valid.json: no such file (generation reads the official" in capsys.readouterr().err
    assert run("prosqa", "--split", "valid", "--n", "999", "-o", str(tmp_path / "x.json")) == 2
    assert "error: --n 999: the split has 300 examples" in capsys.readouterr().err


@pytest.mark.parametrize("task,flags", [("gsm8k", ["--split", "--n-valid"]),
                                        ("prosqa", ["--preset", "--stats", "--split"]),
                                        ("countdown", ["--operands", "--split", "--seed"])])
def test_help_documents_each_task(task, flags, capsys):
    with pytest.raises(SystemExit) as e:
        run(task, "--help")
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(f in text for f in ["--output", "--n", *flags])
