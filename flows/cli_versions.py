"""CLI commands of dataset roots: ``clipline versions``, ``clipline takedown``, ``clipline diff`` and the
``--dataset`` form of ``clipline build``. ``register(app)`` adds the first three to the ``clipline`` Typer app;
``build_dataset_version`` is what ``clipline build --dataset ROOT [--rebuild-latest] [--as-of TIME]`` runs.

    clipline build --dataset ROOT --input urls/ --querylist QL ... [--as-of 2025-03-01T02:00:00Z]
    clipline build --dataset ROOT --rebuild-latest          # latest data without the recorded takedowns
    clipline versions ROOT [--json]
    clipline takedown ROOT --urls FILE | --uids FILE | --domains FILE
    clipline diff ROOT 2 3 [--json] [--out FILE.json|FILE.parquet]

A user mistake (unknown version, a ROOT that is not a dataset root, a takedown file with a bad line, ...) is one
line on stderr naming the file / line / version and exit code 2, and nothing is written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from flows.cli_errors import fail as _fail, run_user as _run_user


# ------------------------------------------------------------------------------------------------- build --dataset


def build_dataset_version(dataset: str, config: Optional[Path], flags: dict, *, rebuild_latest: bool = False,
                          as_of: Optional[str] = None, print_config: bool = False) -> dict | None:
    """``clipline build --dataset ROOT ...``: ``config`` (YAML) and ``flags`` (the build command's typed flags, as
    BuildConfig paths) as for a plain build, except that ``--out``/``--work`` are the root's."""
    from flows.config import load_build_config
    from flows.versions import build_version
    from pipelines.dataset.crawl_store import parse_time
    from pipelines.dataset.versions import DatasetRoot

    if flags.get("out") or flags.get("work"):
        _fail("--out/--work cannot be used with --dataset (a version is written to ROOT/versions/NNNN)")
    if as_of is not None:
        _run_user(parse_time, as_of, "--as-of")
    if rebuild_latest:
        if config is not None or flags:
            _fail("--rebuild-latest takes the latest version's config; give only --dataset and --as-of")
        _run_user(DatasetRoot.open, dataset)
        build_config: Any = None
    else:
        where = DatasetRoot(str(dataset))  # paths only: nothing is created before the checks pass
        build_config = _run_user(load_build_config, config, {**flags, "out": where.staging, "work": where.work})
        if print_config:
            import yaml

            typer.echo(yaml.safe_dump(build_config.to_dict(), sort_keys=False), nl=False)
            return None
        from flows.cli import _preflight

        _preflight(build_config)
        _run_user(DatasetRoot.open, dataset, create=True, dry_run=True)
    result = _run_user(build_version, str(dataset), build_config, as_of=as_of, rebuild_latest=rebuild_latest)
    typer.echo(result["message"])
    if result["status"] == "built":
        typer.echo(f"{result['dir']}/ ({result['samples']:,} samples, {result['shards']} shard(s)); "
                   f"card: {result['dir']}/README.md and card.html")
    return result


# ------------------------------------------------------------------------------------------------------ versions


def versions(root: str = typer.Argument(..., help="Dataset root (local path or s3:// prefix)."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the published versions of a dataset root with their sizes (LATEST marked)."""
    from pipelines.dataset.versions import DatasetRoot, human_bytes, list_versions

    ds = _run_user(DatasetRoot.open, root)
    rows = _run_user(list_versions, ds)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        typer.echo(f"{root}: no published version yet")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"versions of {root}")
    for col in ("version", "as of", "samples", "shards", "shard bytes", "total", "parent", "why"):
        table.add_column(col, justify="right" if col in ("samples", "shards", "shard bytes", "total") else "left")
    for r in rows:
        parent = f"{r['parent']['version']:04d}" if r.get("parent") else "-"
        table.add_row(f"{r['version']:04d}{' (LATEST)' if r['latest'] else ''}", str(r["as_of"]),
                      f"{r['samples']:,}", str(r["shards"]), human_bytes(r["shard_bytes"]), human_bytes(r["bytes"]),
                      parent, str(r.get("reason") or ""))
    Console(width=160).print(table)


# ------------------------------------------------------------------------------------------------------ takedown


def takedown(root: str = typer.Argument(..., help="Dataset root."),
             urls: Optional[str] = typer.Option(None, "--urls", help="File: one http(s) URL a line."),
             uids: Optional[str] = typer.Option(None, "--uids", help="File: one sample uid (32 hex digits) a line."),
             domains: Optional[str] = typer.Option(None, "--domains", help="File: one domain a line (subdomains "
                                                                           "included).")):
    """Record a removal request: every later version leaves the matching pairs out (reason `takedown`) and their
    stored image bytes are deleted from the crawl store. `clipline build --dataset ROOT --rebuild-latest` makes
    a version without them now."""
    from pipelines.dataset.takedown import request as record_takedown

    given = [(k, v) for k, v in (("url", urls), ("uid", uids), ("domain", domains)) if v]
    if len(given) != 1:
        _fail("give exactly one of --urls FILE, --uids FILE, --domains FILE")
    kind, source = given[0]
    doc = _run_user(record_takedown, root, kind, source)
    typer.echo(f"recorded {doc['n']} {kind}(s) from {source} -> {doc['file']}; stored image bytes deleted for "
               f"{doc['bytes_deleted']} URL(s). Run `clipline build --dataset {root} --rebuild-latest` for a version "
               f"without them.")


# ---------------------------------------------------------------------------------------------------------- diff


def diff(root: str = typer.Argument(..., help="Dataset root."),
         a: str = typer.Argument(..., help="Version A (number, vN or latest)."),
         b: str = typer.Argument(..., help="Version B."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
         out: Optional[str] = typer.Option(None, "--out", help="Also write every changed uid with its reason "
                                                               "(.json or .parquet)."),
         top: int = typer.Option(10, help="Entries with the largest count change to show.")):
    """Samples added and removed between two versions, with reasons, and the entries that moved most."""
    from pipelines.core import storage
    from pipelines.dataset.diff import diff_table, diff_versions
    from pipelines.dataset.versions import DatasetRoot

    ds = _run_user(DatasetRoot.open, root)
    va, vb = _run_user(ds.resolve, a), _run_user(ds.resolve, b)
    d = _run_user(diff_versions, ds, va, vb, top=top)
    if out:
        if out.endswith(".parquet"):
            storage.write_table(out, diff_table(d))
        else:
            storage.write_json(out, d)
    summary = {k: v for k, v in d.items() if k not in ("added_uids", "removed_uids", "why")}
    if as_json:
        typer.echo(json.dumps(summary, indent=1, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    console.print(f"{va:04d} -> {vb:04d}: {d['samples']['a']:,} -> {d['samples']['b']:,} samples; "
                  f"+{d['added']:,} added, -{d['removed']:,} removed")
    t = Table(title="changes by reason")
    for col in ("change", "why", "samples"):
        t.add_column(col, justify="right" if col == "samples" else "left")
    for why, n in d["added_by_reason"].items():
        t.add_row("added", why, f"{n:,}")
    for why, n in d["removed_by_reason"].items():
        t.add_row("removed", why, f"{n:,}")
    console.print(t)
    m = Table(title=f"largest entry movers ({d['entries_changed']} entries changed)")
    for col in ("entry", "before", "after", "delta"):
        m.add_column(col, justify="left" if col == "entry" else "right")
    for mv in d["movers"]:
        m.add_row(str(mv["entry"] if mv["entry"] is not None else f"#{mv['entry_id']}"), str(mv["before"]),
                  str(mv["after"]), f"{mv['delta']:+d}")
    console.print(m)


def register(app: typer.Typer) -> None:
    """Add `versions`, `takedown` and `diff` to the clipline app (`build --dataset` is in flows/cli.py's build)."""
    app.command("versions")(versions)
    app.command("takedown")(takedown)
    app.command("diff")(diff)


def main() -> None:  # pragma: no cover - `python -m flows.cli_versions ...` until cli.py registers the commands
    from flows.cli import app

    register(app)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
