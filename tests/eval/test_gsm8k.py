"""GSM8K: answer extraction, malformed files, and the generation path (augment once, greedy)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.data.tokenizer import load_tokenizer
from pipeline.dual import augment_and_generate, load_dual
from pipeline.errors import PipelineError
from pipeline.eval import gsm8k as g8
from pipeline.eval.models import load_eval_model
from pipeline.eval.runner import run_gsm8k


@pytest.mark.parametrize("text,want", [
    ("She pays 3 * 2 = <<3*2=6>>6 dollars.\n#### 1,234", "1234"),
    ("#### -7", "-7"),
    ("The loss is #### -12.50 dollars", "-12.5"),
    ("#### 0.25", "0.25"),
    ("#### 5.0", "5"),
    ("First 3 apples, then 10, so the answer is 13.", "13"),  # no '####': the last number
    ("It costs $1,000,000.", "1000000"),
    ("The temperature fell to -4 degrees", "-4"),
    ("I do not know.", None),
    ("", None),
])
def test_extract_answer(text, want):
    assert g8.extract_answer(text) == want


def test_exact_match_compares_numbers_not_strings():
    assert g8.extract_answer("#### 1,234") == g8.extract_answer("so 1234.")
    assert g8.extract_answer("#### 3.50") == g8.extract_answer("3.5")
    assert g8.extract_answer("#### 35") != g8.extract_answer("3.5")


def test_cut_at_stop():
    assert g8.cut_at_stop(" 4 + 4 = 8\n#### 8\n\nQuestion: next") == " 4 + 4 = 8\n#### 8"


def test_malformed_gsm8k_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(PipelineError, match=f"{path}:2: missing field 'answer'"):
        g8.read_gsm8k(path)


def test_generation_is_augment_once_then_greedy(exports, shared_data, gpt2_tokenizer_dir, tmp_path):
    model = load_eval_model(exports["liu"])
    res = run_gsm8k([model], out=tmp_path, test_file=str(shared_data / "gsm8k" / "test.jsonl"),
                    train_file=str(shared_data / "gsm8k" / "train.jsonl"), shots=1, limit=2, max_new_tokens=6)
    r = res["results"]["liu"]
    assert r["n"] == 2 and len(r["records"]) == 2
    assert r["records"][0]["gold"] == "18"  # Janet's ducks
    # replay question 0: same seeded shot, prompt, augmentation at its end, greedy decoding
    tok = load_tokenizer(gpt2_tokenizer_dir)
    train = g8.read_gsm8k(shared_data / "gsm8k" / "train.jsonl")
    test = g8.read_gsm8k(shared_data / "gsm8k" / "test.jsonl")
    import random

    shot = random.Random(0).sample(train, 1)
    ids = tok.encode_batch([g8.build_prompt(shot, test[0]["question"])])[0][-(model.last_site(6) + 1):]
    new = augment_and_generate(load_dual(exports["liu"]), torch.tensor([ids]), max_new_tokens=6,
                               temperature=0, eos_token_id=tok.eos_id)[0].tolist()
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    assert r["records"][0]["generation"] == g8.cut_at_stop(tok.decode(new))
    assert r["records"][0]["prompt_tokens"] == len(ids)
    assert r["exact_match"] == sum(x["correct"] for x in r["records"]) / 2
    assert "exact match" in (tmp_path / "gsm8k.md").read_text()
