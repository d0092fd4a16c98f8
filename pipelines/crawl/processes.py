"""The crawl's own processes start light: img2dataset's multiprocessing distributor with an initializer.

A crawl worker process imports ``pipelines.crawl.worker``, which needs img2dataset's downloader and writer. Imported
plainly that costs ~4.6 s of CPU and 369 MiB per process: img2dataset's package ``__init__`` imports all of
img2dataset (its reader with pandas, its resizer with albumentations, its distributors), and webdataset imports torch
when torch is installed, only to subclass ``torch.utils.data.IterableDataset`` / ``DataLoader``, which a crawl never
uses (webdataset has stand-ins for when torch is missing). img2dataset's distributor replaces its workers every 5
shards, so a crawl paid that again and again. The worker processes of :func:`multiprocessing_distributor` run
:func:`start_crawl_process` first, before any task is unpickled: ``import torch`` fails there with
``ModuleNotFoundError`` (webdataset takes its stand-ins) and ``img2dataset`` is a bare package whose submodules load
on demand: 1.1 s of CPU and 96 MiB per worker start (benchmarks/crawl_worker_start_bench.py). The image helpers do the same
(``pipelines.crawl.image_helper``). Only processes that do nothing but crawl are started this way, never one that
may train or evaluate; where torch or img2dataset are already imported, nothing changes.
"""
from __future__ import annotations

import importlib.abc
import sys
import types


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torch" or fullname.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (a crawl process does not import torch)",
                                      name=fullname)
        # anything else: not ours to find (None, the next finder looks)


def block_torch() -> bool:
    """Make ``import torch`` fail in this process; False (and nothing changed) where torch is already imported."""
    if "torch" in sys.modules:
        return False
    if not any(isinstance(f, _NoTorch) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoTorch())
    return True


def bare_img2dataset_package() -> None:
    """Let img2dataset's submodules (``resizer``, ``downloader``, ``writer``) be imported without its package
    ``__init__``, which imports all of img2dataset. Only in a process that crawls and nothing else."""
    import importlib.util
    import types

    if "img2dataset" in sys.modules:
        return
    spec = importlib.util.find_spec("img2dataset")
    if spec is None or not spec.submodule_search_locations:
        return
    package = types.ModuleType("img2dataset")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__file__ = spec.origin
    sys.modules["img2dataset"] = package


class _AbsentModule(types.ModuleType):
    """Stands in for a module a crawl process imports but never uses (see :func:`stub_wandb`)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"module {self.__name__!r} is not loaded in a crawl process (asked for {name!r})")


def stub_wandb() -> bool:
    """Give ``import wandb`` a stand-in module in this process; False (nothing changed) where wandb is already
    imported. img2dataset's downloader imports its logger, whose first line is ``import wandb`` (0.7 s of CPU:
    pydantic models), only for the logger process of the main process, which runs wandb when asked to. A crawl
    worker uses the logger's ``CappedCounter`` and nothing of wandb; any use of the stand-in fails loudly."""
    if "wandb" in sys.modules:
        return False
    sys.modules["wandb"] = _AbsentModule("wandb", "stand-in: wandb is not used by a crawl process")
    return True


def start_crawl_process() -> None:
    """The initializer of the crawl's worker processes (and the first thing an image helper does)."""
    block_torch()
    stub_wandb()
    bare_img2dataset_package()


def multiprocessing_distributor(processes_count, downloader, reader, _subjob_size, max_shard_retry):
    """img2dataset's ``multiprocessing_distributor`` (1.47), line for line, with :func:`start_crawl_process` as the
    pool's initializer. Its ``print``/``tqdm``/``retrier`` are taken from img2dataset's module at call time, so the
    crawl's redirection of that module's chatter to the log applies here too."""
    from multiprocessing import get_context

    from img2dataset import distributor as i2d

    ctx = get_context("spawn")
    with ctx.Pool(processes_count, maxtasksperchild=5, initializer=start_crawl_process) as process_pool:

        def run(gen):
            failed_shards = []
            for status, row in i2d.tqdm(process_pool.imap_unordered(downloader, gen)):
                if status is False:
                    failed_shards.append(row)
            return failed_shards

        failed_shards = run(reader)
        i2d.retrier(run, failed_shards, max_shard_retry)
        process_pool.terminate()
        process_pool.join()
