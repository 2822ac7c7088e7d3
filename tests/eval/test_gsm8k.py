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



@pytest.mark.parametrize("kind", ["liu", "h1", "hf_base"])
def test_batched_questions_give_the_one_at_a_time_results(exports, shared_data, gpt2_tokenizer_dir, kind,
                                                          monkeypatch):
    """Zero-shot prompts differ in length (padding in every batch); a row that stops at a stop
    string early gives the text that full-length decoding, cut at the string, gives."""
    model = load_eval_model(exports[kind])
    tok = load_tokenizer(gpt2_tokenizer_dir)
    test = g8.read_gsm8k(shared_data / "gsm8k" / "test.jsonl")[:5]
    train = g8.read_gsm8k(shared_data / "gsm8k" / "train.jsonl")
    n_new = 10
    prompts = tok.encode_batch([g8.build_prompt([], row["question"]) for row in test])
    prompts = [p[-(model.last_site(n_new) + 1):] for p in prompts]
    assert len({len(p) for p in prompts}) > 1
    full = [model.generate(torch.tensor([p]), max_new_tokens=n_new, eos_token_id=tok.eos_id)[0].tolist()
            for p in prompts]
    full = [f[: f.index(tok.eos_id)] if tok.eos_id in f else f for f in full]
    # a stop string from the middle of question 1's generation, so that its row stops early
    stops = (tok.decode(full[1])[6:9], *g8.STOP)
    monkeypatch.setattr(g8, "STOP", stops)
    assert stops[0] in tok.decode(full[1][:-1])  # row 1 stops before its budget
    want = [g8.cut_at_stop(tok.decode(f), stops) for f in full]
    kw = dict(shots=0, max_new_tokens=n_new)
    one = g8.evaluate_gsm8k(model, tok, test, train, batch_size=1, **kw)
    assert [r["generation"] for r in one["records"]] == want
    assert [r["prompt_tokens"] for r in one["records"]] == [len(p) for p in prompts]
    assert g8.evaluate_gsm8k(model, tok, test, train, batch_size=3, **kw) == one


@pytest.mark.parametrize("kind", ["h1", "hf_base"])
def test_eval_model_generate_batch_rows_equal_generate(exports, kind):
    model = load_eval_model(exports[kind])
    prompts = [torch.randint(1, 50000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (2, 9, 30)]
    alone = [model.generate(torch.tensor([p]), max_new_tokens=8, eos_token_id=None)[0].tolist() for p in prompts]
    assert model.generate_batch(prompts, max_new_tokens=8, eos_token_id=None) == alone
    seq = alone[1][2:4]
    cut = model.generate_batch(prompts, max_new_tokens=8, eos_token_id=None, stop=[seq])
    for got, a in zip(cut, alone, strict=True):
        ends = [n for n in range(2, len(a) + 1) if a[n - 2: n] == seq]
        assert got == a[: ends[0] if ends else len(a)]
