"""Tokenizers behind one small interface: load (sentencepiece or Hugging Face), train, encode.

The data stage only needs `encode_batch`, `decode`, `vocab_size`, `eos_id` and an
`identity()` to record in the manifest, so both backends are wrapped to exactly that.
Heavy libraries are imported inside the functions that need them, to keep start-up small.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

# Tried in order when a Hugging Face tokenizer names no EOS token in its config files.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")
_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (files may be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """A loaded tokenizer: `encode_batch`, `decode`, `vocab_size`, `eos_id`, `identity()`."""

    kind: str
    path: Path
    vocab_size: int
    eos_id: int
    eos_token: str

    def __init__(self) -> None:
        self.threads = 0  # 0: the backend's default

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without any special tokens added."""
        return [self.ids(x) for x in self.encode_native(texts)]

    def encode_native(self, texts: list[str]) -> list[Any]:
        """`encode_batch` in the backend's own result objects (cheap, GIL released).

        Turning those into Python ints costs ~35 ns a token under the GIL, so a pipeline can
        do that (`ids`) in another thread while the next batch is being encoded.
        """
        raise NotImplementedError

    @staticmethod
    def ids(native: Any) -> list[int]:
        """The token ids of one `encode_native` result."""
        return native

    def flat_ids(self, native: Any, dtype: type[np.integer]) -> tuple[np.ndarray, np.ndarray]:
        """An `encode_native` batch as (all ids back to back in `dtype`, each document's length)."""
        arrays = [np.array(self.ids(x), dtype) for x in native]  # fastest list -> array path
        lengths = np.fromiter(map(len, arrays), np.int64, len(arrays))
        return (np.concatenate(arrays) if arrays else np.empty(0, dtype)), lengths

    def n_tokens(self, native: Any) -> int:
        """Tokens in an `encode_native` batch."""
        return sum(map(len, native))

    def special_strings(self) -> list[str]:
        """The special / added / control tokens' text, to test that plain text holding them
        encodes the same in every backend."""
        return []

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def files(self) -> list[Path]:
        """The files whose bytes define this tokenizer (hashed into its identity)."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What the manifest records: kind, path, sha256 of each file, vocab size, EOS."""
        return {
            "kind": self.kind,
            "path": str(Path(self.path).resolve()),  # absolute: evaluation loads it from any directory
            "files": {p.name: sha256_file(p) for p in self.files()},
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "eos_token": self.eos_token,
        }

    def set_threads(self, threads: int) -> None:
        """Threads used by `encode_batch` (0 = backend default)."""
        self.threads = threads


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (a `tokenizer.json`, or the directory holding it)."""

    kind = "huggingface"

    def __init__(self, path: Path, eos_token: str | None = None) -> None:
        super().__init__()
        import tokenizers

        self.path = path
        self.json_path = path / "tokenizer.json" if path.is_dir() else path
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.json_path))
        except Exception as e:  # the Rust error names the problem but not the file
            raise PipelineError(
                f"{self.json_path}: not a readable Hugging Face tokenizer.json ({e})"
            ) from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token = eos_token or self._configured_eos() or self._guess_eos()
        eos = self._tok.token_to_id(self.eos_token)
        if eos is None:
            raise PipelineError(
                f"{self.path}: EOS token {self.eos_token!r} is not in the vocabulary; "
                "pass --eos-token with a token that is"
            )
        self.eos_id = eos
        self._fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def _configured_eos(self) -> str | None:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            cfg = self.json_path.parent / name
            if not cfg.is_file():
                continue
            try:
                eos = json.loads(cfg.read_text()).get("eos_token")
            except (ValueError, OSError):
                continue
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and eos:
                return eos
        return None

    def _guess_eos(self) -> str:
        for cand in _EOS_CANDIDATES:
            if self._tok.token_to_id(cand) is not None:
                return cand
        raise PipelineError(
            f"{self.path}: cannot tell which token is EOS (no eos_token in its config files "
            f"and none of {', '.join(_EOS_CANDIDATES)} in the vocabulary); pass --eos-token"
        )

    def encode_native(self, texts: list[str]) -> list[Any]:
        if self.threads == 1:
            return [self._tok.encode(t, add_special_tokens=False) for t in texts]
        return self._fast(texts, add_special_tokens=False)

    @staticmethod
    def ids(native: Any) -> list[int]:
        return native.ids

    def special_strings(self) -> list[str]:
        return [t.content for t in self._tok.get_added_tokens_decoder().values()]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def files(self) -> list[Path]:
        if not self.path.is_dir():
            return [self.json_path]
        return [self.path / n for n in _HF_FILES if (self.path / n).is_file()]

    def set_threads(self, threads: int) -> None:
        """Rayon's pool size is fixed at its first use in a process, so set it early."""
        super().set_threads(threads)
        if threads > 1:
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file."""

    kind = "sentencepiece"

    def __init__(self, path: Path, eos_token: str | None = None) -> None:
        super().__init__()
        import sentencepiece as spm

        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise PipelineError(f"{path}: not a readable sentencepiece model ({e})") from e
        self.vocab_size = self._sp.get_piece_size()
        if eos_token is not None:
            eos = self._sp.piece_to_id(eos_token)
            if self._sp.id_to_piece(eos) != eos_token:
                raise PipelineError(f"{path}: EOS token {eos_token!r} is not in the vocabulary")
        else:
            eos = self._sp.eos_id()
            if eos < 0:
                raise PipelineError(
                    f"{path}: this sentencepiece model has no EOS piece; pass --eos-token"
                )
        self.eos_id = eos
        self.eos_token = self._sp.id_to_piece(eos)

    def encode_native(self, texts: list[str]) -> list[Any]:
        return self._sp.encode(texts, out_type=int, num_threads=self.threads or -1)

    def special_strings(self) -> list[str]:
        sp = self._sp
        return [sp.id_to_piece(i) for i in range(min(sp.get_piece_size(), 512))
                if sp.is_control(i) or sp.is_unknown(i)
                or (sp.id_to_piece(i).startswith("<") and sp.id_to_piece(i).endswith(">") and not sp.is_byte(i))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def files(self) -> list[Path]:
        return [self.path]


def load_tokenizer(path: str | os.PathLike, eos_token: str | None = None) -> Tokenizer:
    """Load a sentencepiece `.model`, a `tokenizer.json`, or a Hugging Face tokenizer dir."""
    p = Path(path)
    if not p.exists():
        raise PipelineError(
            f"tokenizer not found: {p}; give a sentencepiece .model file, a tokenizer.json, "
            "or a Hugging Face tokenizer directory (or train one: data-prep tokenizer train)"
        )
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return HFTokenizer(p, eos_token)
        models = sorted(p.glob("*.model"))
        if len(models) == 1:
            return SentencePieceTokenizer(models[0], eos_token)
        raise PipelineError(
            f"{p}: directory has no tokenizer.json and not exactly one *.model file; "
            "point --tokenizer at the tokenizer file itself"
        )
    if p.suffix == ".json":
        return HFTokenizer(p, eos_token)
    return SentencePieceTokenizer(p, eos_token)


def _training_sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Lines of the documents, as sentencepiece wants sentences, not whole documents."""
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            if line and len(line.encode("utf-8")) <= max_bytes:
                yield line


def train_sentencepiece(
    texts: Iterable[str],
    output_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    special_tokens: Iterable[str] = (),
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
    threads: int = 0,
    seed: int = 0,
) -> SentencePieceTokenizer:
    """Train a sentencepiece model on the lines of `texts`; writes `<prefix>.model`/`.vocab`.

    Ids 0..3 are `<unk>`, `<s>`, `</s>` (the EOS used by `build`), `<pad>`; the user's
    special tokens follow as user-defined symbols, so they are never split.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise PipelineError(f"--model-type must be bpe or unigram, not {model_type!r}")
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    max_len = 4192
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(texts, max_len),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            user_defined_symbols=list(special_tokens),
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=max_len,
            num_threads=threads or os.cpu_count() or 1,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. vocab larger than the corpus supports
        raise PipelineError(f"sentencepiece training failed: {e}") from e
    model = prefix.with_name(prefix.name + ".model")
    log.info("trained %s", model)
    return SentencePieceTokenizer(model)
