"""GPU training throughput: clip_train vs open_clip's trainer, ViT-B/32, batch 256, bf16, same shards, same run.

    .venv/bin/python benchmarks/train_throughput.py [--steps 60] [--workers 12] [--compile] [--out results.json]

Writes synthetic 256-px JPEG shards once, then trains
  1. clip_train (`clip_train.train.main`, bf16 autocast, fused AdamW, token batches trimmed to their longest caption),
  2. open_clip's trainer (`open_clip_train.main`, --precision amp_bf16) on the same shards when open_clip_train is
     importable, else open_clip's model + loss in clip_train's loop and loader (labelled as such),
and reports samples/s (median over steps after the first --skip) and model FLOPs utilisation (FLOPs of one
forward+backward counted with torch.utils.flop_counter, over the GPU's dense bf16 peak). Exits 0 with a message on
machines without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Dense bf16 tensor-core peaks (vendor data sheets), by substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def write_synthetic_shards(out: Path, n: int, per_shard: int, size: int = 256) -> None:
    import numpy as np
    from PIL import Image

    from clip_train.shards import COLOURS, SHAPES, Sample, jpeg_bytes, shape_image, write_shards

    rng = np.random.default_rng(0)
    colours = list(COLOURS)

    def samples():
        for i in range(n):
            colour, shape = colours[i % len(colours)], SHAPES[(i // len(colours)) % len(SHAPES)]
            image = shape_image(colour, shape, rng, size=size // 4).resize((size, size), Image.Resampling.BILINEAR)
            caption = f"a photo of a {colour} {shape} number {i % 997} on a noisy grey background"
            yield Sample(f"b{i:07d}", jpeg_bytes(image, quality=85), caption, {"uid": f"b{i:07d}", "caption": caption})

    write_shards(samples(), out, per_shard)


def model_flops_per_sample(model_name: str, text_len: int) -> float:
    """FLOPs of one forward + backward of our model per sample (matmul/conv/attention, as FlopCounterMode counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    from clip_train.loss import ClipLoss
    from clip_train.model import CLIP, load_config

    cfg = load_config(model_name)
    cfg.text_cfg.eot_token_id = cfg.text_cfg.vocab_size - 1
    model = CLIP(cfg).cuda()
    batch = 8
    images = torch.randn(batch, 3, cfg.vision_cfg.image_size, cfg.vision_cfg.image_size, device="cuda")
    tokens = torch.randint(1, cfg.text_cfg.vocab_size - 2, (batch, text_len), device="cuda")
    tokens[:, -1] = cfg.text_cfg.eot_token_id
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cuda", dtype=torch.bfloat16):
        ClipLoss()(*model(images, tokens)).backward()
    del model
    torch.cuda.empty_cache()
    return counter.get_total_flops() / batch


def run_clip_train(shards: Path, work: Path, args, extra: list[str]) -> dict:
    from clip_train import train

    out = work / ("ours" + ("-compile" if "--compile" in extra else ""))
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        "--data", str(shards), "--model", "ViT-B-32", "--out", str(out), "--batch-size", str(args.batch_size),
        "--steps", str(args.steps), "--warmup", "10", "--lr", "5e-4", "--precision", "bf16", "--device", "cuda",
        "--workers", str(args.workers), "--save-every", str(10**9), "--log-every", "1", "--progress", "off",
        "--text-vocab-size", "49408", *extra,
    ]
    train.main(argv)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [m["samples_per_s"] for m in metrics[args.skip :]]
    return {"samples_per_s": statistics.median(rates), "data_wait_s": statistics.median(m["data_wait_s"] for m in metrics[args.skip :]),
            "argv": argv, "steps_measured": len(rates)}


def run_open_clip_trainer(shards: Path, n: int, work: Path, args) -> dict:
    """open_clip_train.main in a subprocess (it owns logging and process state); samples/s parsed from its log."""
    logs = work / "open_clip_logs"
    shutil.rmtree(logs, ignore_errors=True)
    n_shards = len(list(shards.glob("*.tar")))
    steps = args.steps
    cmd = [
        sys.executable, "-m", "open_clip_train.main",
        "--train-data", f"{shards}/{{00000..{n_shards - 1:05d}}}.tar", "--dataset-type", "webdataset",
        "--dataset-resampled", "--train-num-samples", str(steps * args.batch_size), "--epochs", "1",
        "--batch-size", str(args.batch_size), "--precision", "amp_bf16", "--model", "ViT-B-32", "--workers", str(args.workers),
        "--lr", "5e-4", "--wd", "0.2", "--warmup", "10", "--grad-clip-norm", "1.0", "--seed", "0", "--report-to", "",
        "--logs", str(logs), "--name", "bench", "--log-every-n-steps", "1", "--save-frequency", "0",
    ]
    if args.compile:
        cmd.append("--torchcompile")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"open_clip_train failed ({proc.returncode}):\n{text[-3000:]}")
    rates = [float(x) for x in re.findall(r"([\d.]+)/s/gpu", text)]
    if not rates:
        raise RuntimeError(f"no samples/s lines in open_clip_train output:\n{text[-3000:]}")
    rates = rates[args.skip :] or rates
    return {"samples_per_s": statistics.median(rates), "steps_measured": len(rates), "argv": cmd[2:]}


def run_open_clip_model_in_our_loop(shards: Path, args) -> dict:
    """Fallback when only the open_clip library is importable: its model and loss, our loader, same settings."""
    import open_clip

    from clip_train.data import StreamConfig, epoch_loader, resolve_shards
    from clip_train.optim import build_optimizer, build_scheduler

    model = open_clip.create_model("ViT-B-32").cuda().train()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    loss_fn = open_clip.loss.ClipLoss()
    optimizer = build_optimizer(model, 5e-4, 0.2, fused=True)
    scheduler = build_scheduler(optimizer, 10, args.steps)
    cfg = StreamConfig(urls=resolve_shards(str(shards)).urls, batch_size=args.batch_size, image_size=224, steps_per_epoch=args.steps,
                       trim_tokens=False)
    rates = []
    for step, (images, texts, _stats) in enumerate(epoch_loader(cfg, tokenizer, 0, 0, 1, args.workers, pin_memory=True)):
        start = time.perf_counter()
        images, texts = images.cuda(non_blocking=True), texts.cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            img, txt, scale = model(images, texts)
            loss = loss_fn(img, txt, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        float(loss)
        if step >= args.skip:
            rates.append(args.batch_size / (time.perf_counter() - start))
    return {"samples_per_s": statistics.median(rates), "steps_measured": len(rates), "note": "open_clip model+loss in clip_train's loop"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=15, help="warm-up steps left out of the median")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 2)))
    p.add_argument("--samples", type=int, default=256 * 40, help="synthetic samples written (resampled while training)")
    p.add_argument("--compile", action="store_true", help="also run both trainers with torch.compile")
    p.add_argument("--keep", default=None, help="work directory to keep (shards are reused)")
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("train_throughput: no CUDA device here; this benchmark needs a GPU (nothing measured).")
        return 0

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="clip-throughput-"))
    try:
        shards = work / "shards"
        if not (shards / "sizes.json").exists():
            write_synthetic_shards(shards, args.samples, per_shard=1024)
        device = torch.cuda.get_device_name()
        flops = model_flops_per_sample("ViT-B-32", text_len=20)
        peak = peak_tflops(device)
        results = {"device": device, "batch_size": args.batch_size, "steps": args.steps, "workers": args.workers,
                   "flops_per_sample": flops, "peak_bf16_tflops": peak, "runs": {}}
        variants = [("clip_train", [])] + ([("clip_train --compile", ["--compile"])] if args.compile else [])
        for name, extra in variants:
            results["runs"][name] = run_clip_train(shards, work, args, extra)
        try:
            import open_clip  # noqa: F401

            try:
                import open_clip_train  # noqa: F401

                results["runs"]["open_clip_train" + (" --torchcompile" if args.compile else "")] = run_open_clip_trainer(
                    shards, args.samples, work, args)
            except ImportError:
                results["runs"]["open_clip (model in our loop)"] = run_open_clip_model_in_our_loop(shards, args)
        except ImportError:
            results["open_clip"] = "not importable: comparison skipped"
        for run in results["runs"].values():
            run["mfu"] = run["samples_per_s"] * flops / (peak * 1e12) if peak else None
        lines = ["| trainer | samples/s | MFU |", "|---|---:|---:|"]
        for name, run in results["runs"].items():
            mfu = f"{100 * run['mfu']:.1f}%" if run["mfu"] is not None else "n/a"
            lines.append(f"| {name} | {run['samples_per_s']:.0f} | {mfu} |")
        print(f"ViT-B/32, batch {args.batch_size}, bf16, {device}; {flops / 1e9:.1f} GFLOP per sample (fwd+bwd)")
        print("\n".join(lines))
        print(json.dumps(results))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
