"""pipelines.crawl.processes: the crawl's worker processes and its image helpers never import torch (webdataset
imports it when it is installed) nor img2dataset's package ``__init__`` (all of img2dataset), and the distributor
still runs every shard and retries failed ones like img2dataset's."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.crawl.image_helper import ImageHelperPool, SharedHelpers
from pipelines.crawl.processes import multiprocessing_distributor
from pipelines.crawl.processing import PixelLimitResizer, ProcessingSettings, process_body


class _Probe:
    """A picklable stand-in for img2dataset's downloader: imports what a crawl worker imports, records whether torch
    came with it, and fails each shard listed in ``fail_once`` on its first attempt."""

    def __init__(self, out: str, fail_once: tuple = ()):
        self.out, self.fail_once = out, fail_once

    def __call__(self, shard):
        import webdataset

        import pipelines.crawl.worker  # noqa: F401 - img2dataset, webdataset, Pillow, OpenCV...

        key, _name = shard
        attempts = sorted(Path(self.out).glob(f"{key}-*.json"))
        Path(self.out, f"{key}-{len(attempts)}.json").write_text(json.dumps(
            {"torch": "torch" in sys.modules, "i2d_main": "img2dataset.main" in sys.modules, "dataset_base": webdataset.pytorch.IterableDataset.__module__}))
        if key in self.fail_once and not attempts:
            return False, shard
        return True, shard


def test_crawl_worker_processes_do_not_import_torch_and_failed_shards_are_retried(tmp_path):
    shards = [(i, f"shard-{i}") for i in range(7)]  # more than one worker's 5 tasks: a replaced worker too
    multiprocessing_distributor(2, _Probe(str(tmp_path), fail_once=(3,)), iter(shards), 1000, 2)
    seen = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert sorted(seen) == sorted([f"{i}-0.json" for i in range(7)] + ["3-1.json"])
    assert all(not v["torch"] and not v["i2d_main"] for v in seen.values())
    assert all(v["dataset_base"] == "webdataset.pytorch" for v in seen.values())  # webdataset's stand-in


def test_the_same_imports_bring_torch_into_a_plain_process():
    """The control: without the initializer, importing what a crawl worker imports loads torch."""
    code = "import sys, pipelines.crawl.worker; print('torch' in sys.modules and 'img2dataset.main' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]


def _mapped(pid: int, name: str) -> bool:
    return name in Path(f"/proc/{pid}/maps").read_text()


def test_image_helpers_do_not_import_torch(tmp_path):
    """(They never did, since their start imports only img2dataset's resizer; this keeps it so.)"""
    from img2dataset.resizer import Resizer

    settings = ProcessingSettings(
        resizer=PixelLimitResizer(Resizer(image_size=64, resize_mode="keep_ratio_largest", resize_only_if_bigger=True,
                                          encode_quality=95, encode_format="jpg", min_image_size=0,
                                          max_image_area=4_000_000), 4_000_000),
        max_image_pixels=4_000_000, compute_hash="sha256", hash_images=True)
    arr = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    shared = SharedHelpers(settings, 1)
    pool = None
    try:
        pool = ImageHelperPool(settings, 1, shared=shared.addresses)
        assert pool.wait_ready(60)
        got = pool.process(buf.getvalue())
        want = process_body(settings, buf.getvalue())
        assert (got.img, got.columns) == (want.img, want.columns)  # the helper did the work, with its settings
        (pid,) = shared.pids()
        assert _mapped(pid, "libjpeg") or _mapped(pid, "libopencv") or _mapped(pid, "cv2")  # it loaded its decoders
        assert not _mapped(pid, "libtorch")
    finally:
        if pool is not None:
            pool.close()
        shared.close()
