"""Readers of raw (url, caption) lists: Parquet, CSV, TSV and JSONL (optionally gzip), local or s3://.

Two steps: :func:`resolve_inputs` checks every file before any work starts (exists, readable, right format,
the url/caption columns present) and raises :class:`InputError` with one line naming the file and what was
expected; :func:`read_batches` then streams rows in batches. A record that cannot be decoded (bad UTF-8, a
JSON line that is not an object, a short CSV row) is not an error: it comes out with a ``bad`` reason so the
curation stage rejects it and the funnel still adds up.
"""
from __future__ import annotations

from pipelines.core.errors import ClipError

import csv
import gzip
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = ("parquet", "csv", "tsv", "jsonl")
csv.field_size_limit(sys.maxsize)  # huge captions are rejected by the length filter, not by the parser


class InputError(ClipError, ValueError):
    """A user-facing problem with an input file (one line: file, row/column, what was expected)."""


@dataclass(frozen=True)
class InputFile:
    uri: str
    index: int  # position in the sorted input list: the first half of every row's order key
    fmt: str
    gzip: bool
    url_col: str
    caption_col: str
    columns: tuple[str, ...] | None = None  # names for a header-less CSV/TSV, in file order
    size: int = 0


class RawBatch:
    """A slice of one input file. ``rows[i]`` is the 1-based data row (or line) of record i in the file.

    ``urls`` and ``captions`` are lists; a reader that has the columns as Arrow string arrays already (Parquet)
    passes ``arrays=(urls, captions)`` instead, and the lists are only built if someone asks for them (the
    curation filters work on the arrays)."""

    def __init__(self, file_index: int, uri: str, start: int, urls: list | None = None, captions: list | None = None,
                 rows=None, bad: dict | None = None, arrays: tuple | None = None):
        self.file_index = file_index
        self.uri = uri
        self.start = start  # 0-based index of the first record of this batch among the file's records
        self.arrays = arrays
        self._urls = urls if urls is not None or arrays is not None else []
        self._captions = captions if captions is not None or arrays is not None else []
        self.rows = rows if rows is not None else []
        self.bad = bad if bad is not None else {}  # record index in batch -> reason

    def _materialize(self) -> None:
        if self.arrays is not None:
            if self._urls is None:
                self._urls = self.arrays[0].to_pylist()
            if self._captions is None:
                self._captions = self.arrays[1].to_pylist()

    @property
    def urls(self) -> list:
        if self._urls is None:
            self._urls = self.arrays[0].to_pylist()
        return self._urls

    @urls.setter
    def urls(self, value: list) -> None:
        self._materialize()
        self._urls, self.arrays = value, None  # the lists are the truth from now on

    @property
    def captions(self) -> list:
        if self._captions is None:
            self._captions = self.arrays[1].to_pylist()
        return self._captions

    @captions.setter
    def captions(self, value: list) -> None:
        self._materialize()
        self._captions, self.arrays = value, None

    def string_arrays(self) -> tuple | None:
        """(urls, captions) as Arrow string arrays when the reader gave them and no list was built from them
        since (a built list may have been changed)."""
        if self.arrays is not None and self._urls is None and self._captions is None:
            return self.arrays
        return None

    def __len__(self) -> int:
        return len(self.arrays[0]) if self.arrays is not None else len(self._urls)

    def __repr__(self) -> str:
        return f"RawBatch({self.uri!r}, file_index={self.file_index}, start={self.start}, rows={len(self)})"


_BY_NAME = ((".parquet", "parquet"), (".pq", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".txt", "tsv"),
            (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"))


def _format_from_name(name: str) -> str | None:
    for ext, f in _BY_NAME:
        if name.endswith(ext):
            return f
    return None


def _head(uri: str, n: int = 8192) -> bytes:
    with _open(uri) as f:
        return f.read(n)


def sniff_format(uri: str) -> tuple[str | None, bool, str]:
    """(format, gzip, description) from a file's first bytes: Parquet by its magic, gzip by its magic (then
    the decompressed start), JSON lines by a leading '{', CSV / TSV by UTF-8 text and the first line's delimiter;
    format None when the bytes are not a table we can read (binary content)."""
    head = _head(uri)
    if head.startswith(b"PAR1"):
        return "parquet", False, "Parquet"
    is_gz = head.startswith(b"\x1f\x8b")
    if is_gz:
        import zlib

        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 8192)
        except zlib.error:
            return None, True, "damaged gzip data"
    if not head.strip():
        return None, is_gz, "an empty file"
    text = head.decode("utf-8", errors="replace")
    odd = sum(1 for ch in text if ch == "\ufffd" or (ord(ch) < 32 and ch not in "\t\r\n\x0c"))
    if b"\x00" in head or odd > max(4, len(text) // 20):  # a few bad bytes are row-level errors, not binary
        return None, is_gz, "binary content (not text)"
    first = text.lstrip("\ufeff \t\r\n")
    if first.startswith("{"):
        return "jsonl", is_gz, "JSON lines"
    line = first.splitlines()[0] if first else ""
    return ("tsv" if "\t" in line else "csv"), is_gz, "delimited text"


def detect_format(uri: str, fmt: str | None = None) -> tuple[str, bool]:
    """The format of an input file: ``fmt`` when given, else from its content, checked against its name."""
    name = uri.lower()
    if fmt:
        if fmt not in FORMATS:
            raise InputError(f"{uri}: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
        return fmt, name.endswith(".gz")
    by_name = _format_from_name(name[:-3] if name.endswith(".gz") else name)
    found, is_gz, what = sniff_format(uri)
    if found is None:
        expected = f" for a .{by_name} file" if by_name else ""
        raise InputError(f"{uri}: not a readable table: {what}{expected}; expected Parquet, CSV, TSV or JSON lines "
                         f"(optionally gzip-compressed)")
    if found == "parquet" or by_name is None:
        return found, is_gz
    if by_name == "parquet":
        raise InputError(f"{uri}: not a readable Parquet file (no PAR1 magic; the content looks like {what})")
    if by_name == "jsonl" and found != "jsonl":
        raise InputError(f"{uri}: not JSON lines (the first line does not start with '{{'; it looks like {what})")
    return (by_name if found != "jsonl" else "jsonl"), is_gz


def _open(uri: str):
    if uri.startswith("s3://"):
        from pipelines.core import storage

        try:
            return storage.open_read(uri)
        except storage.StorageError as exc:
            raise InputError(str(exc)) from None
    try:
        return open(uri, "rb")
    except FileNotFoundError:
        raise InputError(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{uri}: is a directory, expected a file") from None
    except PermissionError:
        raise InputError(f"{uri}: permission denied") from None


def _expand(patterns: list[str]) -> list[str]:
    import glob

    out: list[str] = []
    for pattern in patterns:
        if pattern.startswith("s3://"):
            from pipelines.core import storage

            found = storage.expand([pattern])
        elif any(ch in pattern for ch in "*?["):
            found = sorted(glob.glob(pattern, recursive=True))
        elif os.path.isdir(pattern):
            found = sorted(os.path.join(root, f) for root, _dirs, files in os.walk(pattern) for f in files
                           if not f.startswith((".", "_")))
        else:
            found = [pattern]
        if not found:
            raise InputError(f"{pattern}: no input files match")
        out.extend(found)
    return sorted(dict.fromkeys(out))


def _size(uri: str) -> int:
    if uri.startswith("s3://"):
        return -1
    try:
        return os.path.getsize(uri)
    except OSError:
        raise InputError(f"{uri}: no such file") from None


def _text_stream(raw, is_gz: bool):
    if is_gz:
        raw = gzip.GzipFile(fileobj=raw)
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad record is found and rejected
    # instead of the whole file failing.
    return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")


def _valid_utf8(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _repair(s: str) -> str:
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _peek_header(inp: InputFile) -> list[str]:
    with _open(inp.uri) as raw:
        stream = _text_stream(raw, inp.gzip)
        try:
            reader = csv.reader(stream, delimiter="," if inp.fmt == "csv" else "\t",
                                quoting=csv.QUOTE_MINIMAL if inp.fmt == "csv" else csv.QUOTE_NONE)
            header = next(reader, None)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InputError(f"{inp.uri}: cannot read ({exc})") from None
    if header is None:
        raise InputError(f"{inp.uri}: empty file (expected a header row with columns "
                         f"{inp.url_col!r} and {inp.caption_col!r})")
    return header


def _check_columns(inp: InputFile, available: list[str], where: str) -> None:
    missing = [c for c in (inp.url_col, inp.caption_col) if c not in available]
    if missing:
        shown = ", ".join(repr(c) for c in available[:20]) or "none"
        raise InputError(f"{inp.uri}: {where} has no column {missing[0]!r} (found: {shown}); "
                         f"choose with --url-col/--caption-col" + ("" if inp.fmt == "parquet" or inp.fmt == "jsonl"
                                                                  else " or name header-less columns with --columns"))


def check_input(inp: InputFile) -> None:
    """Raise InputError if the file cannot be read as its format with the needed columns."""
    if inp.size == 0:
        raise InputError(f"{inp.uri}: empty file (0 bytes)")
    if inp.fmt == "parquet":
        with _open(inp.uri) as raw:
            try:
                schema = pq.ParquetFile(raw).schema_arrow
            except (pa.ArrowInvalid, OSError) as exc:
                raise InputError(f"{inp.uri}: not a readable Parquet file ({exc})") from None
        _check_columns(inp, schema.names, "the Parquet schema")
        for col in (inp.url_col, inp.caption_col):
            t = schema.field(col).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
                    or pa.types.is_large_binary(t) or pa.types.is_null(t)):
                raise InputError(f"{inp.uri}: column {col!r} has type {t}, expected string")
    elif inp.fmt in ("csv", "tsv"):
        if inp.columns is not None:
            _check_columns(inp, list(inp.columns), "--columns")
            with _open(inp.uri) as raw:
                try:
                    if not _text_stream(raw, inp.gzip).read(1):
                        raise InputError(f"{inp.uri}: empty file")
                except (OSError, EOFError, gzip.BadGzipFile) as exc:
                    raise InputError(f"{inp.uri}: cannot read ({exc})") from None
        else:
            header = [h.strip() for h in _peek_header(inp)]
            _check_columns(inp, header, "the header row")
    else:  # jsonl: the columns must appear in the first non-empty objects
        seen: set[str] = set()
        with _open(inp.uri) as raw:
            stream = _text_stream(raw, inp.gzip)
            n = 0
            try:
                for line in stream:
                    if not line.strip():
                        continue
                    n += 1
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        obj = None
                    if isinstance(obj, dict):
                        seen.update(obj)
                    if n >= 100 or {inp.url_col, inp.caption_col} <= seen:
                        break
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise InputError(f"{inp.uri}: cannot read ({exc})") from None
        if n == 0:
            raise InputError(f"{inp.uri}: empty file (no JSON lines)")
        _check_columns(inp, sorted(seen), "the first JSON objects")


def resolve_inputs(patterns: list[str], *, url_col: str = "url", caption_col: str = "caption",
                   fmt: str | None = None, columns: list[str] | None = None) -> list[InputFile]:
    """Expand globs/directories, detect formats and check every file; raise InputError on the first problem."""
    if not patterns:
        raise InputError("no input given (use --input FILE_OR_GLOB, repeatable)")
    files = []
    for index, uri in enumerate(_expand(patterns)):
        f, is_gz = detect_format(uri, fmt)
        inp = InputFile(uri=uri, index=index, fmt=f, gzip=is_gz, url_col=url_col, caption_col=caption_col,
                        columns=tuple(columns) if columns else None, size=_size(uri))
        check_input(inp)
        files.append(inp)
    return files


def _as_str(value):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return str(value)


def read_batches(inp: InputFile, batch_rows: int = 20_000) -> Iterator[RawBatch]:
    """Stream the records of one input file in batches of at most ``batch_rows``."""
    if inp.fmt == "parquet":
        yield from _read_parquet(inp, batch_rows)
    elif inp.fmt in ("csv", "tsv"):
        yield from _read_delimited(inp, batch_rows)
    else:
        yield from _read_jsonl(inp, batch_rows)


def _finish(batch: RawBatch) -> RawBatch:
    for i, (u, c) in enumerate(zip(batch.urls, batch.captions)):
        if i in batch.bad:
            continue
        if (u is not None and not _valid_utf8(u)) or (c is not None and not _valid_utf8(c)):
            batch.bad[i] = "invalid_utf8"
            batch.urls[i] = _repair(u) if u is not None else None
            batch.captions[i] = _repair(c) if c is not None else None
    return batch


def _read_parquet(inp: InputFile, batch_rows: int) -> Iterator[RawBatch]:
    with _open(inp.uri) as raw:
        pf = pq.ParquetFile(raw)
        start = 0
        for rb in pf.iter_batches(batch_size=batch_rows, columns=[inp.url_col, inp.caption_col]):
            n = rb.num_rows
            cols = [rb.column(0), rb.column(1)]
            rows = range(start + 1, start + n + 1)
            if all(pa.types.is_string(c.type) or pa.types.is_large_string(c.type) for c in cols):
                # Arrow strings are valid UTF-8 already: nothing for _finish to find; no Python lists needed.
                batch = RawBatch(inp.index, inp.uri, start, rows=rows,
                                 arrays=tuple(c.cast(pa.string()) if pa.types.is_large_string(c.type) else c
                                              for c in cols))
            else:
                batch = _finish(RawBatch(inp.index, inp.uri, start,
                                         urls=[_as_str(v) for v in cols[0].to_pylist()],
                                         captions=[_as_str(v) for v in cols[1].to_pylist()], rows=list(rows)))
            start += n
            yield batch


def _read_delimited(inp: InputFile, batch_rows: int) -> Iterator[RawBatch]:
    delim = "," if inp.fmt == "csv" else "\t"
    quoting = csv.QUOTE_MINIMAL if inp.fmt == "csv" else csv.QUOTE_NONE
    with _open(inp.uri) as raw:
        reader = csv.reader(_text_stream(raw, inp.gzip), delimiter=delim, quoting=quoting)
        if inp.columns is None:
            header = [h.strip() for h in next(reader)]
        else:
            header = list(inp.columns)
        ui, ci = header.index(inp.url_col), header.index(inp.caption_col)
        need = max(ui, ci) + 1
        batch = RawBatch(inp.index, inp.uri, 0)
        count = 0
        try:
            for rec in reader:
                if not rec or (len(rec) == 1 and rec[0] == ""):
                    continue  # blank line: not a record
                if len(rec) < need:
                    batch.bad[len(batch.urls)] = "malformed_record"
                    batch.urls.append(rec[ui] if ui < len(rec) else None)
                    batch.captions.append(rec[ci] if ci < len(rec) else None)
                else:
                    batch.urls.append(rec[ui])
                    batch.captions.append(rec[ci])
                batch.rows.append(reader.line_num)
                count += 1
                if len(batch.urls) >= batch_rows:
                    yield _finish(batch)
                    batch = RawBatch(inp.index, inp.uri, count)
        except csv.Error as exc:
            raise InputError(f"{inp.uri}: line {reader.line_num}: {exc}") from None
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InputError(f"{inp.uri}: cannot read after line {reader.line_num} ({exc})") from None
        if batch.urls:
            yield _finish(batch)


def _read_jsonl(inp: InputFile, batch_rows: int) -> Iterator[RawBatch]:
    with _open(inp.uri) as raw:
        batch = RawBatch(inp.index, inp.uri, 0)
        count = 0
        line_no = 0
        try:
            for line in _text_stream(raw, inp.gzip):
                line_no += 1
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict):
                    batch.bad[len(batch.urls)] = "malformed_record"
                    batch.urls.append(None)
                    batch.captions.append(_repair(line.strip())[:1000])
                else:
                    batch.urls.append(_as_str(obj.get(inp.url_col)))
                    batch.captions.append(_as_str(obj.get(inp.caption_col)))
                batch.rows.append(line_no)
                count += 1
                if len(batch.urls) >= batch_rows:
                    yield _finish(batch)
                    batch = RawBatch(inp.index, inp.uri, count)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InputError(f"{inp.uri}: cannot read after line {line_no} ({exc})") from None
        if batch.urls:
            yield _finish(batch)
