"""Quality benchmark of the `tiny` config on CPU: CIFAR-10 train images with templated captions -> webdataset shards
-> 400 steps at batch 128 -> zero-shot top-1 on the CIFAR-10 test set with the CLIP paper's 18 templates.

Reference (issue 5): a 1.9M-parameter ViT prototype reached 48.8% zero-shot top-1 in 157 s on 2 cores.

    .venv/bin/python benchmarks/train_cifar10_tiny.py [--steps 400] [--batch-size 128] [--keep DIR]

Reads ../shared/data/cifar10/cifar10-jpeg.parquet (or $CLIPLINE_SHARED_DATA/cifar10/...); prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clip_train import train as trainer  # noqa: E402
from clip_train.evaluate import evaluate_zeroshot, load_model  # noqa: E402
from clip_train.shards import Sample, write_shards  # noqa: E402
from pipelines.evalsets.base import EvalSet, decode_image  # noqa: E402
from pipelines.evalsets.templates import CIFAR10_TEMPLATES  # noqa: E402

# Simple training captions (some variety; the paper's 18 evaluation templates are a different, larger set).
TRAIN_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "a photo of the {}.",
    "a small photo of a {}.",
)


def shared_data() -> Path:
    env = os.environ.get("CLIPLINE_SHARED_DATA")
    return Path(env) if env else ROOT / ".." / "shared" / "data"


def build_train_shards(table, out_dir: Path, seed: int) -> int:
    train = table.filter(np.asarray(table.column("split").to_pylist()) == "train")
    rng = np.random.default_rng(seed)
    order = rng.permutation(train.num_rows)  # shards must not be sorted by class
    names, jpegs, index = train.column("label_name").to_pylist(), train.column("jpeg").to_pylist(), train.column("index").to_pylist()
    template_choice = rng.integers(len(TRAIN_TEMPLATES), size=train.num_rows)

    def samples():
        for i in order:
            caption = TRAIN_TEMPLATES[template_choice[i]].format(names[i])
            key = f"cifar10-train-{index[i]:05d}"
            yield Sample(key, jpegs[i], caption, {"uid": key, "url": f"cifar10://train/{index[i]}", "caption": caption, "entry_ids": [names[i]]})

    write_shards(samples(), out_dir, samples_per_shard=5000)
    return train.num_rows


def test_eval_set(table) -> EvalSet:
    test = table.filter(np.asarray(table.column("split").to_pylist()) == "test")
    labels = test.column("label").to_pylist()
    names_by_label = dict(zip(labels, test.column("label_name").to_pylist()))
    jpegs = test.column("jpeg").to_pylist()
    index = test.column("index").to_pylist()
    return EvalSet(
        name="cifar10-test",
        class_names=[names_by_label[c] for c in range(10)],
        templates=list(CIFAR10_TEMPLATES),
        ids=[f"cifar10-test-{i:05d}" for i in index],
        labels=labels,
        load_image=lambda i: decode_image(jpegs[i], where=f"cifar10 test #{index[i]}"),
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="keep shards and run here instead of a temporary directory")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more trainer flags")
    args = p.parse_args()

    parquet = shared_data() / "cifar10" / "cifar10-jpeg.parquet"
    if not parquet.exists():
        print(f"skipped: {parquet} not found (set CLIPLINE_SHARED_DATA)")
        return 0
    load_at_start = os.getloadavg()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="clip-cifar10-"))
    try:
        table = pq.read_table(parquet)
        shards = work / "shards"
        if not (shards / "sizes.json").exists():
            build_train_shards(table, shards, args.seed)
        run = work / "run"
        shutil.rmtree(run, ignore_errors=True)
        argv = [
            "--data", str(shards), "--model", "tiny", "--out", str(run), "--batch-size", str(args.batch_size),
            "--steps", str(args.steps), "--lr", str(args.lr), "--warmup", str(args.warmup), "--seed", str(args.seed),
            "--workers", str(args.workers), "--precision", args.precision, "--device", "cpu", "--save-every", str(args.steps),
            *(["--threads", str(args.threads)] if args.threads else []), *args.extra,
        ]
        def cpu_seconds() -> float:
            # This process and its finished children (the DataLoader workers end with each epoch's loader).
            own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

        c0, t0 = cpu_seconds(), time.perf_counter()
        trainer.main(argv)
        train_s, train_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        t1 = time.perf_counter()
        model, tokenizer, _ = load_model(run)
        zs, _, _ = evaluate_zeroshot(model, tokenizer, test_eval_set(table), batch_size=500)
        eval_s = time.perf_counter() - t1
        step_times = [m["step_time_s"] for m in metrics]
        result = {
            "benchmark": "tiny CLIP on CIFAR-10, zero-shot top-1 on the test set (18 templates)",
            "command": "python benchmarks/train_cifar10_tiny.py " + " ".join(sys.argv[1:]),
            "trainer_argv": argv,
            "train_wall_s": round(train_s, 1),
            "train_cpu_s": round(train_cpu_s, 1),  # core-seconds used (contention-independent-ish)
            "load_avg_at_start": load_at_start,
            "median_step_s": round(float(np.median(step_times)), 4),
            "mean_step_s": round(float(np.mean(step_times)), 4),
            "mean_data_wait_s": round(float(np.mean([m["data_wait_s"] for m in metrics])), 4),
            "final_loss": round(metrics[-1]["loss"], 4),
            "zeroshot_top1": round(zs["zeroshot_top1"], 4),
            "zeroshot_top5": round(zs["zeroshot_top5"], 4),
            "mean_per_class_recall": round(zs["mean_per_class_recall"], 4),
            "eval_s": round(eval_s, 1),
            "cpus": os.cpu_count(),
            "load_avg_at_end": os.getloadavg(),
        }
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
