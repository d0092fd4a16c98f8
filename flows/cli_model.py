"""CLI commands for trained models: ``clipline export`` (to open_clip's format) and ``clipline score`` (CLIP-score
of every sample of a dataset). ``register(app)`` adds them to the ``clipline`` Typer app (flows/cli.py).

A user mistake (missing checkpoint, unknown format, a dataset without shards...) is one line on stderr and exit code
2, like every other command.
"""
from __future__ import annotations

from typing import Optional

import typer

from flows.cli_errors import run_user as _run_user


def export(
    checkpoint: str = typer.Option(..., "--checkpoint", help="A clipline run directory (or any checkpoint that "
                                                             "`clipline eval` reads)."),
    format: str = typer.Option("open_clip", "--format", help="Export format: open_clip."),
    out: str = typer.Option(..., "--out", help="Output directory (local or s3://) for NAME.json and NAME.pt."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in open_clip (default: clipline-<model>)."),
    model_config: Optional[str] = typer.Option(None, "--model-config", help="Model config for a checkpoint without "
                                                                            "one beside it."),
    bpe_merges: Optional[str] = typer.Option(None, "--bpe-merges", help="CLIP-format merges file for OpenAI / "
                                                                        "open_clip checkpoints."),
):
    """Export a checkpoint to open_clip: OUT/NAME.json (model config) + OUT/NAME.pt (state dict) + tokenizer files.

    Load it with open_clip.add_model_config(OUT) and
    open_clip.create_model_and_transforms(NAME, pretrained="OUT/NAME.pt"); open_clip.get_tokenizer(NAME) gives the
    run's tokenizer.
    """
    from clip_train.errors import CheckpointError

    def run():
        if format != "open_clip":
            raise CheckpointError(f"--format {format!r}: only open_clip is supported")
        from clip_train.interop import export_open_clip

        return export_open_clip(checkpoint, out, name, model_config=model_config, bpe=bpe_merges)

    result = _run_user(run)
    files = result["files"]
    typer.echo(f"exported {result['source_format']} checkpoint {checkpoint} as open_clip model {result['name']!r}:")
    for kind in ("config", "weights", "tokenizer", "bpe"):
        if kind in files:
            typer.echo(f"  {kind:9s} {files[kind]}")
    typer.echo(f"load: open_clip.add_model_config({out!r}); "
               f"open_clip.create_model_and_transforms({result['name']!r}, pretrained={files['weights']!r})")


def score(
    checkpoint: str = typer.Option(..., "--checkpoint", help="A clipline run, an open_clip checkpoint (+ config) or "
                                                             "an OpenAI state dict / TorchScript file."),
    dataset: str = typer.Option(..., "--dataset", help="A build directory (its shards/) or a shard spec."),
    out: Optional[str] = typer.Option(None, "--out", help="Parquet to write (default BUILD/clip_score/scores.parquet)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    model_config: Optional[str] = typer.Option(None, "--model-config"),
    bpe_merges: Optional[str] = typer.Option(None, "--bpe-merges"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch intra-op threads."),
    force: bool = typer.Option(False, "--force", help="Recompute even when the same model scored the same shards."),
):
    """CLIP-score every sample of a dataset: cosine(image, caption) under the model, with its own preprocessing.

    Writes (uid, clip_score) Parquet with the model's fingerprint in its metadata; the build's
    --filter clip_score:threshold=X | clip_score:top_fraction=F reads it.
    """
    import torch

    from clip_train.clip_score import score_dataset
    from clip_train.errors import EvalError

    def run():
        if device not in ("auto", "cpu", "cuda"):
            raise EvalError(f"--device {device!r}: expected auto, cpu or cuda")
        dev = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        if threads:
            torch.set_num_threads(threads)
        return score_dataset(checkpoint, dataset, out, batch_size, dev, model_config, bpe_merges, reuse=not force)

    result = _run_user(run)
    typer.echo(f"{'reused' if result.get('reused') else 'scored'} {result['n']} samples "
               f"({result['n_unscored']} without a score) -> {result['out']}")
    if result.get("mean") is not None:
        q = result["quantiles"]
        typer.echo(f"clip_score mean {result['mean']:.4f}; quantiles 10% {q['0.1']:.4f} 30% {q['0.3']:.4f} "
                   f"50% {q['0.5']:.4f} 70% {q['0.7']:.4f} 90% {q['0.9']:.4f}; model {result['model_fingerprint'][:12]}")


def register(app: typer.Typer) -> None:
    """Add `export` and `score` to the clipline app."""
    app.command("export")(export)
    app.command("score")(score)
