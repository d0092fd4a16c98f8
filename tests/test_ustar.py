"""pipelines.core.ustar writes the bytes tarfile writes (USTAR, regular files), and says where each member's data is."""
import io
import random
import tarfile

import pytest

from pipelines.core.ustar import UstarWriter, header

NAMES = ["a.jpg", "0123456789abcdef0123456789abcdef.jpg", "x" * 100, "dir/" + "y" * 96, "d" * 60 + "/" + "z" * 60,
         "é.txt", "ünï/cödé.json", "bad-\udcff.txt", ".json", "key.with.dots.txt"]


def _with_tarfile(members, start: bytes = b"") -> bytes:
    buf = io.BytesIO()
    buf.write(start)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data, mode, mtime in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, mtime
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _with_ustar(members, start: bytes = b"") -> tuple[bytes, list[int]]:
    buf = io.BytesIO()
    buf.write(start)
    offsets = []
    with UstarWriter(buf) as w:
        for name, data, mode, mtime in members:
            offsets.append(w.add(name, data, mode=mode, mtime=mtime))
    return buf.getvalue(), offsets


@pytest.mark.parametrize("seed", range(4))
def test_same_bytes_as_tarfile_and_offsets_point_at_the_data(seed):
    rng = random.Random(seed)
    sizes = [0, 1, 511, 512, 513, 4096, 65535, 65536, 70001]
    members = [(f"v{i}/" + rng.choice(NAMES) if rng.random() < 0.3 else rng.choice(NAMES),
                rng.randbytes(rng.choice(sizes)), rng.choice([0o644, 0o444, 0o600]), rng.choice([0, 1, 1_700_000_000]))
               for i in range(rng.randint(0, 40))]
    start = rng.randbytes(rng.choice([0, 700]))  # an archive that starts after other bytes of the file
    ours, offsets = _with_ustar(members, start)
    assert ours == _with_tarfile(members, start)
    for (name, data, _m, _t), off in zip(members, offsets):
        assert ours[off:off + len(data)] == data
    with tarfile.open(fileobj=io.BytesIO(ours[len(start):]), mode="r:") as tar:
        got = [(m.name, m.offset_data + len(start)) for m in tar.getmembers()]
    assert got == [(name, off) for (name, *_), off in zip(members, offsets)]


def test_every_short_name_length_and_the_long_name_fallback():
    for n in range(1, 101):
        name = "n" * n
        info = tarfile.TarInfo(name)
        info.size, info.mode = 7, 0o644
        assert header(name, 7) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    with pytest.raises(ValueError):  # as tarfile: too long for USTAR and no '/' to split at
        header("n" * 101, 1)
