"""Writing webdataset shards: ``pipelines.shard.tarball.write_samples`` of this checkout (pipelines.core.ustar) vs
an earlier commit's (``tarfile``), same samples, same process.

    .venv/bin/python benchmarks/tar_write_bench.py [--samples 3000] [--jpg-bytes 4000] [--baseline 264c2b4]
                                                 [--repeats 5] [--json OUT]

Samples like the shard stage's: a JPEG of ``--jpg-bytes`` random bytes, a caption, a JSON record of ~300 bytes
(three members per sample). Each variant writes the whole tar into memory ``--repeats`` times, alternating;
reported: CPU seconds per 1,000 samples (medians) and whether the two tars are byte-identical.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _baseline_module(rev: str):
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:pipelines/shard/tarball.py"], capture_output=True,
                          text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "tarball_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("tarball_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--jpg-bytes", type=int, default=4000)
    ap.add_argument("--baseline", default="264c2b4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    from pipelines.shard import tarball

    rng = random.Random(0)
    samples = [(f"{rng.getrandbits(128):032x}",
                {"jpg": rng.randbytes(args.jpg_bytes), "txt": f"a photo of thing {i}".encode(),
                 "json": json.dumps({"uid": f"{i:032x}", "caption": f"a photo of thing {i}", "entry_ids": [i, 7],
                                     "url": f"http://host{i % 100}.example/img/{i}.jpg", "width": 128,
                                     "height": 96, "phash": rng.getrandbits(63)}).encode()})
               for i in range(args.samples)]
    variants = {"baseline": _baseline_module(args.baseline).write_samples, "current": tarball.write_samples}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    out: dict[str, bytes] = {}
    for k in range(args.repeats):
        for name in (("baseline", "current") if k % 2 == 0 else ("current", "baseline")):
            buf = io.BytesIO()
            t0 = time.process_time()
            variants[name](buf, samples)
            cpu[name].append(time.process_time() - t0)
            out[name] = buf.getvalue()
    per_1000 = {name: round(1000 * statistics.median(v) / args.samples, 4) for name, v in cpu.items()}
    report = {"samples": args.samples, "jpg_bytes": args.jpg_bytes, "baseline": args.baseline,
              "cpu_s_per_1000_samples": per_1000, "ratio": round(per_1000["current"] / per_1000["baseline"], 3),
              "identical_bytes": out["baseline"] == out["current"], "tar_bytes": len(out["current"])}
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
