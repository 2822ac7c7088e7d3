"""Corpus readers: turn `--input` specs into a stream of documents, one record at a time.

Formats: jsonl / json / parquet / txt files (plain, `.gz`, `.zst`), a directory saved with
`datasets.Dataset.save_to_disk`, and `builtin:pydocs` (English text from the documentation
bundled with this Python, so examples need no download). Everything streams except `.json`
(a JSON document must be parsed whole) and `txt` in `file` unit (a file is one document).

Each source's records are numbered from 1 (the line for jsonl, the element for json, the row
for parquet / datasets, the file / paragraph / line for txt). `keep(source_index, record)`
lets a partition skip records it does not own before parsing them.

Bad records raise `PipelineError` naming file and record, or, with `on_error="skip"`, are
counted in `Skips` by reason and left out. A compressed file that is truncated or corrupt is
such a bad record too (reason `corrupt_compressed_file`): the documents read before the
damage are kept, the rest of that file is skipped. Text that cannot be encoded as UTF-8 (a
lone surrogate such as `"\\ud800"` is valid JSON) and documents longer than `max_chars`
(the tokenizers' memory grows ~130 bytes a character) are bad records as well.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

BUILTIN_PYDOCS = "builtin:pydocs"
TEXT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".txt", ".text", ".md")
COMPRESSIONS = ("", ".gz", ".zst", ".zstd")
_SNIFF = 8192
MAX_CHARS = 4_000_000  # default document size limit: a long book; ~0.5 GB while tokenized

KeepFn = Callable[[int, int], bool]


@dataclass(frozen=True)
class Source:
    """One input: a file, a saved Hugging Face dataset directory, or a builtin corpus."""

    path: str
    kind: str  # jsonl | json | parquet | txt | hf_disk | builtin
    compression: str = ""  # "" | gz | zst

    def __str__(self) -> str:
        return self.path


class Skips(Counter):
    """Skipped records (or whole files) by reason; goes into the manifest."""


def _kind_of(path: str) -> tuple[str, str] | None:
    name = path.lower()
    comp = ""
    for c in (".gz", ".zst", ".zstd"):
        if name.endswith(c):
            comp, name = c.lstrip(".").replace("zstd", "zst"), name[: -len(c)]
    for suffix, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"),
                         (".parquet", "parquet"), (".txt", "txt"), (".text", "txt"),
                         (".md", "txt")):
        if name.endswith(suffix):
            return kind, comp
    return None


def resolve_inputs(specs: list[str]) -> list[Source]:
    """Expand globs / directories into an ordered, de-duplicated list of sources.

    Order is the order of `specs`, each glob's matches sorted, so it is the same on every
    machine; it defines document order, shard contents and partition ownership. A file
    reached twice (two globs, or through a symlink) is read once: sources are de-duplicated
    by their real path.
    """
    if not specs:
        raise PipelineError("no --input given; pass files, globs, a dataset dir or builtin:pydocs")
    out: list[Source] = []
    seen: set[str] = set()

    def add(src: Source) -> None:
        key = src.path if src.kind == "builtin" else os.path.realpath(src.path)
        if key not in seen:
            seen.add(key)
            out.append(src)

    for spec in specs:
        if spec == BUILTIN_PYDOCS:
            add(Source(spec, "builtin"))
            continue
        if spec.startswith("builtin:"):
            raise PipelineError(f"unknown builtin corpus {spec!r}; the only one is {BUILTIN_PYDOCS}")
        matches = _glob(spec) if glob.has_magic(spec) else [spec]
        if not matches:
            raise PipelineError(f"--input {spec!r} matches no files; check the path and quoting")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                if (p / "dataset_info.json").is_file() or (p / "state.json").is_file() or (
                    p / "dataset_dict.json"
                ).is_file():
                    add(Source(str(p), "hf_disk"))
                    continue
                files = sorted(str(f) for f in p.rglob("*") if f.is_file() and _kind_of(str(f)))
                if not files:
                    raise PipelineError(f"{p}: directory holds no corpus files ({', '.join(TEXT_SUFFIXES)})")
                for f in files:
                    kind, comp = _kind_of(f)  # type: ignore[misc]
                    add(Source(f, kind, comp))
            elif p.exists() or not glob.has_magic(spec):
                kc = _kind_of(m)
                if kc is None:
                    raise PipelineError(
                        f"{m}: unknown file type; expected one of {', '.join(TEXT_SUFFIXES)} "
                        "(optionally .gz or .zst)"
                    )
                add(Source(str(p), *kc))
    return out


def _glob(spec: str) -> list[str]:
    """Sorted matches of a glob. `**` is walked here rather than by `glob.glob`, which follows
    a symlink loop (`L/self -> ../L`) until the path is too long, matching the same files
    once per level: directories are followed through symlinks but each real directory is
    entered once. Like `glob.glob`, wildcards do not match names starting with a dot."""
    parts = spec.split(os.sep)
    if "**" not in parts:
        return sorted(glob.glob(spec))
    first_magic = next(k for k, part in enumerate(parts) if glob.has_magic(part))
    base = os.sep.join(parts[:first_magic]) or ("" if spec.startswith(os.sep) else ".")
    base = base or os.sep
    pattern = parts[first_magic:]
    matches: list[str] = []
    visited = {os.path.realpath(base)}
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        entered = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in visited:
                visited.add(real)
                entered.append(d)
        rel = os.path.relpath(dirpath, base).split(os.sep) if dirpath != base else []
        for name in [*dirnames, *filenames]:
            if _match([*rel, name], pattern):
                path = os.path.join(dirpath, name)
                matches.append(path[2:] if base == "." and not spec.startswith("./") else path)
        dirnames[:] = entered
    return sorted(matches)


def _match(path: list[str], pattern: list[str]) -> bool:
    """Does a relative path (components) match a glob pattern (components, `**` = any depth)?"""
    if not pattern:
        return not path
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        if _match(path, rest):
            return True
        return bool(path) and not path[0].startswith(".") and _match(path[1:], pattern)
    if not path or (path[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatchcase(path[0], head) and _match(path[1:], rest)


class _ZstdStream(io.RawIOBase):
    """A `.zst` file, decompressed frame after frame.

    zstandard's `stream_reader` returns the data of a file cut inside a frame as if the file
    were whole (documents silently missing); this reader raises `EOFError` instead.
    """

    def __init__(self, raw: io.BufferedIOBase) -> None:
        import zstandard

        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        while not self._out:
            data = self._raw.read(1 << 16)  # small input chunks keep the decompressed output small
            if not data:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            chunks = []
            while data:
                self._in_frame = True
                chunks.append(self._obj.decompress(data))
                data = b""
                if self._obj.eof:  # a frame ended; whatever follows starts the next one
                    data, self._in_frame = self._obj.unused_data, False
                    self._obj = self._dctx.decompressobj()
            self._out = memoryview(b"".join(chunks))
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _decompression_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return EOFError, zlib.error, zstandard.ZstdError, gzip.BadGzipFile


class Reader:
    """Streams `(text, source_index, record)` from sources, applying the error policy."""

    def __init__(
        self,
        sources: list[Source],
        text_key: str = "text",
        on_error: str = "fail",
        txt_unit: str = "file",
        keep: KeepFn | None = None,
        max_chars: int = MAX_CHARS,
    ) -> None:
        if on_error not in ("fail", "skip"):
            raise PipelineError(f"--on-error must be fail or skip, not {on_error!r}")
        if txt_unit not in ("file", "paragraph", "line"):
            raise PipelineError(f"--txt-unit must be file, paragraph or line, not {txt_unit!r}")
        self.sources = sources
        self.text_key = text_key
        self.skip = on_error == "skip"
        self.txt_unit = txt_unit
        self.keep = keep
        if max_chars < 1:
            raise PipelineError(f"--max-doc-chars must be positive, not {max_chars}")
        self.max_chars = max_chars
        self.skips = Skips()

    # -- error policy -----------------------------------------------------------------
    def _bad(self, reason: str, where: str, what: str, fix: str) -> None:
        """Fail with a precise message, or count the skip."""
        if self.skip:
            self.skips[reason] += 1
            log.debug("skip (%s) %s: %s", reason, where, what)
            return
        raise PipelineError(f"{where}: {what}; {fix} (or pass --on-error skip to skip and count it)")

    def _check_text(self, text: object, where: str) -> str | None:
        if not isinstance(text, str):
            self._bad("non_string_text", where, f"{self.text_key!r} is {type(text).__name__}, not a string",
                      "fix the record or choose the right --text-key")
            return None
        if len(text) > self.max_chars:
            self._bad("too_long", where, f"document is {len(text):,} characters, over the limit of "
                      f"{self.max_chars:,}", "split it, or raise --max-doc-chars (memory grows with it)")
            return None
        if not text.isascii():  # O(1) for ASCII strings; else a lone surrogate cannot be encoded
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                self._bad("invalid_text", where, f"text holds {text[e.start]!r} at character {e.start} "
                          "(a lone surrogate, not Unicode text)", "fix the record")
                return None
        if not text.strip():
            self._bad("empty_text", where, "document text is empty or whitespace only", "remove it")
            return None
        return text

    def _from_obj(self, obj: object, where: str) -> str | None:
        if not isinstance(obj, dict):
            self._bad("not_an_object", where, f"record is a JSON {type(obj).__name__}, not an object",
                      "each record must be an object holding the text")
            return None
        if self.text_key not in obj:
            keys = ", ".join(list(obj)[:8])
            self._bad("missing_key", where, f"no key {self.text_key!r} (keys: {keys})",
                      "pass --text-key with the field that holds the text")
            return None
        return self._check_text(obj[self.text_key], where)

    # -- streams ----------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[str, int, int]]:
        corrupt = _decompression_errors()
        for i, src in enumerate(self.sources):
            reader = getattr(self, f"_read_{src.kind}")
            n = 0
            try:
                for item in reader(i, src):
                    n += 1
                    yield item
            except corrupt as e:  # before OSError: gzip.BadGzipFile is one
                self._bad("corrupt_compressed_file", str(src),
                          f"{src.compression or 'compressed'} data is truncated or corrupt after "
                          f"{n} documents ({type(e).__name__}: {e})",
                          "re-download or recompress the file")
            except OSError as e:
                self._bad("unreadable_file", str(src), f"cannot read ({e.strerror or e})",
                          "check the path and its permissions")

    def _owned(self, i: int, rec: int) -> bool:
        return self.keep is None or self.keep(i, rec)

    def _open_binary(self, src: Source) -> io.BufferedIOBase:
        raw = open(src.path, "rb")  # noqa: SIM115 - closed by the caller's with-block
        if src.compression == "gz":
            return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
        if src.compression == "zst":
            return io.BufferedReader(_ZstdStream(raw), buffer_size=1 << 20)
        return raw

    def _looks_binary(self, src: Source, head: bytes) -> bool:
        if b"\x00" in head:
            self._bad("binary_file", str(src), "file looks binary (it holds NUL bytes), not text",
                      "remove it from --input")
            return True
        return False

    def _read_jsonl(self, i: int, src: Source) -> Iterator[tuple[str, int, int]]:
        with self._open_binary(src) as f:
            if self._looks_binary(src, f.peek(_SNIFF)[:_SNIFF] if hasattr(f, "peek") else b""):
                return
            for rec, line in enumerate(f, 1):
                if not self._owned(i, rec) or not line.strip():
                    continue
                where = f"{src}:{rec}"
                try:
                    obj = json.loads(line)
                except UnicodeDecodeError as e:
                    self._bad("invalid_utf8", where, f"invalid UTF-8 at byte {e.start}",
                              "re-encode the file as UTF-8")
                    continue
                except ValueError as e:
                    self._bad("invalid_json", where, f"broken JSON ({e})", "fix or remove the line")
                    continue
                text = self._from_obj(obj, where)
                if text is not None:
                    yield text, i, rec

    def _read_json(self, i: int, src: Source) -> Iterator[tuple[str, int, int]]:
        with self._open_binary(src) as f:
            data = f.read()
        if self._looks_binary(src, data[:_SNIFF]):
            return
        try:
            obj = json.loads(data)
        except UnicodeDecodeError as e:
            self._bad("invalid_utf8", str(src), f"invalid UTF-8 at byte {e.start}", "re-encode as UTF-8")
            return
        except ValueError as e:
            self._bad("invalid_json", str(src), f"broken JSON ({e})",
                      "fix the file (for one record per line, name it .jsonl)")
            return
        records = obj if isinstance(obj, list) else [obj]
        for rec, item in enumerate(records, 1):
            if self._owned(i, rec):
                text = self._from_obj(item, f"{src}[{rec}]")
                if text is not None:
                    yield text, i, rec

    def _read_txt(self, i: int, src: Source) -> Iterator[tuple[str, int, int]]:
        with self._open_binary(src) as f:
            if self.txt_unit == "file":
                data = f.read()
                if not self._looks_binary(src, data[:_SNIFF]) and self._owned(i, 1):
                    text = self._decode(data, str(src))
                    if text is not None and self._check_text(text, str(src)) is not None:
                        yield text, i, 1
                return
            if self._looks_binary(src, f.peek(_SNIFF)[:_SNIFF] if hasattr(f, "peek") else b""):
                return
            yield from self._txt_units(i, src, f)

    def _txt_units(self, i: int, src: Source, f: io.BufferedIOBase) -> Iterator[tuple[str, int, int]]:
        """Documents of non-blank lines: each line (`line`) or each blank-line-separated block."""
        rec, buf, start = 0, [], 0
        for lineno, line in enumerate(f, 1):
            blank = not line.strip()
            if not blank:
                if not buf:
                    start = lineno
                buf.append(line)
            if buf and (blank or self.txt_unit == "line"):
                rec += 1
                if self._owned(i, rec) and (text := self._unit(b"".join(buf), f"{src}:{start}")):
                    yield text, i, rec
                buf = []
        if buf:
            rec += 1
            if self._owned(i, rec) and (text := self._unit(b"".join(buf), f"{src}:{start}")):
                yield text, i, rec

    def _unit(self, data: bytes, where: str) -> str | None:
        text = self._decode(data, where)
        return None if text is None else self._check_text(text.rstrip("\n"), where)

    def _decode(self, data: bytes, where: str) -> str | None:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            self._bad("invalid_utf8", where, f"invalid UTF-8 at byte {e.start}", "re-encode as UTF-8")
            return None

    def _read_parquet(self, i: int, src: Source) -> Iterator[tuple[str, int, int]]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(src.path)
        except Exception as e:  # pyarrow raises its own types for corrupt files
            self._bad("unreadable_file", str(src), f"not a readable parquet file ({e})", "check the file")
            return
        if self.text_key not in pf.schema_arrow.names:
            self._bad("missing_key", str(src), f"no column {self.text_key!r} "
                      f"(columns: {', '.join(pf.schema_arrow.names[:8])})", "pass --text-key")
            return
        rec = 0
        for batch in pf.iter_batches(columns=[self.text_key], batch_size=4096):
            for value in batch.column(0).to_pylist():
                rec += 1
                if self._owned(i, rec):
                    text = self._check_text(value, f"{src} row {rec}")
                    if text is not None:
                        yield text, i, rec

    def _read_hf_disk(self, i: int, src: Source) -> Iterator[tuple[str, int, int]]:
        import datasets

        try:
            ds = datasets.load_from_disk(src.path)
        except Exception as e:
            raise PipelineError(f"{src}: datasets.load_from_disk failed ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            raise PipelineError(f"{src}: a DatasetDict; give one split's directory, e.g. {src}/train")
        if self.text_key not in ds.column_names:
            raise PipelineError(f"{src}: no column {self.text_key!r} (columns: "
                                f"{', '.join(ds.column_names[:8])}); pass --text-key")
        col = ds.select_columns([self.text_key]).with_format("arrow")
        rec = 0
        for start in range(0, len(col), 4096):
            for value in col[start : start + 4096].column(0).to_pylist():
                rec += 1
                if self._owned(i, rec):
                    text = self._check_text(value, f"{src} row {rec}")
                    if text is not None:
                        yield text, i, rec

    def _read_builtin(self, i: int, src: Source) -> Iterator[tuple[str, int, int]]:
        for rec, text in enumerate(pydocs_documents(), 1):
            if self._owned(i, rec):
                yield text, i, rec


def pydocs_documents() -> Iterator[str]:
    """`builtin:pydocs`: the help topics and the stdlib's docstrings, as English documents.

    Deterministic for a given Python: pydoc topics in key order, then one document per
    stdlib source file (sorted; tests and demos left out) joining its docstrings. Parsed
    with `ast`, never imported, so nothing runs.
    """
    import ast
    import sysconfig
    from pydoc_data.topics import topics

    for key in sorted(topics):
        if topics[key].strip():
            yield topics[key]
    root = sysconfig.get_paths()["stdlib"]
    skip_dirs = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo",
                 "lib2to3", "ensurepip", "__pycache__"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, ValueError, OSError):
                continue
            docs = [
                d for node in ast.walk(tree)
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and (d := ast.get_docstring(node))
            ]
            if docs:
                yield "\n\n".join(docs)
