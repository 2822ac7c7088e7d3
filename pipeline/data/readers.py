"""Corpus readers: turn `--input` specs into a stream of documents, one record at a time.

Formats: jsonl / json / parquet / txt files (plain, `.gz`, `.zst`), a directory saved with
`datasets.Dataset.save_to_disk`, and `builtin:pydocs` (English text from the documentation
bundled with this Python, so examples need no download). Everything streams except `.json`
(a JSON document must be parsed whole) and `txt` in `file` unit (a file is one document).

Each source's records are numbered from 1 (the line for jsonl, the element for json, the row
for parquet / datasets, the file / paragraph / line for txt). `keep(source_index, record)`
lets a partition skip records it does not own before parsing them.

Bad records raise `PipelineError` naming file and record, or, with `on_error="skip"`, are
counted in `Skips` by reason and left out.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
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
    machine; it defines document order, shard contents and partition ownership.
    """
    if not specs:
        raise PipelineError("no --input given; pass files, globs, a dataset dir or builtin:pydocs")
    out: list[Source] = []
    seen: set[str] = set()

    def add(src: Source) -> None:
        if src.path not in seen:
            seen.add(src.path)
            out.append(src)

    for spec in specs:
        if spec == BUILTIN_PYDOCS:
            add(Source(spec, "builtin"))
            continue
        if spec.startswith("builtin:"):
            raise PipelineError(f"unknown builtin corpus {spec!r}; the only one is {BUILTIN_PYDOCS}")
        matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
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


class Reader:
    """Streams `(text, source_index, record)` from sources, applying the error policy."""

    def __init__(
        self,
        sources: list[Source],
        text_key: str = "text",
        on_error: str = "fail",
        txt_unit: str = "file",
        keep: KeepFn | None = None,
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
        for i, src in enumerate(self.sources):
            reader = getattr(self, f"_read_{src.kind}")
            try:
                yield from reader(i, src)
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
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
            return io.BufferedReader(stream, buffer_size=1 << 20)  # type: ignore[arg-type]
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
                if self._owned(i, rec) and (text := self._decode(b"".join(buf), f"{src}:{start}")):
                    yield text.rstrip("\n"), i, rec
                buf = []
        if buf:
            rec += 1
            if self._owned(i, rec) and (text := self._decode(b"".join(buf), f"{src}:{start}")):
                yield text.rstrip("\n"), i, rec

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
