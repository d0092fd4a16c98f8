"""The crawl's image helper processes: the same output as processing in the download thread, images that survive a
helper's death, an image that kills its helper twice refused with a reason, helpers that end with their crawl
process; the round's shared helpers: serving several crawl processes, surviving as private helpers when one dies,
ending with the round."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from pipelines.crawl.image_helper import ImageHelperPool, SharedHelpers
from pipelines.crawl.processing import (
    PixelLimitResizer,
    ProcessingSettings,
    install_limits,
    process_body,
    quiet_resizer,
)

POISON = b"\x89POISON"


class PoisonResizer:
    """A resizer that kills its process on the POISON body (a decoder crash on a hostile image), else delegates."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, img_stream, blurring_bbox_list=None):
        if img_stream.getvalue() == POISON:
            os._exit(70)
        return self.inner(img_stream, blurring_bbox_list)


def _resizer(max_pixels: int = 4_000_000):
    from img2dataset.resizer import Resizer

    return PixelLimitResizer(Resizer(image_size=64, resize_mode="keep_ratio_largest", resize_only_if_bigger=True,
                                     encode_quality=95, encode_format="jpg", min_image_size=0,
                                     max_image_area=max_pixels), max_pixels)


def _bodies() -> list[bytes]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(40):
        h, w = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC))
        arr = np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        buf = io.BytesIO()
        if i % 5 == 1:
            img.convert("L").save(buf, "JPEG", quality=80)
        elif i % 5 == 2:
            img.convert("RGBA").save(buf, "PNG")
        elif i % 5 == 3:
            img.save(buf, "WEBP")
        else:
            img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    out.append(out[0][: len(out[0]) // 2])  # truncated JPEG
    bomb = io.BytesIO()
    Image.new("L", (3000, 3000)).save(bomb, "PNG")  # declares 9 MP > the 4 MP limit
    out.append(bomb.getvalue())
    return out


@pytest.fixture(scope="module")
def settings():
    quiet_resizer()
    saved = Image.MAX_IMAGE_PIXELS
    install_limits(4_000_000)  # as a crawl worker and its helpers do
    yield ProcessingSettings(resizer=_resizer(), max_image_pixels=4_000_000, compute_hash="sha256",
                             hash_images=True)
    Image.MAX_IMAGE_PIXELS = saved


def _comparable(p):
    # PIL's "cannot identify image file <_io.BytesIO object at 0x...>" names an address: compare the rest
    return (p.img, p.width, p.height, p.original_width, p.original_height, p.columns, p.source_hash,
            None if p.error is None else p.error.split(" at 0x")[0])


def test_helpers_give_what_the_download_thread_would(settings):
    bodies = _bodies()
    local = [_comparable(process_body(settings, b)) for b in bodies]
    assert sum(1 for p in local if p[0] is not None) >= 38 and sum(1 for p in local if p[7] is not None) == 2
    pool = ImageHelperPool(settings, 2)
    try:
        assert pool.wait_ready(60)
        with ThreadPoolExecutor(16) as ex:
            remote = [_comparable(p) for p in ex.map(pool.process, bodies)]
        assert remote == local
        assert pool.cpu_s() > 0
    finally:
        pool.close()


@pytest.mark.parametrize("mode", ["keep_ratio", "center_crop", "border", "keep_ratio_largest"])
def test_reused_transforms_give_the_resizer_s_own_bytes(mode, monkeypatch):
    """quiet_resizer() makes img2dataset's Resizer reuse its albumentations transforms: the same bytes as
    building them per image, for every resize mode, images smaller and larger than image_size, 16 threads
    resizing at once with two sizes interleaved (a transform keeps its last call's parameters)."""
    import albumentations
    import img2dataset.resizer as resizer_module

    from pipelines.crawl.processing import ReusedTransforms

    bodies = _bodies()
    resizers = [resizer_module.Resizer(image_size=size, resize_mode=mode, resize_only_if_bigger=False,
                                       encode_quality=95, encode_format="jpg", min_image_size=0,
                                       max_image_area=4_000_000) for size in (64, 150)]
    jobs = [(r, b) for b in bodies for r in resizers]
    monkeypatch.setattr(resizer_module, "A", albumentations)
    built = [r(io.BytesIO(b), None) for r, b in jobs]
    assert sum(1 for out in built if out[-1] is None) >= 76  # the two broken bodies fail at both sizes
    quiet_resizer()
    assert isinstance(resizer_module.A, ReusedTransforms)
    with ThreadPoolExecutor(16) as ex:
        reused = list(ex.map(lambda job: job[0](io.BytesIO(job[1]), None), jobs * 3))
    assert reused == built * 3
    assert resizer_module.A.CenterCrop is not albumentations.CenterCrop  # transforms are reused ...
    assert resizer_module.A.__version__ == albumentations.__version__  # ... the rest is the module's


def _process_while_killing(pool: ImageHelperPool, bodies: list[bytes], victim: int) -> list:
    """Every body through ``pool`` from 32 threads, SIGKILLing helper ``victim`` while they are pending."""
    with ThreadPoolExecutor(32) as ex:
        futures = [ex.submit(pool.process, b) for b in bodies]
        time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        return [_comparable(f.result(timeout=120)) for f in futures]


def test_images_survive_a_helper_killed_mid_batch(settings):
    bodies = _bodies() * 5
    local = [_comparable(process_body(settings, b)) for b in bodies]
    pool = ImageHelperPool(settings, 1)
    try:
        assert pool.wait_ready(60)
        victim = pool.pids()[0]
        assert _process_while_killing(pool, bodies, victim) == local
        assert pool.deaths == 1 and pool.pids() and victim not in pool.pids()
    finally:
        pool.close()


def test_an_image_that_kills_its_helper_twice_is_refused_and_the_others_go_on(settings):
    poisoned = ProcessingSettings(resizer=PoisonResizer(settings.resizer), max_image_pixels=4_000_000,
                                  compute_hash="sha256", hash_images=True)
    good = _bodies()[0]
    pool = ImageHelperPool(poisoned, 1)
    try:
        assert pool.wait_ready(60)
        out = pool.process(POISON)
        assert out.img is None and out.error.startswith("clipline:decode_error:")
        from pipelines.crawl import normalise_reason

        assert normalise_reason(out.error) == "decode_error"
        assert pool.deaths >= 1
        # the pool still answers (a third helper was started; until it is ready the caller is told to do it itself)
        assert pool.wait_ready(60)
        assert _comparable(pool.process(good)) == _comparable(process_body(settings, good))
    finally:
        pool.close()


def _helpers_exit_with_their_parent(tmp_path, setup: str, pids_expr: str) -> None:
    """Run a parent that starts helpers (``setup``) and prints ``pids_expr``; SIGKILL it; its helpers must exit
    (and shared ones remove the round's socket directory, which the killed parent could not)."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import time\n"
        "from tests.test_crawl_image_helper import _resizer\n"
        "from pipelines.crawl.image_helper import ImageHelperPool, SharedHelpers\n"
        "from pipelines.crawl.processing import ProcessingSettings\n"
        "settings = ProcessingSettings(_resizer(), 4_000_000, None, True)\n"
        f"{setup}\n"
        f"print(*{pids_expr}, flush=True)\n"
        "time.sleep(600)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "NO_ALBUMENTATIONS_UPDATE": "1"}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env, cwd=root)
    try:
        pids = [int(x) for x in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_running(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.05)
    assert not any(_running(p) for p in pids)
    return pids


def test_a_helper_exits_when_its_crawl_process_is_killed(tmp_path):
    _helpers_exit_with_their_parent(tmp_path, "pool = ImageHelperPool(settings, 2)\nassert pool.wait_ready(60)",
                                    "pool.pids()")


def test_shared_helpers_exit_when_the_round_process_is_killed(tmp_path):
    record = tmp_path / "helper_dir"
    _helpers_exit_with_their_parent(
        tmp_path, "shared = SharedHelpers(settings, 2)\n"
                  "pool = ImageHelperPool(settings, 1, shared=shared.addresses)\nassert pool.wait_ready(60)\n"
                  f"open({str(record)!r}, 'w').write(shared.dir)",
        "shared.pids()")
    helper_dir = record.read_text()
    assert helper_dir.startswith(tempfile.gettempdir()) and not os.path.exists(helper_dir)


def test_shared_helpers_serve_several_pools_and_count_cpu_per_pool(settings):
    bodies = _bodies()
    local = [_comparable(process_body(settings, b)) for b in bodies]
    shared = SharedHelpers(settings, 2)
    pools = []
    try:
        helper_dir = shared.dir
        assert len(shared.addresses) == 2 and oct(os.stat(helper_dir).st_mode & 0o777) == "0o700"
        pools = [ImageHelperPool(settings, 1, shared=shared.addresses) for _ in range(2)]  # two crawl processes
        for pool in pools:
            assert pool.wait_ready(60)
            assert sorted(pool.pids()) == sorted(shared.pids())  # connected to the round's helpers, none of its own
        with ThreadPoolExecutor(16) as ex:
            remote = list(ex.map(lambda ib: _comparable(pools[ib[0] % 2].process(ib[1])), enumerate(bodies)))
        assert remote == local
        for pool in pools:
            assert pool.cpu_s() == 0 and pool.starts == 0  # no private helper was started
            assert pool.shared_cpu_s() > 0
    finally:
        for pool in pools:
            pool.close()
        shared.close()
    # The helpers were reaped by the round and their CPU taken from the kernel: at least what they did for the pools.
    assert shared.cpu_s >= sum(p.shared_cpu_s() for p in pools) > 0
    assert not shared.pids() and not os.path.exists(helper_dir)


def test_images_handed_over_while_the_shared_helpers_start_wait_for_them(settings):
    """The round's helpers are still importing when a crawl process hands over its first images: the images wait
    for them (the crawl process does not load the resizer to do it itself); a pool that does not wait
    (``start_wait_s=0``, as with private helpers) is told no helper is ready."""
    from pipelines.crawl.image_helper import HelperUnavailable

    bodies = _bodies()[:6]
    local = [_comparable(process_body(settings, b)) for b in bodies]
    shared = SharedHelpers(settings, 1)
    impatient = waiting = None
    try:
        impatient = ImageHelperPool(settings, 1, shared=shared.addresses, start_wait_s=0)
        waiting = ImageHelperPool(settings, 1, shared=shared.addresses)
        assert waiting.start_wait_s > 0
        with pytest.raises(HelperUnavailable):  # its helper is importing (~1 s): no answer to wait for
            impatient.submit(bodies[0], lambda out: None)
        with ThreadPoolExecutor(6) as ex:
            remote = list(ex.map(lambda b: _comparable(waiting.process(b)), bodies))
        assert remote == local
        assert waiting.starts == 0 and waiting.shared_cpu_s() > 0  # the shared helper did them
    finally:
        for pool in (impatient, waiting):
            if pool is not None:
                pool.close()
        shared.close()


def test_a_dead_shared_helper_is_replaced_by_a_private_one_and_loses_no_image(settings):
    bodies = _bodies() * 5
    local = [_comparable(process_body(settings, b)) for b in bodies]
    shared = SharedHelpers(settings, 1)
    pool = late = None
    try:
        pool = ImageHelperPool(settings, 1, shared=shared.addresses)
        assert pool.wait_ready(60)
        victim = shared.pids()[0]
        assert _process_while_killing(pool, bodies, victim) == local
        assert pool.deaths == 1 and pool.starts == 1 and victim not in pool.pids()
        # A crawl process that starts after the shared helper died starts its own at once.
        late = ImageHelperPool(settings, 1, shared=shared.addresses)
        assert late.starts == 1 and late.wait_ready(60)
        assert _comparable(late.process(bodies[0])) == local[0]
    finally:
        for p in (pool, late):
            if p is not None:
                p.close()
        shared.close()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited (its parent reaps it)
    except FileNotFoundError:
        return False


def test_usage_line_when_started_by_hand():
    r = subprocess.run([sys.executable, "-m", "pipelines.crawl.image_helper"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_image_processes_setting():
    from pipelines.core.errors import ConfigError
    from pipelines.crawl import CrawlConfig

    cores = os.cpu_count() or 1
    assert CrawlConfig().image_processes is None
    assert CrawlConfig().image_processes_per_process() == max(1, min(4, cores))
    assert CrawlConfig(processes=64).image_processes_per_process() == 1
    assert CrawlConfig(distributor="pyspark").image_processes_per_process() == 1
    assert CrawlConfig(image_processes=0).image_processes_per_process() == 0
    assert CrawlConfig.from_dict({"image_processes": 3}).image_processes_per_process() == 3
    for bad in (-1, 1.5, "two", True):
        with pytest.raises(ConfigError, match="crawl.image_processes"):
            CrawlConfig(image_processes=bad)
    assert CrawlConfig().shared_image_helpers is True
    assert CrawlConfig.from_dict({"shared_image_helpers": False}).shared_image_helpers is False
    with pytest.raises(ConfigError, match="crawl.shared_image_helpers"):
        CrawlConfig(shared_image_helpers="yes")


def test_package_names_stay_the_functions_whatever_was_imported_first():
    # The package exports names lazily: importing submodules first (the driver, whose function ``crawl`` the
    # package exports, lives in pipelines.crawl.driver) must not leave a package name bound to a module.
    code = ("import pipelines.crawl.driver, pipelines.decontam.hashing\n"
            "from pipelines.crawl import crawl\n"
            "from pipelines.decontam import phash64_batch, DetectorConfig\n"
            "import sys\n"
            "assert callable(crawl) and not isinstance(crawl, type(sys)), crawl\n"
            "assert callable(phash64_batch) and isinstance(DetectorConfig, type)\n"
            # a crawl worker process imports what it runs, not the driver, the stage or the outcome reader
            "import subprocess\n"
            "code = 'import sys, pipelines.crawl.worker; print(sorted(m for m in sys.modules if m.startswith(\"pipelines\")))'\n"
            "out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout\n"
            "assert not {'pipelines.crawl.driver', 'pipelines.crawl.stage', 'pipelines.crawl.results'} & set(eval(out)), out\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
