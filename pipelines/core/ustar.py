"""Writing plain USTAR tars fast: the bytes ``tarfile`` writes (``format=USTAR_FORMAT``) for regular-file members,
without its per-member Python overhead (a ``TarInfo`` copy and a generic header builder: ~100 us per member, more
than the shard stage spends on the rest of a sample).

    with open(path, "wb") as f:
        w = UstarWriter(f)
        offset = w.add("000123.jpg", data)      # where the member's data starts in the file
        w.close()                               # end-of-archive blocks, padded to tarfile's record size

Members are regular files with uid/gid 0, empty user/group names, the given mode and mtime. A name that does not
fit the 100-byte name field is handed to ``tarfile.TarInfo.tobuf`` (which splits it into USTAR's prefix + name or
raises as ``tarfile`` would). ``tests/test_ustar.py`` checks the bytes against ``tarfile`` (names, sizes, modes,
times, the record padding), so a Python whose tarfile writes differently fails there, not in a shard.
"""
from __future__ import annotations

import tarfile
from typing import BinaryIO

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 20 blocks: tarfile pads a closed archive to a multiple of this
ENCODING, ERRORS = "utf-8", "surrogateescape"  # tarfile's defaults on a UTF-8 system


def _template() -> bytes:
    info = tarfile.TarInfo("x")
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, ENCODING, ERRORS)


# The fields that are the same for every member this module writes, taken from tarfile's own header: uid and gid
# (bytes 108-124) and everything after the checksum (typeflag "0", empty linkname, magic, empty uname/gname,
# device fields, empty prefix, padding).
_TEMPLATE = _template()
_UID_GID = _TEMPLATE[108:124]
_TAIL = _TEMPLATE[156:]
_FIXED_SUM = sum(_UID_GID) + 8 * 32 + sum(_TAIL)  # the checksum field counts as eight spaces


def _octal(n: int, digits: int) -> bytes:
    return b"%0*o\x00" % (digits - 1, n)


def header(name: str, size: int, *, mode: int = 0o644, mtime: int = 0) -> bytes:
    """The 512-byte USTAR header ``tarfile`` writes for a regular file of ``size`` bytes."""
    raw = name.encode(ENCODING, ERRORS)
    if len(raw) > 100 or not 0 <= size < 8 ** 11 or not 0 <= mtime < 8 ** 11:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = size, mode, mtime, 0, 0, "", ""
        return info.tobuf(tarfile.USTAR_FORMAT, ENCODING, ERRORS)
    name_mode = raw + b"\x00" * (100 - len(raw)) + _octal(mode & 0o7777, 8)
    size_time = _octal(size, 12) + _octal(mtime, 12)
    chksum = sum(name_mode) + sum(size_time) + _FIXED_SUM
    return name_mode + _UID_GID + size_time + b"%06o\x00 " % chksum + _TAIL


class UstarWriter:
    """Appends members to ``fileobj`` (positioned where the archive starts); see the module docstring."""

    def __init__(self, fileobj: BinaryIO):
        self.fileobj = fileobj
        try:
            self.offset = fileobj.tell()
        except (OSError, AttributeError):
            self.offset = 0
        self.closed = False

    def add(self, name: str, data: bytes, *, mode: int = 0o644, mtime: int = 0) -> int:
        """Write one member; returns the file offset of its data."""
        head = header(name, len(data), mode=mode, mtime=mtime)
        pad = -len(data) % BLOCK
        if len(data) < 65536:  # one write for a small member; no copy of a large one
            self.fileobj.write(head + data + b"\x00" * pad)
        else:
            self.fileobj.write(head)
            self.fileobj.write(data)
            self.fileobj.write(b"\x00" * pad)
        start = self.offset + len(head)
        self.offset = start + len(data) + pad
        return start

    def close(self) -> None:
        if self.closed:
            return
        end = self.offset + 2 * BLOCK
        self.fileobj.write(b"\x00" * (2 * BLOCK + (-end % RECORD)))
        self.offset = end + (-end % RECORD)
        self.closed = True

    def __enter__(self) -> UstarWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
