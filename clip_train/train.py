"""The CLIP trainer: `main(argv)` behind `clipline train` (one process, or one per GPU under torchrun).

Contract: `--data SHARDS --model NAME --out RUN_DIR [--batch-size N] [--steps N] [--lr X] [--seed S] [--resume]
[--device cpu|cuda] [--online-balance MANIFEST_OR_POOL [--online-t T]]` writes RUN_DIR/metrics.jsonl (one JSON object
per logged step, with the loader's skipped-sample counts), RUN_DIR/checkpoint.pt (latest, atomic),
RUN_DIR/config.json and RUN_DIR/tokenizer.json. RUN_DIR may be local or s3://: every write goes through
`pipelines.core.storage`. User mistakes raise `clip_train.errors.TrainError` (one line, exit code 2 in the CLI).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
import torch
import torch.distributed as dist

from clip_train.checkpoint import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    TOKENIZER_NAME,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from clip_train.data import StreamConfig, epoch_loader, iter_captions, iter_sample_meta, resolve_shards, steps_per_epoch
from clip_train.errors import TrainError
from clip_train.loss import ClipLoss, in_batch_retrieval_accuracy
from clip_train.model import CLIP, load_config
from clip_train.optim import build_optimizer, build_scheduler
from clip_train.tokenizer import CLIPTokenizer
from pipelines.core import storage

METRICS_NAME = "metrics.jsonl"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2 through the CLI, like every other user error
        raise TrainError(f"{self.prog}: {message} (--help for usage)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="clipline train", description="Train a CLIP model on webdataset shards.")
    p.add_argument("--data", required=True, help="shard dir (with sizes.json), brace/glob pattern, or s3://... ('::' joins)")
    p.add_argument("--model", required=True, help="named config (tiny, RN50, ViT-B-32, ViT-B-16) or a JSON file")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: --epochs x steps per epoch)")
    p.add_argument("--epochs", type=int, default=1, help="used when --steps is not given")
    p.add_argument("--samples-per-epoch", type=int, default=None, help="default: sample count from sizes.json")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of steps, at most 2000)")
    p.add_argument("--wd", type=float, default=0.2, help="decoupled weight decay on weights only")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.98)
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt when it exists")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 autocast on cuda")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--local-loss", action="store_true", help="loss of local rows against gathered features")
    p.add_argument("--gather-with-grad", action="store_true", help="all-gather features through autograd")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (default: cpus - 1, at most 8)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-resample", action="store_true", help="passes over shuffled shards instead of resampling")
    p.add_argument("--shuffle-buffer", type=int, default=2000)
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.9, 1.0), metavar=("MIN", "MAX"))
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of training one")
    p.add_argument("--bpe-merges", default=None, help="CLIP's bpe_simple_vocab_16e6.txt(.gz) merges file")
    p.add_argument("--vocab-size", type=int, default=8192, help="when a tokenizer is trained on the captions")
    p.add_argument("--text-vocab-size", type=int, default=None,
                   help="token-embedding rows (default: the tokenizer's vocabulary; larger pads, e.g. to match CLIP's 49408)")
    p.add_argument("--tokenizer-captions", type=int, default=200_000, help="captions read to train the tokenizer")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and always at the end)")
    p.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) after this step, keeping the schedule of --steps")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--online-balance", default=None, metavar="MANIFEST_OR_POOL",
                   help="re-draw MetaCLIP's balanced subset every epoch from the pool in --data: a build's manifest.json "
                        "(or build dir), an entry-counts Parquet or a pool Parquet file/dir (uid, entry_ids)")
    p.add_argument("--online-t", type=float, default=None, help="MetaCLIP t for --online-balance (default: the manifest's)")
    return p


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)
    if device_kind == "cuda":
        # Bind the GPU before NCCL starts, or collectives (barrier) may run on device 0 for every rank.
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return info


def _resolve_device(choice: str, info: DistInfo) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch.cuda.is_available() is False")
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def _build_tokenizer(args: argparse.Namespace, urls: list[str], context_length: int) -> CLIPTokenizer:
    if args.tokenizer:
        return CLIPTokenizer.load(args.tokenizer)
    if args.bpe_merges:
        return CLIPTokenizer.from_clip_merges_file(args.bpe_merges, context_length=context_length)
    return CLIPTokenizer.train(iter_captions(urls, args.tokenizer_captions), vocab_size=args.vocab_size, context_length=context_length)


class MetricsLog:
    """metrics.jsonl through storage: lines are kept in memory and the file is rewritten atomically at most every
    ``flush_s`` seconds, at every checkpoint and at the end (works the same for a local or an s3:// run directory).
    A resumed run starts from the lines up to its checkpoint's step: the lines a killed run logged past it go."""

    def __init__(self, uri: str, last_step: int, flush_s: float | None = None):
        # Every flush rewrites the whole file: every 5 s locally, every 60 s on object storage (one PUT each).
        self.uri, self.flush_s = uri, flush_s if flush_s is not None else (60.0 if storage.is_s3(uri) else 5.0)
        self.lines: list[str] = []
        if storage.exists(uri):
            for line in storage.read_bytes(uri).decode().splitlines():
                if line.strip() and json.loads(line)["step"] <= last_step:
                    self.lines.append(line)
        self._last_flush = 0.0
        self.flush()

    def write(self, record: dict) -> None:
        self.lines.append(json.dumps(record))
        if time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        atomic_write_bytes(self.uri, "".join(line + "\n" for line in self.lines).encode())
        self._last_flush = time.monotonic()


def _online_balance(args: argparse.Namespace, urls: list[str]):
    """(OnlineBalance, expected samples per epoch) for --online-balance, else (None, None)."""
    if not args.online_balance:
        return None, None
    from clip_train.online_balance import load_online_balance

    online = load_online_balance(args.online_balance, t=args.online_t, seed=args.seed)
    entry_lists = []
    for uid, meta in iter_sample_meta(urls):
        if meta.get("entry_ids") is None:
            raise TrainError(f"--online-balance: sample {uid} of --data has no entry_ids in its .json")
        entry_lists.append(meta["entry_ids"])
    expected = online.expected_kept(entry_lists)
    if expected < 1:
        raise TrainError(f"--online-balance: the draw keeps {expected:.2f} samples per epoch in expectation")
    return online, {"pool_samples": len(entry_lists), "expected_per_epoch": expected}


class _Progress:
    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self.bar = None

    def update(self, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_args(args: argparse.Namespace) -> None:
    """Every numeric option checked before any work, each with a one-line error."""
    for name in ("batch_size", "epochs", "log_every", "save_every", "shuffle_buffer", "vocab_size", "tokenizer_captions"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise TrainError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("steps", "samples_per_epoch", "stop_at", "text_vocab_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise TrainError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.lr <= 0 or not math.isfinite(args.lr):
        raise TrainError(f"--lr must be a positive number, got {args.lr}")
    if args.warmup is not None and args.warmup < 0:
        raise TrainError(f"--warmup must be >= 0, got {args.warmup}")
    if args.workers is not None and args.workers < 0:
        raise TrainError(f"--workers must be >= 0, got {args.workers}")
    if args.online_t is not None and not args.online_t > 0:
        raise TrainError(f"--online-t must be positive, got {args.online_t}")
    if args.online_t is not None and not args.online_balance:
        raise TrainError("--online-t needs --online-balance MANIFEST_OR_POOL")
    lo, hi = args.crop_scale
    if not 0 < lo <= hi <= 1:
        raise TrainError(f"--crop-scale must satisfy 0 < MIN <= MAX <= 1, got {lo} {hi}")


def train(args: argparse.Namespace) -> int:
    _check_args(args)
    out = str(args.out)
    info = init_distributed("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    device = _resolve_device(args.device, info)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    ckpt_path = storage.join(out, CHECKPOINT_NAME)
    has_checkpoint = storage.exists(ckpt_path)
    resuming = args.resume and has_checkpoint
    if has_checkpoint and not args.resume:
        raise TrainError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")

    model_cfg = load_config(args.model)
    shards = resolve_shards(args.data)
    online, online_info = _online_balance(args, shards.urls)
    samples_per_epoch = args.samples_per_epoch or (round(online_info["expected_per_epoch"]) if online else shards.num_samples)
    if samples_per_epoch is None:
        raise TrainError(f"{args.data}: no sizes.json covers these shards; pass --samples-per-epoch")
    spe = steps_per_epoch(samples_per_epoch, args.batch_size, info.world)
    total_steps = args.steps if args.steps is not None else args.epochs * spe
    warmup = args.warmup if args.warmup is not None else min(2000, max(1, total_steps // 20))

    if resuming:
        saved = storage.read_json(storage.join(out, CONFIG_NAME))
        if saved["model"] != args.model:
            raise TrainError(f"{out} was trained with --model {saved['model']}, not {args.model}")
        tokenizer = CLIPTokenizer.load(storage.join(out, TOKENIZER_NAME))
    else:
        if info.main:
            tokenizer = _build_tokenizer(args, shards.urls, model_cfg.text_cfg.context_length)
            tokenizer.save(storage.join(out, TOKENIZER_NAME))
        if info.world > 1:
            dist.barrier()
        tokenizer = CLIPTokenizer.load(storage.join(out, TOKENIZER_NAME))
    if args.text_vocab_size is not None and args.text_vocab_size < tokenizer.vocab_size:
        raise TrainError(f"--text-vocab-size {args.text_vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    model_cfg.text_cfg.vocab_size = args.text_vocab_size or tokenizer.vocab_size
    model_cfg.text_cfg.eot_token_id = tokenizer.eot_token_id
    model_cfg.text_cfg.context_length = tokenizer.context_length

    torch.manual_seed(args.seed)
    model = CLIP(model_cfg).to(device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = build_optimizer(
        model, args.lr, args.wd, (args.beta1, args.beta2), args.eps, fused=device.type == "cuda"
    )
    scheduler = build_scheduler(optimizer, warmup, total_steps)
    start_step = 0
    skipped_total: dict[str, int] = {}
    if resuming:
        state = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        skipped_total = dict(state.get("skipped", {}))
        if state["total_steps"] != total_steps:
            raise TrainError(f"checkpoint was written for --steps {state['total_steps']}, this run asks for {total_steps}")
    config = {
        "model": args.model,
        "model_config": model_cfg.to_dict(),
        "tokenizer": TOKENIZER_NAME,
        "data": args.data,
        "num_shards": len(shards.urls),
        "samples_per_epoch": samples_per_epoch,
        "steps_per_epoch": spe,
        "total_steps": total_steps,
        "warmup_steps": warmup,
        "world_size": info.world,
        "global_batch_size": args.batch_size * info.world,
        "precision": precision,
        "online_balance": None if online is None else {**online.describe(), **online_info},
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())},
    }
    if info.main:
        atomic_write_json(storage.join(out, CONFIG_NAME), config)

    train_model: torch.nn.Module = model
    if info.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if args.compile:
        train_model = torch.compile(train_model)
    loss_fn = ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )

    stream_cfg = StreamConfig(
        urls=shards.urls, batch_size=args.batch_size, image_size=model_cfg.vision_cfg.image_size, steps_per_epoch=spe,
        seed=args.seed, resample=not args.no_resample, shuffle_buffer=args.shuffle_buffer,
        crop_scale=tuple(args.crop_scale), trim_tokens=not args.compile, online=online,
    )
    workers = args.workers if args.workers is not None else min(8, max(0, (os.cpu_count() or 1) - 1))
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        # Leave the data workers their cores: oversubscribed OpenMP threads spin against each other, and on a busy
        # 2-core machine 2 threads + 1 worker measured ~9x slower per step than 1 thread + 1 worker.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world - workers))
    end_step = min(total_steps, args.stop_at) if args.stop_at is not None else total_steps
    progress = _Progress(end_step, start_step, info.main and (args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())))
    metrics_file = MetricsLog(storage.join(out, METRICS_NAME), start_step) if info.main else None
    online_counts = {"online_seen": 0, "online_kept": 0}

    def save(step: int) -> None:
        if info.main:
            metrics_file.flush()
            save_checkpoint(
                ckpt_path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "total_steps": total_steps,
                    "rng": rng_state(),
                    "model_name": args.model,
                    "model_config": model_cfg.to_dict(),
                    "skipped": dict(skipped_total),
                },
            )
        if info.world > 1:
            dist.barrier()

    train_model.train()
    batches = None
    current_epoch = -1
    window = {"steps": 0, "time": 0.0, "data": 0.0}  # since the last logged step
    step = start_step
    try:
        for step in range(start_step, end_step):
            step_start = time.perf_counter()
            epoch, index_in_epoch = divmod(step, spe)
            if epoch != current_epoch:
                loader = epoch_loader(
                    stream_cfg, tokenizer, epoch, info.rank, info.world, workers,
                    skip_batches=index_in_epoch, pin_memory=device.type == "cuda",
                )
                batches, current_epoch = iter(loader), epoch
            images, texts, batch_stats = next(batches)
            for reason, n in batch_stats.get("skipped", {}).items():
                skipped_total[reason] = skipped_total.get(reason, 0) + n
            for key in online_counts:
                online_counts[key] += batch_stats.get(key, 0)
            data_ready = time.perf_counter()
            images = images.to(device, non_blocking=True)
            texts = texts.to(device, non_blocking=True)
            lr = optimizer.param_groups[0]["lr"]
            with autocast:
                image_features, text_features, logit_scale = train_model(images, texts)
                loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = None
            if args.grad_clip > 0:
                # Kept on the device: converting here would stall the host every step.
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            scheduler.step()
            model.clamp_logit_scale()
            done_step = step + 1
            if info.main and (done_step % args.log_every == 0 or done_step == end_step):
                loss_value = float(loss.detach())  # synchronises with the device, so timings below are real
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss became {loss_value} at step {done_step}")
                window["steps"] += 1
                window["time"] += time.perf_counter() - step_start
                window["data"] += data_ready - step_start
                record = {
                    "step": done_step,
                    "epoch": epoch,
                    "loss": loss_value,
                    "lr": lr,
                    "logit_scale": float(logit_scale.detach()),
                    "in_batch_acc": in_batch_retrieval_accuracy(image_features.detach().float(), text_features.detach().float()),
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "samples_per_s": args.batch_size * info.world * window["steps"] / window["time"],
                    "data_wait_s": window["data"] / window["steps"],
                    "step_time_s": window["time"] / window["steps"],
                    # Samples the loader skipped so far (decode errors, missing captions, ...), by reason.
                    "skipped": dict(skipped_total),
                }
                if online is not None:
                    record["online_kept_fraction"] = (online_counts["online_kept"] / online_counts["online_seen"]
                                                      if online_counts["online_seen"] else None)
                metrics_file.write(record)
                progress.update(loss_value, lr)
                window = {"steps": 0, "time": 0.0, "data": 0.0}
            else:
                # Without a host sync these steps' times would only measure kernel launches; count them on the next log.
                window["steps"] += 1
                window["time"] += time.perf_counter() - step_start
                window["data"] += data_ready - step_start
                if info.main:
                    progress.update(float("nan"), lr)
            if done_step % args.save_every == 0 or done_step == end_step:
                save(done_step)
    finally:
        progress.close()
        if metrics_file is not None:
            metrics_file.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return train(args)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests, flows): leave the process as found
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
