"""Tokenizer backends for `build`: the tokenizer's own library, or gigatoken where it is exact.

A tokenizer file (a Hugging Face `tokenizer.json` or a sentencepiece `.model`) defines the
ids; a *backend* is the library that computes them. `hf` and `sentencepiece` are the native
libraries of the two kinds; `gigatoken` (an optional extra: `pip install
'latent-pipeline[fast]'`) re-implements both in Rust and encodes batches into one flat id
buffer, with no Python object per token.

A backend other than the native one is used only once it has shown it reproduces the native
ids: at start on a fixed set of hard strings (whitespace runs, Unicode, empty text, the
tokenizer's own special and added tokens written as plain text, ...), and in `build` again
on the first batch of the real input. Any difference - or a tokenizer gigatoken cannot load
- falls back to the native library, with the reason logged and recorded in the manifest.
So the shards never depend on the backend: byte for byte the same whichever runs.

`auto` picks per tokenizer kind (`AUTO`), from measurement, not assumption
(`python launchers/benchmark.py data`, figures in data_prep/README.md): for GPT-2-style
byte-level BPE gigatoken is exact and many times faster than Hugging Face `tokenizers`, so
`auto` tries it. For sentencepiece models gigatoken 0.10 is not exact - a run of combining
marks normalizes differently, and a user-defined piece after a space is split differently -
so every build would fall back; `auto` keeps sentencepiece's own encoder for them without
trying (`--tokenizer-backend gigatoken` still tries, and falls back on the first difference).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from pipeline.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gigatoken", "hf", "sentencepiece")
NATIVE = {"huggingface": "hf", "sentencepiece": "sentencepiece"}
NATIVE_PACKAGE = {"hf": "tokenizers", "sentencepiece": "sentencepiece"}
AUTO = {"huggingface": "gigatoken", "sentencepiece": "sentencepiece"}
SAMPLE_CHARS = 1 << 18  # of the first input batch, encoded by both backends before trusting one
# gigatoken keeps a pretoken cache per tokenizer instance for the instance's lifetime: measured
# +60 MiB RSS over 350 MB of never-repeated Python source, still growing. A fresh instance
# every this many characters drops it, so memory stays flat in corpus size (costs ~0.5 s).
REFRESH_CHARS = 1 << 30

# Strings where tokenizer implementations tend to disagree. The tokenizer's special and added
# tokens, written as plain text in several contexts, are added per tokenizer (`hard_strings`).
HARD_STRINGS = (
    "", " ", "  ", "\n", "\t", "\r\n\r\n", "   \t \n\n   x", "x" + " " * 100 + "y", "trailing   ",
    "   leading", "a" * 3000 + " b", "new\nlines\n\n\nand\n \n spaces", "tab\tseparated\tvalues",
    "Ünïcödé naïve café Straße", "東京都 日本語のテキスト、句読点。", "한국어 텍스트", "emoji 🙂👍🏽 👨‍👩‍👧 🏳️‍🌈",
    "zero\u200bwidth no\u00a0break line\u2028sep ideo\u3000space", "ligature ﬁ ① Ⅻ ǅ", "e\u0301 a\u0308 combining",
    "'s 're 've 'll 'd 'm 't I'M DON'T", "1234567890 3.14159 1e-9 0x1F 1,000,000", "nul\x00ctl\x01\x7f",
    "<s> </s> <unk> <pad> <|endoftext|> <|im_start|> [CLS] [SEP] <mask>", "def f(x):\n    return x**2  # sq\n",
    "https://example.com/a?b=c&d=e#f", "   ", "\u0000", "\ufeffBOM text", "a\u0300\u0301\u0302\u0303",
)


@dataclass
class BackendChoice:
    """What the manifest records under `tokenizer_backend`."""

    name: str  # gigatoken | hf | sentencepiece: the backend that made the shards
    version: str | None
    requested: str
    fallback_reason: str | None = None  # why a requested or automatic gigatoken was not used

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


class GigatokenTokenizer(Tokenizer):
    """A native tokenizer's ids computed by gigatoken; identity and decoding stay the native one's."""

    def __init__(self, native: Tokenizer) -> None:
        super().__init__()
        import gigatoken

        self.native = native
        self.kind, self.path = native.kind, native.path
        self.vocab_size, self.eos_id, self.eos_token = native.vocab_size, native.eos_id, native.eos_token
        if isinstance(native, HFTokenizer):
            self._json = native.json_path.read_text(encoding="utf-8")
        elif isinstance(native, SentencePieceTokenizer):
            self._json = _sentencepiece_json(native)
        else:
            raise TypeError(f"no gigatoken loader for {type(native).__name__}")
        self._gt = gigatoken.Tokenizer.from_json(self._json)
        self._chars = 0  # encoded by this instance (see REFRESH_CHARS)

    def encode_native(self, texts: list[str]) -> Any:
        """An awkward array: one flat uint32 buffer plus document offsets."""
        import gigatoken

        if self._chars > REFRESH_CHARS:
            self._gt, self._chars = gigatoken.Tokenizer.from_json(self._json), 0
        self._chars += sum(map(len, texts))
        return self._gt.encode_batch(texts, parallel=self.threads != 1)

    def flat_ids(self, native: Any, dtype: type[np.integer]) -> tuple[np.ndarray, np.ndarray]:
        layout = native.layout
        offsets = np.asarray(layout.offsets.data, np.int64)
        flat = np.asarray(layout.content.data)[offsets[0] : offsets[-1]]
        return flat.astype(dtype, copy=False), np.diff(offsets)

    def n_tokens(self, native: Any) -> int:
        offsets = native.layout.offsets.data
        return int(offsets[-1] - offsets[0])

    def decode(self, ids) -> str:
        return self.native.decode(ids)

    def files(self):
        return self.native.files()

    def identity(self) -> dict[str, Any]:
        return self.native.identity()

    def special_strings(self) -> list[str]:
        return self.native.special_strings()

    def set_threads(self, threads: int) -> None:
        super().set_threads(threads)
        self.native.set_threads(threads)  # rayon reads RAYON_NUM_THREADS, as for Hugging Face


def _sentencepiece_json(native: SentencePieceTokenizer) -> str:
    """gigatoken's tokenizer.json for a `.model`, with sentencepiece's control pieces (`<s>`,
    `</s>`, `<pad>`) no longer matched in text: gigatoken 0.10's `from_sentencepiece` lists them
    as special added tokens, so `"<s>"` written in a document became id 1, where sentencepiece
    (and so our shards) spell it out. User-defined pieces stay matched, as in sentencepiece."""
    import json

    # the converter from_sentencepiece itself uses (gigatoken is pinned to 0.10.*)
    from gigatoken._load.sentencepiece import sentencepiece_to_tokenizer_json

    config = json.loads(sentencepiece_to_tokenizer_json(native.path.read_bytes()))
    sp = native._sp
    config["added_tokens"] = [t for t in config.get("added_tokens", []) if not sp.is_control(t["id"])]
    return json.dumps(config)


def hard_strings(tok: Tokenizer) -> list[str]:
    """`HARD_STRINGS` plus the tokenizer's special/added tokens as text: alone, inside words,
    between spaces and newlines, doubled."""
    out = list(HARD_STRINGS)
    for s in tok.special_strings():
        out += [s, f"x{s}y", f" {s} ", f"a {s}b", f"{s}{s}", f"line\n{s}\nnext", f"{s[:-1]}", f"<{s}>"]
    return out


def exactness_problem(native: Tokenizer, fast: Tokenizer, texts: list[str], what: str) -> str | None:
    """None when `fast` gives exactly `native`'s ids for every text, else the first difference."""
    want = native.encode_batch(texts)
    flat, lengths = fast.flat_ids(fast.encode_native(texts), np.int64)
    ends = np.cumsum(lengths)
    for i, (text, ids) in enumerate(zip(texts, want, strict=True)):
        got = flat[ends[i] - lengths[i] : ends[i]].tolist() if i < len(lengths) else None
        if got != ids:
            package = NATIVE_PACKAGE[NATIVE[native.kind]]
            return (f"gigatoken and {package} give different ids for {what} {text[:60]!r}: "
                    f"{(got or [])[:8]} (gigatoken) vs {ids[:8]} ({package})")
    return None


def _native_choice(native: Tokenizer, requested: str, reason: str | None) -> tuple[Tokenizer, BackendChoice]:
    name = NATIVE[native.kind]
    return native, BackendChoice(name, package_version(NATIVE_PACKAGE[name]), requested, reason)


def fall_back(native: Tokenizer, requested: str, reason: str) -> tuple[Tokenizer, BackendChoice]:
    """The native library instead of gigatoken, saying why."""
    tok, choice = _native_choice(native, requested, reason)
    log.warning("tokenizer backend: using %s instead of gigatoken: %s", choice.name, reason)
    return tok, choice


def choose_backend(native: Tokenizer, requested: str = "auto") -> tuple[Tokenizer, BackendChoice]:
    """The tokenizer `build` should encode with, and what to record about it.

    `hf` / `sentencepiece` must name the tokenizer's own kind; `gigatoken` (or `auto` for a kind
    where gigatoken is the faster) is used only when installed, loadable and exact on
    `hard_strings`. An explicitly requested gigatoken that is not installed is an error; every
    other way gigatoken cannot serve falls back to the native library with a warning.
    """
    if requested not in BACKENDS:
        raise PipelineError(f"--tokenizer-backend must be one of {', '.join(BACKENDS)}, not {requested!r}")
    own = NATIVE[native.kind]
    if requested in NATIVE_PACKAGE:
        if requested != own:
            raise PipelineError(f"--tokenizer-backend {requested}: {native.path} is a {native.kind} tokenizer; "
                                f"use {own}, gigatoken or auto")
        return _native_choice(native, requested, None)
    if requested == "auto" and AUTO[native.kind] != "gigatoken":
        return _native_choice(native, requested, None)
    gt_version = package_version("gigatoken")
    if gt_version is None:
        if requested == "gigatoken":
            raise PipelineError("--tokenizer-backend gigatoken: gigatoken is not installed; "
                                "pip install 'latent-pipeline[fast]' (or gigatoken==0.10.*), or use auto")
        log.info("tokenizer backend: gigatoken is not installed; using %s", own)
        return _native_choice(native, requested, "gigatoken is not installed")
    try:
        fast = GigatokenTokenizer(native)
    except Exception as e:  # gigatoken raises its own RuntimeErrors for unsupported configurations
        return fall_back(native, requested, f"gigatoken cannot load {native.path} ({str(e).splitlines()[0]})")
    problem = exactness_problem(native, fast, hard_strings(native), "the hard string")
    if problem:
        return fall_back(native, requested, problem)
    return fast, BackendChoice("gigatoken", gt_version, requested)


def sample_of(texts: list[str], chars: int = SAMPLE_CHARS) -> list[str]:
    """The first documents of a batch, up to about `chars` characters."""
    out, size = [], 0
    for t in texts:
        if size >= chars:
            break
        out.append(t)
        size += len(t)
    return out
