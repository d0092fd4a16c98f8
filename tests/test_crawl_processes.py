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


_UNPICKLE_TASK = r"""
import base64, io, json, pickle, sys
light = sys.argv[1] == "light"
if light:
    from pipelines.crawl.processes import start_crawl_process
    start_crawl_process()
downloader = pickle.loads(base64.b64decode(sys.stdin.readline()))
before = {"resizer": "img2dataset.resizer" in sys.modules, "albumentations": "albumentations" in sys.modules,
          "wandb": "wandb" in sys.modules and hasattr(sys.modules["wandb"], "init"),
          "torch": "torch" in sys.modules, "loaded": downloader.resizer.loaded}
out = downloader.resizer(io.BytesIO(base64.b64decode(sys.stdin.readline())))
print(json.dumps({"before": before, "loaded_after": downloader.resizer.loaded, "img": base64.b64encode(out[0]).decode(),
                  "size": out[1:5], "error": out[5]}))
"""


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (150, 220, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def test_a_crawl_task_carries_its_resizer_unloaded_and_the_worker_never_imports_wandb(tmp_path):
    """What a crawl worker unpickles with every shard (the round's real downloader) imports neither img2dataset's
    resizer (albumentations) nor wandb until an image is resized there; then the resizer gives the bytes a resizer
    built directly gives. The control: in a plain process the same unpickling loads wandb."""
    import base64
    import pickle

    from img2dataset.resizer import Resizer

    from pipelines.crawl import CrawlConfig
    from pipelines.crawl.engine import make_downloader, worker_settings

    config = CrawlConfig(image_size=64)
    downloader = make_downloader(config, column_list=["url", "caption", "uid"], out_dir=str(tmp_path),
                                 settings=worker_settings(config, str(tmp_path), None, None))
    body = _jpeg(3)
    direct = PixelLimitResizer(Resizer(image_size=64, resize_mode=config.resize_mode,
                                       resize_only_if_bigger=config.resize_only_if_bigger,
                                       encode_quality=config.encode_quality, encode_format=config.encode_format,
                                       min_image_size=config.min_image_size, max_image_area=config.max_image_pixels),
                               config.max_image_pixels)(io.BytesIO(body))
    stdin = base64.b64encode(pickle.dumps(downloader)).decode() + "\n" + base64.b64encode(body).decode() + "\n"
    got = {}
    for mode in ("light", "plain"):
        r = subprocess.run([sys.executable, "-c", _UNPICKLE_TASK, mode], input=stdin, capture_output=True, text=True,
                           timeout=180, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        got[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    light, plain = got["light"], got["plain"]
    assert light["before"] == {"resizer": False, "albumentations": False, "wandb": False, "torch": False,
                               "loaded": False}
    assert plain["before"]["wandb"] is True  # the control: img2dataset's downloader module brings wandb in
    for g in (light, plain):
        assert g["loaded_after"] is True
        assert base64.b64decode(g["img"]) == direct[0] and g["size"] == list(direct[1:5]) and g["error"] is None


def test_the_wandb_stand_in_fails_loudly_when_used():
    code = ("import sys\nfrom pipelines.crawl.processes import start_crawl_process\nstart_crawl_process()\n"
            "import img2dataset.logger, wandb\n"
            "try:\n    wandb.init()\nexcept AttributeError as exc:\n    print('refused:', exc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused: module 'wandb' is not loaded in a crawl process (asked for 'init')" in r.stdout


def test_the_stand_ins_leave_a_process_that_already_has_the_modules_alone():
    code = ("import sys, wandb\nfrom pipelines.crawl.processes import stub_wandb\n"
            "print(stub_wandb(), hasattr(sys.modules['wandb'], 'init'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.split() == ["False", "True"], r.stderr[-2000:]
