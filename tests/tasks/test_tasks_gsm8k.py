"""GSM8K in the task schema: Coconut's steps and answers, and a seeded valid split carved from train."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import PipelineError
from pipeline.tasks.gsm8k import load_gsm8k, to_example


def test_steps_are_the_annotations_and_the_answer_loses_its_commas():
    row = {"question": "How many?", "answer": "She pays 3 * 2 = <<3*2=6>>6.\nThen <<6*1000=6000>>6,000 in all"
                                              ".\n#### 6,000"}
    assert to_example(row) == {"question": "How many?", "steps": ["3*2=6", "6*1000=6000"], "answer": "6000"}
    assert to_example({"question": "q", "answer": "No maths.\n#### -3"}) == {
        "question": "q", "steps": [], "answer": "-3"}


def test_a_solution_without_a_final_answer_is_an_error():
    with pytest.raises(PipelineError, match="no '#### N'"):
        to_example({"question": "q", "answer": "it is 5"})


def test_splits_from_the_shared_files(shared_data):
    d = shared_data / "gsm8k"
    train, valid, test = (load_gsm8k(s, d) for s in ("train", "valid", "test"))
    assert (len(train), len(valid), len(test)) == (7473 - 500, 500, 1319)
    assert train[0]["steps"] == ["48/2=24", "48+24=72"] and train[0]["answer"] == "72"
    assert not {ex["question"] for ex in train} & {ex["question"] for ex in valid}
    assert all(ex["answer"].lstrip("-").replace(".", "").isdigit() for ex in train + valid + test)
    assert load_gsm8k("valid", d) == valid  # seeded
    other = load_gsm8k("valid", d, seed=1, n_valid=100)
    assert len(other) == 100 and other != valid[:100]


def test_bad_requests_and_files(tmp_path, shared_data):
    with pytest.raises(PipelineError, match="split 'dev'"):
        load_gsm8k("dev", shared_data / "gsm8k")
    with pytest.raises(PipelineError, match="n_valid=7473"):
        load_gsm8k("valid", shared_data / "gsm8k", n_valid=7473)
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(PipelineError, match="missing field 'answer'"):
        load_gsm8k("test", tmp_path)
