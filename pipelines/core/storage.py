"""One small I/O layer for local paths and ``s3://bucket/prefix`` URIs (boto3), with atomic writes and retries.

Every stage reads and writes artifacts through these functions, so a build can target a local directory or any
S3-compatible store by its URI alone. The S3 client is created WITHOUT endpoint or credential overrides unless
:func:`set_endpoint_url` names one, so boto3 itself honours ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` and the
standard credential chain. Writes are whole-or-nothing: locally a temp file in the same directory + fsync +
``os.replace``; on S3 a single PutObject, or a multipart upload whose object appears only when it completes.
Transient S3 failures are retried twice over: botocore's "standard" mode retries 5xx, throttling and connection
errors per request, and reads that stream a body re-open at the current offset when the connection drops mid-body.
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import BinaryIO, TypeVar

__all__ = [
    "StorageError", "is_s3", "split_s3", "expand", "expand_braces", "open_read", "read_bytes", "write_bytes_atomic",
    "write_file_atomic", "exists", "list_prefix", "delete", "join", "sha256_of", "set_endpoint_url", "s3_client",
    "basename", "parent", "read_table", "write_table", "table_bytes", "write_json", "read_json", "write_stream_atomic",
    "delete_prefix", "size_of",
]

T = TypeVar("T")

# Retries around whole operations, on top of botocore's per-request retries: covers bodies that drop mid-stream
# (botocore does not retry those) and a run of faults longer than botocore's attempt budget.
READ_ATTEMPTS = 8
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 2.0
MULTIPART_THRESHOLD = 64 * 1024 * 1024

_GLOB_CHARS = re.compile(r"[*?\[]")
_RANGE_BRACE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")

_endpoint_url: str | None = os.environ.get("CLIPLINE_S3_ENDPOINT_URL") or None
_client_lock = threading.Lock()
_clients: dict[tuple, object] = {}


from pipelines.core.errors import ClipError


class StorageError(ClipError, OSError):
    """A storage operation failed for a named URI (missing file, missing bucket, or retries exhausted)."""


# ----------------------------------------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> (``bucket``, ``some/key``)."""
    if not is_s3(uri):
        raise StorageError(f"{uri}: not an s3:// URI")
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in s3:// URI")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI (``/`` separated, no doubled slashes)."""
    uri = str(uri)
    if is_s3(uri):
        out = uri.rstrip("/")
        for p in parts:
            p = str(p).strip("/")
            if p:
                out = f"{out}/{p}"
        return out
    return os.path.join(uri, *[str(p) for p in parts])


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str) -> str:
    uri = str(uri).rstrip("/")
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return f"s3://{bucket}/{key.rsplit('/', 1)[0]}" if "/" in key else f"s3://{bucket}"
    return os.path.dirname(uri)


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{00000..00009}`` numeric ranges (zero padding kept) and ``{a,b,c}`` lists, as braceexpand does."""
    start = pattern.find("{")
    m = _RANGE_BRACE.match(pattern, start) if start >= 0 else None
    if m:  # the leftmost brace is a range: expand left to right, as braceexpand does
        lo_s, hi_s = m.group(1), m.group(2)
        lo, hi = int(lo_s), int(hi_s)
        width = max(len(lo_s), len(hi_s)) if lo_s.startswith("0") or hi_s.startswith("0") else 0
        step = 1 if hi >= lo else -1
        head, tail = pattern[: m.start()], pattern[m.end():]
        return [x for i in range(lo, hi + step, step) for x in expand_braces(f"{head}{i:0{width}d}{tail}")]
    if start >= 0:
        depth, end = 0, -1
        for i in range(start, len(pattern)):
            if pattern[i] == "{":
                depth += 1
            elif pattern[i] == "}":
                depth -= 1
                if depth == 0:
                    end = i
                    break
        if end > 0:
            body = pattern[start + 1:end]
            options, depth, cur = [], 0, ""
            for ch in body:
                if ch == "," and depth == 0:
                    options.append(cur)
                    cur = ""
                    continue
                depth += ch == "{"
                depth -= ch == "}"
                cur += ch
            options.append(cur)
            if len(options) > 1:
                head, tail = pattern[:start], pattern[end + 1:]
                return [x for opt in options for x in expand_braces(head + opt + tail)]
    return [pattern]


def _glob_regex(pattern: str) -> re.Pattern:
    """Translate a glob to a regex where ``*``/``?`` stay within one ``/`` segment and ``**`` crosses them."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if i < len(pattern) and pattern[i] == "/":
                i += 1  # "a/**/b" also matches "a/b"
                out = out[:-2] + "(?:.*/)?"
        elif c == "*":
            out += "[^/]*"
            i += 1
        elif c == "?":
            out += "[^/]"
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out += re.escape(c)
                i += 1
            else:
                out += fnmatch.translate(pattern[i:j + 1])[4:-3]  # the class alone, without (?s: ... )\Z
                i = j + 1
        else:
            out += re.escape(c)
            i += 1
    return re.compile(out + r"\Z", re.S)


def expand(patterns: Iterable[str] | str, *, missing_ok: bool = False) -> list[str]:
    """Every file named by ``patterns`` (braces, then globs), local or S3, sorted and without duplicates.

    A literal name that does not exist, or a glob that matches nothing, raises :class:`StorageError` naming it,
    unless ``missing_ok``.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    found: set[str] = set()
    for pattern in patterns:
        for p in expand_braces(str(pattern)):
            matches = _expand_s3(p) if is_s3(p) else _expand_local(p)
            if not matches and not missing_ok:
                what = "matches no file" if _GLOB_CHARS.search(p) else "does not exist"
                raise StorageError(f"{p}: {what}")
            found.update(matches)
    return sorted(found)


def _expand_local(p: str) -> list[str]:
    if _GLOB_CHARS.search(p):
        return [m for m in glob.glob(p, recursive=True) if os.path.isfile(m)]
    return [p] if os.path.isfile(p) else []


def _expand_s3(p: str) -> list[str]:
    bucket, key = split_s3(p)
    m = _GLOB_CHARS.search(key)
    if not m:
        return [p] if exists(p) else []
    prefix = key[: m.start()]
    rx = _glob_regex(key)
    return [f"s3://{bucket}/{k}" for k in _list_keys(bucket, prefix, p) if rx.match(k)]


# ------------------------------------------------------------------------------------------------------ S3 client


def set_endpoint_url(url: str | None) -> None:
    """Use an explicit S3 endpoint (None = let boto3 read AWS_ENDPOINT_URL(_S3) and its config as usual)."""
    global _endpoint_url
    _endpoint_url = url or None


def s3_client(endpoint_url: str | None = None):
    """A cached boto3 S3 client with botocore's standard retry mode (10 attempts).

    Clients are cached per process and per endpoint/credential environment, so a test that points
    AWS_ENDPOINT_URL somewhere else gets a fresh client, and a forked Beam worker never reuses its parent's.
    """
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or _endpoint_url
    env = tuple(os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                                            "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION"))
    key = (os.getpid(), endpoint, env)
    with _client_lock:
        client = _clients.get(key)
        if client is None:
            config = Config(retries={"max_attempts": 10, "mode": "standard"}, connect_timeout=10, read_timeout=60)
            kwargs = {"config": config}
            if endpoint:
                kwargs["endpoint_url"] = endpoint
            # A session per client: boto3's default session is not thread-safe to create clients from.
            client = boto3.session.Session().client("s3", **kwargs)
            _clients[key] = client
        return client


def _error_code(exc: BaseException) -> str:
    resp = getattr(exc, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", ""))


def _http_status(exc: BaseException) -> int:
    resp = getattr(exc, "response", None) or {}
    return int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}


def _is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError
    from botocore.exceptions import IncompleteReadError, ResponseStreamingError

    if isinstance(exc, ClientError):
        return _error_code(exc) in _TRANSIENT_CODES or _http_status(exc) >= 500
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError)):
        return True
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover - urllib3 ships with botocore
        Urllib3Error = ()  # type: ignore[assignment]
    import http.client

    return isinstance(exc, (Urllib3Error, ConnectionError, TimeoutError, http.client.HTTPException))


def _raise_for(uri: str, exc: BaseException, action: str) -> None:
    code = _error_code(exc)
    if code == "NoSuchBucket":
        raise StorageError(f"{uri}: no such bucket ({action})") from exc
    if code in _NOT_FOUND_CODES:
        raise StorageError(f"{uri}: no such object ({action})") from exc
    if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        raise StorageError(f"{uri}: access denied ({action}: {code})") from exc
    raise StorageError(f"{uri}: {action} failed: {exc}") from exc


def _with_retries(uri: str, action: str, fn: Callable[[], T], attempts: int = READ_ATTEMPTS) -> T:
    """Run ``fn`` and retry transient failures with capped exponential backoff; other failures name ``uri``."""
    for attempt in range(attempts):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised with the URI
            if _is_transient(exc) and attempt + 1 < attempts:
                time.sleep(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** attempt))
                continue
            _raise_for(uri, exc, action)
    raise AssertionError("unreachable")


def _list_keys(bucket: str, prefix: str, uri: str) -> list[str]:
    def run() -> list[str]:
        keys = []
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys

    return _with_retries(uri, "list", run)


# ---------------------------------------------------------------------------------------------------------- reads


class _S3RangeReader(io.RawIOBase):
    """A seekable raw stream over one S3 object; a dropped body re-opens at the current offset (same ETag)."""

    def __init__(self, uri: str):
        super().__init__()
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        head = _with_retries(uri, "head", lambda: s3_client().head_object(Bucket=self.bucket, Key=self.key))
        self.size = int(head["ContentLength"])
        self.etag = head.get("ETag")
        self.pos = 0
        self._body = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        new = max(0, base + offset)
        if new != self.pos:
            self._drop_body()
            self.pos = new
        return self.pos

    def _drop_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # noqa: BLE001 - closing a broken stream may fail; it is discarded anyway
                pass
            self._body = None

    def _open_body(self):
        kwargs = {"Bucket": self.bucket, "Key": self.key, "Range": f"bytes={self.pos}-"}
        if self.etag:
            kwargs["IfMatch"] = self.etag  # never splice bytes of two versions of the object
        return s3_client().get_object(**kwargs)["Body"]

    def readinto(self, buf) -> int:
        want = len(buf)
        if want == 0 or self.pos >= self.size:
            return 0

        def read_some() -> bytes:
            if self._body is None:
                self._body = self._open_body()
            try:
                chunk = self._body.read(min(want, self.size - self.pos))
            except Exception:
                self._drop_body()
                raise
            if not chunk:  # the server closed early without an error: re-open at this offset
                self._drop_body()
                raise ConnectionError(f"{self.uri}: body ended at byte {self.pos} of {self.size}")
            return chunk

        chunk = _with_retries(self.uri, "read", read_some)
        n = len(chunk)
        buf[:n] = chunk
        self.pos += n
        return n

    def close(self) -> None:
        self._drop_body()
        super().close()


def open_read(uri: str, buffer_size: int = 1024 * 1024) -> BinaryIO:
    """A binary, seekable file object; S3 objects stream (ranged GETs) and survive dropped connections."""
    uri = str(uri)
    if is_s3(uri):
        return io.BufferedReader(_S3RangeReader(uri), buffer_size=buffer_size)  # type: ignore[return-value]
    try:
        return open(uri, "rb")
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise StorageError(f"{uri}: is a directory, expected a file") from None


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as f:
        return f.read()


def exists(uri: str) -> bool:
    uri = str(uri)
    if not is_s3(uri):
        return os.path.exists(uri)
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)

    def head() -> bool:
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES or _http_status(exc) == 404:
                return False
            raise

    return _with_retries(uri, "head", head)


def list_prefix(uri: str) -> list[str]:
    """Every file under a directory / S3 prefix (recursive), as full paths or URIs, sorted.

    An S3 prefix is treated as a directory (``s3://b/p`` lists keys under ``p/``); a missing local directory
    or bucket raises :class:`StorageError`; an empty or absent S3 prefix lists nothing.
    """
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        return sorted(f"s3://{bucket}/{k}" for k in _list_keys(bucket, prefix, uri))
    if not os.path.isdir(uri):
        raise StorageError(f"{uri}: no such directory")
    out = []
    for root, _dirs, files in os.walk(uri):
        out.extend(os.path.join(root, f) for f in files)
    return sorted(out)


def size_of(uri: str) -> int:
    """Size in bytes of a file / object."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        head = _with_retries(uri, "head", lambda: s3_client().head_object(Bucket=bucket, Key=key))
        return int(head["ContentLength"])
    try:
        return os.path.getsize(uri)
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None


_LOCAL_SHA256: dict[tuple, str] = {}  # (path, device, inode, size, mtime, ctime) -> digest, per process


def sha256_of(uri: str, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, streamed. A local file's digest is remembered for this process while its inode,
    size and change times stay the same (a stage's fingerprint, its lineage and the curation cache all ask)."""
    key = None
    if not is_s3(uri):
        try:
            st = os.stat(uri)
            key = (os.path.abspath(uri), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            key = None
        if key in _LOCAL_SHA256:
            return _LOCAL_SHA256[key]
    h = hashlib.sha256()
    with open_read(uri) as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    digest = h.hexdigest()
    if key is not None:
        if len(_LOCAL_SHA256) > 100_000:
            _LOCAL_SHA256.clear()
        _LOCAL_SHA256[key] = digest
    return digest


# --------------------------------------------------------------------------------------------------------- writes


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def _local_atomic(path: str, fill: Callable[[BinaryIO], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` whole or not at all (temp + fsync + rename locally; one PutObject on S3)."""
    uri = str(uri)
    data = bytes(data)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _with_retries(uri, "put", lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    _local_atomic(uri, lambda f: f.write(data))


def write_file_atomic(uri: str, local_path: str) -> None:
    """Copy a (large) local file to ``uri`` whole or not at all; S3 uses multipart above 64 MiB."""
    uri, local_path = str(uri), str(local_path)
    if not os.path.isfile(local_path):
        raise StorageError(f"{local_path}: no such file to upload to {uri}")
    if is_s3(uri):
        from boto3.s3.transfer import TransferConfig

        bucket, key = split_s3(uri)
        cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD,
                             max_concurrency=4)
        # A multipart upload is atomic: the object appears only when CompleteMultipartUpload succeeds.
        _with_retries(uri, "upload", lambda: s3_client().upload_file(local_path, bucket, key, Config=cfg))
        return

    def copy(f: BinaryIO) -> None:
        with open(local_path, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)

    _local_atomic(uri, copy)


def copy(src: str, dst: str) -> None:
    """Copy one file whole: a hard link appearing by rename locally (no bytes copied), a server-side copy on S3,
    else through this machine (local -> S3, S3 -> local)."""
    src, dst = str(src), str(dst)
    if is_s3(src) and is_s3(dst):
        sb, sk = split_s3(src)
        db, dk = split_s3(dst)
        _with_retries(src, f"copy to {dst}", lambda: s3_client().copy({"Bucket": sb, "Key": sk}, db, dk))
        return
    if not is_s3(src) and not is_s3(dst):
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        tmp = f"{dst}.{os.getpid()}.{threading.get_ident()}.link"
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
            return
        except OSError:  # another file system, or links not allowed: copy the bytes
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    if is_s3(src):
        write_bytes_atomic(dst, read_bytes(src))
    else:
        write_file_atomic(dst, src)


def delete(uri: str) -> None:
    """Remove a file / object; absent is fine (idempotent)."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _with_retries(uri, "delete", lambda: s3_client().delete_object(Bucket=bucket, Key=key))
        return
    try:
        os.unlink(uri)
    except FileNotFoundError:
        pass


def write_stream_atomic(uri: str, fill: Callable[[BinaryIO], None]) -> None:
    """Write what ``fill(f)`` writes, whole or not at all (local: temp + rename; S3: spooled, then one upload)."""
    uri = str(uri)
    if is_s3(uri):
        with tempfile.NamedTemporaryFile(prefix="clipline-", suffix=".part") as tmp:
            fill(tmp)
            tmp.flush()
            write_file_atomic(uri, tmp.name)
        return
    _local_atomic(uri, fill)


def delete_prefix(uri: str) -> None:
    """Remove every file under a directory / prefix (absent is fine)."""
    uri = str(uri)
    if is_s3(uri):
        for u in list_prefix(uri):
            delete(u)
        return
    shutil.rmtree(uri, ignore_errors=True)


# ------------------------------------------------------------------------------------------ tables and documents


def table_bytes(table, compression: str = "zstd") -> bytes:
    """A pyarrow Table as Parquet bytes (deterministic for the same table and library version)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    return sink.getvalue().to_pybytes()


def write_table(uri: str, table, compression: str = "zstd") -> str:
    """Write a pyarrow Table as one Parquet file, atomically; returns ``uri``."""
    write_bytes_atomic(uri, table_bytes(table, compression))
    return uri


def read_table(uri: str, columns: list[str] | None = None):
    """Read one Parquet file (local or s3://) as a pyarrow Table."""
    import pyarrow.parquet as pq

    with open_read(uri) as f:
        return pq.read_table(f, columns=columns)


def write_json(uri: str, obj, *, indent: int | None = 1) -> str:
    import json

    write_bytes_atomic(uri, (json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n").encode())
    return uri


def read_json(uri: str):
    import json

    return json.loads(read_bytes(uri))
