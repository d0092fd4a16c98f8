"""The GPU check of issue 13 as one prepared script, sized for about 10 minutes of one GPU (exits 0 without CUDA).

    python benchmarks/gpu_bench.py [--steps 40] [--budget-s 540] [--out results.json]

In order (each part is skipped with a note when the time budget is spent, so partial results still come back):
  1. synthetic batches already in GPU memory (no loader): ViT-B/32, batch 256, bf16 autocast, fused AdamW;
     clip_train's model + loss, eager and torch.compile; open_clip's ViT-B-32 model + ClipLoss in the same loop when
     open_clip is importable (the same optimiser, the same inputs). samples/s = median over the steps after --skip;
     MFU = samples/s x FLOPs of one forward+backward per sample (torch.utils.flop_counter) / the GPU's dense bf16
     peak.
  2. real shards: synthetic 256-px JPEG webdataset shards on local disk, `clip_train.train.main` end to end (loader
     workers, bf16, fused AdamW), eager.
  3. the GPU tests of the suite (tests/test_clip_gpu.py: bf16, grad checkpointing, torch.compile; fused AdamW is the
     trainer's default on CUDA), through pytest.
Goal (issue 13): >= 1.0x open_clip's samples/s, MFU >= 40%. Writes the results JSON to --out and to $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def in_memory_rate(build, steps: int, skip: int, batch: int, compile_: bool, text_len: int = 20) -> dict:
    """samples/s of model + loss + fused AdamW on fixed GPU tensors (bf16 autocast)."""
    from clip_train.loss import ClipLoss

    model, vocab = build()
    model = model.cuda().train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, fused=True)
    step_model = torch.compile(model) if compile_ else model
    loss_fn = ClipLoss()
    g = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, device="cuda", generator=g)
    tokens = torch.randint(1, vocab - 2, (batch, text_len), device="cuda", generator=g)
    tokens[:, -1] = vocab - 1  # end-of-text at the highest id: where both implementations pool
    times = []
    for i in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = step_model(images, tokens)
            if isinstance(out, dict):  # open_clip returns a dict in newer versions
                out = (out["image_features"], out["text_features"], out["logit_scale"])
            loss = loss_fn(*out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    rate = batch / statistics.median(times[skip:])
    peak_mem = torch.cuda.max_memory_allocated() / 2**30
    del model, step_model, opt
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return {"samples_per_s": rate, "median_step_s": statistics.median(times[skip:]), "first_step_s": times[0],
            "peak_mem_gib": round(peak_mem, 2)}


def clip_train_builder():
    from clip_train.model import CLIP, load_config

    cfg = load_config("ViT-B-32")
    cfg.text_cfg.eot_token_id = None  # pool at argmax, as open_clip
    return CLIP(cfg), cfg.text_cfg.vocab_size


def open_clip_builder():
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None)

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, image, text):
            return (self.m.encode_image(image, normalize=True), self.m.encode_text(text, normalize=True),
                    self.m.logit_scale.exp())

    return Wrap(model), 49408


def run_pytest_gpu() -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_clip_gpu.py"],
                          cwd=ROOT, capture_output=True, text=True)
    return {"returncode": proc.returncode, "tail": proc.stdout[-1500:] + proc.stderr[-500:],
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-steps", type=int, default=60)
    p.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new parts after this many seconds")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; nothing measured (this script is meant for a GPU machine).")
        return 0
    from train_throughput import model_flops_per_sample, peak_tflops, run_clip_train, write_synthetic_shards

    t_start = time.perf_counter()
    device = torch.cuda.get_device_name()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results: dict = {"device": device, "torch": torch.__version__, "batch_size": args.batch_size, "parts": {}, "notes": []}
    flops = model_flops_per_sample("ViT-B-32", text_len=20)
    peak = peak_tflops(device)
    results.update({"flops_per_sample": flops, "peak_bf16_tflops": peak})

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    def record(name: str, fn) -> None:
        if left() <= 0:
            results["notes"].append(f"{name}: skipped (time budget spent)")
            return
        try:
            r = fn()
        except Exception as exc:  # noqa: BLE001 - one failing part must not lose the others' numbers
            r = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        if "samples_per_s" in r and peak:
            r["mfu"] = r["samples_per_s"] * flops / (peak * 1e12)
        results["parts"][name] = r
        print(name, json.dumps(r), flush=True)
        _write(results, args.out)

    record("in-memory clip_train eager", lambda: in_memory_rate(clip_train_builder, args.steps, args.skip, args.batch_size, False))
    try:
        import open_clip  # noqa: F401

        record("in-memory open_clip eager", lambda: in_memory_rate(open_clip_builder, args.steps, args.skip, args.batch_size, False))
    except ImportError:
        results["notes"].append("open_clip not importable here: open_clip comparison skipped")
    record("in-memory clip_train compile", lambda: in_memory_rate(clip_train_builder, args.steps, args.skip, args.batch_size, True))
    if "in-memory open_clip eager" in results["parts"]:
        record("in-memory open_clip compile", lambda: in_memory_rate(open_clip_builder, args.steps, args.skip, args.batch_size, True))

    work = Path(tempfile.mkdtemp(prefix="clip-gpu-bench-"))
    try:
        def shards_run():
            shards = work / "shards"
            write_synthetic_shards(shards, args.batch_size * 24, per_shard=512)
            ns = argparse.Namespace(batch_size=args.batch_size, steps=args.shard_steps, workers=args.workers, skip=args.skip)
            return run_clip_train(shards, work, ns, [])

        record("real shards clip_train.train eager", shards_run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record("pytest tests/test_clip_gpu.py", run_pytest_gpu)
    ours, theirs = (results["parts"].get("in-memory clip_train eager", {}), results["parts"].get("in-memory open_clip eager", {}))
    if "samples_per_s" in ours and "samples_per_s" in theirs:
        results["speedup_vs_open_clip_eager"] = ours["samples_per_s"] / theirs["samples_per_s"]
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    _write(results, args.out)
    print(json.dumps(results))
    return 0


def _write(results: dict, out: str | None) -> None:
    for target in (out, os.path.join(os.environ["OUT"], "gpu_bench.json") if os.environ.get("OUT") else None):
        if target:
            Path(target).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
