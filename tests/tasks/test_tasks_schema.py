"""The task schema (load/save, errors naming file, index and field) and the text layout."""

from __future__ import annotations

import json
import re

import pytest

from pipeline.errors import PipelineError
from pipeline.tasks.format import TASKS, answer_text, prompt_text, target_text
from pipeline.tasks.schema import load_examples, save_examples, task_of

GSM = {"question": "Q?", "steps": ["48/2=24", "48+24=72"], "answer": "72"}
CD = {"question": "Using the numbers [44, 19, 4], create an equation that equals 100.",
      "steps": ["44-19=25", "25*4=100"], "answer": "(44 - 19) * 4", "numbers": [44, 19, 4], "target": 100}
PQ = {"question": "Tom is a wumpus. Every wumpus is a lempus. Alex is a zumpus. Is Tom a lempus or zumpus?",
      "steps": ["Tom is a wumpus.", "Every wumpus is a lempus."], "answer": "Tom is a lempus.",
      "idx_to_symbol": ["Tom", "Alex", "wumpus", "lempus", "zumpus"], "edges": [[0, 2], [2, 3], [1, 4]],
      "root": 0, "target": 3, "neg_target": 4}


def test_round_trip_keeps_every_field(tmp_path):
    path = save_examples(tmp_path / "sub" / "x.json", [GSM, CD, PQ])
    assert load_examples(path) == [GSM, CD, PQ]
    assert not list(tmp_path.rglob("*.tmp"))  # the atomic write left no temporary behind


@pytest.mark.parametrize("bad,field", [
    ({"steps": [], "answer": "1"}, "question: missing"),
    ({"question": "q", "steps": "a\nb", "answer": "1"}, "steps: expected list"),
    ({"question": "q", "steps": ["a", 3], "answer": "1"}, "steps[1]: expected str"),
    ({"question": "q", "steps": [], "answer": 72}, "answer: expected str"),
    ({**CD, "numbers": [1, "2"]}, "numbers: expected a non-empty list of integers"),
    ({**CD, "target": 1.5}, "target: expected an integer"),
    ({**PQ, "edges": [[0, 9]]}, "edges: expected"),
    ({**PQ, "root": 5}, "root: expected a node index"),
    ({k: v for k, v in PQ.items() if k != "neg_target"}, "neg_target: missing"),
])
def test_load_names_file_index_and_field(tmp_path, bad, field):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([GSM, bad]))
    with pytest.raises(PipelineError, match=rf"bad\.json: example 1: .*{re.escape(field)}"):
        load_examples(path)


def test_load_rejects_non_lists_bad_json_and_missing_files(tmp_path):
    (tmp_path / "obj.json").write_text('{"question": "q"}')
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(PipelineError, match="expected a JSON list"):
        load_examples(tmp_path / "obj.json")
    with pytest.raises(PipelineError, match="not valid JSON"):
        load_examples(tmp_path / "broken.json")
    with pytest.raises(PipelineError, match="no such file"):
        load_examples(tmp_path / "absent.json")


def test_save_refuses_invalid_examples_and_writes_nothing(tmp_path):
    with pytest.raises(PipelineError, match="example 0: answer: missing"):
        save_examples(tmp_path / "x.json", [{"question": "q", "steps": []}])
    assert not (tmp_path / "x.json").exists()


def test_task_of():
    assert [task_of(x) for x in (GSM, PQ, CD)] == ["gsm8k", "prosqa", "countdown"]
    assert TASKS == ("gsm8k", "prosqa", "countdown")


def test_layout_cot_and_no_cot():
    assert prompt_text(GSM) == "Q?\n"
    assert target_text(GSM, cot=True) == "48/2=24\n48+24=72\n### 72"
    assert target_text(GSM, cot=False) == "### 72"
    assert target_text({**GSM, "steps": []}, cot=True) == "### 72"
    assert target_text(PQ, cot=True).endswith("Every wumpus is a lempus.\n### Tom is a lempus.")


def test_countdown_answer_is_wrapped_in_an_answer_block():
    assert answer_text(CD) == "<answer>(44 - 19) * 4</answer>"
    assert target_text(CD, cot=True) == "44-19=25\n25*4=100\n### <answer>(44 - 19) * 4</answer>"
    assert target_text(CD, cot=False) == "### <answer>(44 - 19) * 4</answer>"
