"""Evaluation of a training run: `main(argv)` behind `clipline eval`, and the library calls other stages use.

`clipline eval --checkpoint PATH --eval-set SPEC... --out DIR [--linear-probe] [--retrieval SPEC]` writes
DIR/eval.json ({"eval_sets": {name: {zeroshot_top1, zeroshot_top5, mean_per_class_recall, [linear_probe_top1], n}}},
plus per-class recall, the probe's chosen C and retrieval recall@1/5/10) and DIR/eval.md (local or s3://).
PATH is a clipline run directory, an open_clip checkpoint (+ its config) or an OpenAI state dict / TorchScript
file (see `clip_train.interop`). Evaluation sets come from the registry in `pipelines.evalsets` (spec strings such
as "digits", "cifar10:PATH"); `wds:ROOT` also reads CLIP_benchmark's webdataset layout (`clip_train.benchmark_wds`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from clip_train.checkpoint import atomic_write_bytes, atomic_write_json
from clip_train.errors import EvalError
from clip_train.linear_probe import linear_probe
from clip_train.model import CLIP
from clip_train.retrieval import load_captioned_pairs, retrieval_metrics
from clip_train.zeroshot import classification_metrics, image_features, zeroshot_logits


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu", model_config=None, bpe: str | None = None):
    """(model in eval mode, tokenizer, config dict with "model", "step", "format") of any supported checkpoint."""
    from clip_train.interop import load_any

    loaded = load_any(str(checkpoint), device, model_config=model_config, bpe=bpe)
    config = dict(loaded.info.get("config") or {})
    config.update({"model": loaded.info.get("model"), "step": loaded.info.get("step"), "format": loaded.format,
                   "fingerprint_files": loaded.files})
    return loaded.model, loaded.tokenizer, config


def _eval_set(spec_or_set):
    if isinstance(spec_or_set, str):
        from clip_train.benchmark_wds import is_benchmark_layout, load_benchmark_wds

        if spec_or_set.startswith("wds:") and is_benchmark_layout(spec_or_set[len("wds:"):]):
            return load_benchmark_wds(spec_or_set[len("wds:"):], spec=spec_or_set)
        from pipelines.evalsets import load_eval_set

        return load_eval_set(spec_or_set)
    return spec_or_set


def zeroshot_predictions(
    run_dir: str | Path, eval_set, device: str = "cpu", batch_size: int = 256
) -> list[tuple[str, int, int]]:
    """(eval_id, predicted_label, true_label) per example of an evaluation set (a spec string or an EvalSet), for a
    checkpoint in any supported format."""
    model, tokenizer, _ = load_model(run_dir, device)
    eval_set = _eval_set(eval_set)
    logits, labels, ids, _ = zeroshot_logits(model, tokenizer, eval_set, device, batch_size)
    predicted = np.argmax(logits, axis=1)  # first maximum on ties, as classification_metrics
    return [(i, int(p), int(t)) for i, p, t in zip(ids, predicted, labels)]


def evaluate_zeroshot(model: CLIP, tokenizer, eval_set, device="cpu", batch_size: int = 256) -> tuple[dict, torch.Tensor, np.ndarray]:
    logits, labels, _, feats = zeroshot_logits(model, tokenizer, eval_set, device, batch_size)
    metrics = classification_metrics(logits, labels, len(eval_set.class_names))
    metrics["per_class_recall"] = {eval_set.class_names[c]: r for c, r in metrics["per_class_recall"].items()}
    metrics["templates"] = len(eval_set.templates)
    return metrics, feats, labels


def probe_train_spec(spec: str) -> str | None:
    """The training split of a registry spec when the source has one (cifar10/cifar100 PATH[:test] -> PATH:train)."""
    from pipelines.evalsets import parse_spec

    kind, path, split = parse_spec(spec)
    if kind in ("cifar10", "cifar100") and split == "test":
        return f"{kind}:{path}:train"
    return None


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


class _Subset:
    """A view of some examples of an EvalSet (keeps its name, class names and templates)."""

    def __init__(self, eval_set, indices: np.ndarray):
        self.base, self.indices = eval_set, indices
        self.name, self.class_names, self.templates = eval_set.name, eval_set.class_names, eval_set.templates

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        for i in self.indices:
            yield self.base.example(int(i))


def evaluate_linear_probe(
    model: CLIP, spec: str, test_feats: torch.Tensor, test_labels: np.ndarray, device="cpu", batch_size: int = 256,
    max_train: int | None = 10_000, seed: int = 0,
) -> dict:
    """Probe trained on the source's training split when it has one, else on a seeded stratified half of the set
    itself (then scored on the other half)."""
    train_spec = probe_train_spec(spec) if isinstance(spec, str) else None
    if train_spec is not None:
        train_set = _eval_set(train_spec)
        subset = _Subset(train_set, _subsample(len(train_set), max_train, seed))
        train_x, train_y, _ = image_features(model, subset, device, batch_size)
        result = linear_probe(train_x.numpy(), train_y, test_feats.numpy(), test_labels, seed=seed)
        protocol = f"train split {train_spec}" + (f" ({len(subset)} sampled)" if len(subset) < len(train_set) else "")
    else:
        from clip_train.linear_probe import split_for_validation

        train_idx, test_idx = split_for_validation(test_labels, 0.5, seed)
        x = test_feats.numpy()
        result = linear_probe(x[train_idx], test_labels[train_idx], x[test_idx], test_labels[test_idx], seed=seed)
        protocol = "seeded stratified half of the set (no training split), scored on the other half"
    return {
        "linear_probe_top1": result.top1,
        "linear_probe_C": result.best_c,
        "linear_probe_val_accuracy": {f"{c:g}": a for c, a in result.val_accuracy.items()},
        "linear_probe_n_train": result.n_train + result.n_val,
        "linear_probe_n_test": result.n_test,
        "linear_probe_protocol": protocol,
    }


def _markdown(report: dict) -> str:
    lines = [f"# Evaluation of `{report['checkpoint']}` (step {report['step']})", ""]
    if report["eval_sets"]:
        lines += [
            "| eval set | n | zero-shot top-1 | top-5 | mean per-class recall | linear probe top-1 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, m in report["eval_sets"].items():
            probe = f"{100 * m['linear_probe_top1']:.2f}% (C={m['linear_probe_C']:g})" if "linear_probe_top1" in m else "-"
            lines.append(
                f"| {name} | {m['n']} | {100 * m['zeroshot_top1']:.2f}% | {100 * m['zeroshot_top5']:.2f}% | "
                f"{100 * m['mean_per_class_recall']:.2f}% | {probe} |"
            )
        for name, m in report["eval_sets"].items():
            lines += ["", f"## {name}: zero-shot recall per class ({m['templates']} templates)", "", "| class | recall |", "|---|---:|"]
            lines += [f"| {c} | {100 * r:.1f}% |" for c, r in m["per_class_recall"].items()]
    for name, r in report.get("retrieval", {}).items():
        lines += ["", f"## Retrieval: {name} ({r['n_images']} images, {r['n_captions']} captions)", ""]
        lines += ["| direction | R@1 | R@5 | R@10 |", "|---|---:|---:|---:|"]
        for direction, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
            lines.append(f"| {label} | " + " | ".join(f"{100 * r[f'{direction}_R@{k}']:.2f}%" for k in (1, 5, 10)) + " |")
    return "\n".join(lines) + "\n"


def evaluate_run(
    run_dir: str | Path, eval_specs: list, out_dir: str | Path | None = None, linear_probe_on: bool = False,
    retrieval_specs: list[str] = (), device: str = "cpu", batch_size: int = 256, probe_max_train: int | None = 10_000,
    retrieval_max: int = 1000, seed: int = 0, model_config=None, bpe: str | None = None,
) -> dict:
    """Evaluate a checkpoint on registry specs (or EvalSet objects); write eval.json and eval.md into out_dir."""
    model, tokenizer, config = load_model(run_dir, device, model_config, bpe)
    report: dict = {"checkpoint": str(run_dir), "model": config.get("model"), "step": config.get("step"),
                    "format": config.get("format"), "eval_sets": {}}
    for spec in eval_specs:
        eval_set = _eval_set(spec)
        name = eval_set.name
        suffix = 2
        while name in report["eval_sets"]:
            name, suffix = f"{eval_set.name}#{suffix}", suffix + 1
        metrics, feats, labels = evaluate_zeroshot(model, tokenizer, eval_set, device, batch_size)
        metrics["spec"] = spec if isinstance(spec, str) else getattr(eval_set, "spec", name)
        if getattr(eval_set, "errors", None):
            metrics["skipped_inputs"] = len(eval_set.errors)
        if linear_probe_on:
            metrics.update(evaluate_linear_probe(model, spec, feats, labels, device, batch_size, probe_max_train, seed))
        report["eval_sets"][name] = metrics
    if retrieval_specs:
        report["retrieval"] = {}
        for spec in retrieval_specs:
            images, captions, _ = load_captioned_pairs(spec, retrieval_max)
            report["retrieval"][spec] = retrieval_metrics(model, tokenizer, images, captions, device, batch_size)
    if out_dir is not None:
        from pipelines.core import storage

        atomic_write_json(storage.join(str(out_dir), "eval.json"), report)
        atomic_write_bytes(storage.join(str(out_dir), "eval.md"), _markdown(report).encode())
    return report


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2 through the CLI, like every other user error
        raise EvalError(f"{self.prog}: {message} (--help for usage)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="clipline eval", description="Zero-shot, linear-probe and retrieval evaluation of a run.")
    p.add_argument("--checkpoint", required=True,
                   help="a clipline run directory, an open_clip checkpoint (+ NAME.json beside it) or an OpenAI state "
                        "dict / TorchScript file")
    p.add_argument("--model-config", default=None,
                   help="model config for a checkpoint without one beside it (open_clip or clip_train JSON, or a name)")
    p.add_argument("--bpe-merges", default=None, help="CLIP-format BPE merges file for OpenAI / open_clip checkpoints")
    p.add_argument("--eval-set", nargs="+", default=[],
                   help="registry specs: digits, cifar10:PATH[:test|:train], folder:PATH, wds:GLOB, wds:ROOT "
                        "(CLIP_benchmark layout), synth:PATH")
    p.add_argument("--out", required=True, help="output directory for eval.json and eval.md")
    p.add_argument("--linear-probe", action="store_true", help="also fit a logistic-regression probe per eval set")
    p.add_argument("--retrieval", nargs="+", default=[], help="held-out captioned shards (dir, brace/glob pattern, s3://)")
    p.add_argument("--retrieval-max", type=int, default=1000, help="pairs read from each retrieval set")
    p.add_argument("--probe-max-train", type=int, default=10_000, help="training examples sampled for the probe")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.eval_set and not args.retrieval:
        raise EvalError("nothing to evaluate: give --eval-set SPEC... and/or --retrieval SPEC")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipelines.evalsets import EvalSetSpecError

    try:
        report = evaluate_run(
            args.checkpoint, args.eval_set, args.out, args.linear_probe, args.retrieval, device, args.batch_size,
            args.probe_max_train, args.retrieval_max, args.seed, args.model_config, args.bpe_merges,
        )
    except EvalSetSpecError as exc:  # a registry error is a user error: one line, exit 2
        raise EvalError(str(exc)) from None
    finally:
        torch.set_num_threads(threads)
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
