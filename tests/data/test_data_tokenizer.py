"""Tokenizer loading (Hugging Face dir / tokenizer.json / sentencepiece) and training."""

from __future__ import annotations

import pytest
import tokenizers

from pipeline.data.tokenizer import load_tokenizer, train_sentencepiece
from pipeline.errors import PipelineError


def test_gpt2_dir_and_file(gpt2_tokenizer_dir, texts):
    tok = load_tokenizer(gpt2_tokenizer_dir)
    assert (tok.vocab_size, tok.eos_id, tok.eos_token) == (50257, 50256, "<|endoftext|>")
    ref = tokenizers.Tokenizer.from_file(str(gpt2_tokenizer_dir / "tokenizer.json"))
    assert tok.encode_batch(texts) == [ref.encode(t).ids for t in texts]
    assert tok.decode(tok.encode_batch(texts)[1]) == texts[1]
    same = load_tokenizer(gpt2_tokenizer_dir / "tokenizer.json")
    assert same.encode_batch(texts) == tok.encode_batch(texts)
    ident = tok.identity()
    assert ident["kind"] == "huggingface" and len(ident["files"]["tokenizer.json"]) == 64
    tok.set_threads(1)  # the sequential path gives the same ids
    assert tok.encode_batch(texts) == same.encode_batch(texts)


def test_missing_or_bad_tokenizer(tmp_path, gpt2_tokenizer_dir):
    with pytest.raises(PipelineError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(PipelineError, match="not a readable sentencepiece model"):
        load_tokenizer(tmp_path / "junk.model")
    with pytest.raises(PipelineError, match="not in the vocabulary"):
        load_tokenizer(gpt2_tokenizer_dir, eos_token="<no-such-token>")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_sentencepiece(tmp_path, gsm8k, model_type):
    tok = train_sentencepiece(gsm8k[:400], tmp_path / "spm", vocab_size=600, model_type=model_type,
                              special_tokens=["<|latent|>"], threads=2)
    assert tok.vocab_size == 600 and tok.eos_token == "</s>" and tok.eos_id == 2
    ids = tok.encode_batch(["<|latent|> 12 apples", "日本"])  # unseen characters -> bytes
    assert tok._sp.id_to_piece(ids[0][0]).endswith("<|latent|>") or "<|latent|>" in [
        tok._sp.id_to_piece(i) for i in ids[0]]
    assert tok.decode(ids[1]) == "日本"
    again = load_tokenizer(tmp_path / "spm.model")
    assert again.encode_batch(gsm8k[:5]) == tok.encode_batch(gsm8k[:5])
    assert again.identity()["files"] == tok.identity()["files"]


def test_train_rejects_bad_settings(tmp_path, gsm8k):
    with pytest.raises(PipelineError, match="bpe or unigram"):
        train_sentencepiece(gsm8k[:10], tmp_path / "x", 100, model_type="wordpiece")
    with pytest.raises(PipelineError, match="sentencepiece training failed"):
        train_sentencepiece(gsm8k[:3], tmp_path / "x", 100000)
