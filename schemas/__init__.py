"""Versioned pyarrow schemas of every table and manifest clipline writes.

Each table has a module here with ``VERSION`` and ``SCHEMA``; the version travels in the schema metadata
(``clipline.schema`` / ``clipline.version``) of every Parquet file written through :func:`conform`.
This package imports pyarrow only.
"""
from __future__ import annotations

import pyarrow as pa

from pipelines.core.errors import ClipError


class SchemaError(ClipError, ValueError):
    """A table does not match the schema it is written or read as."""


def versioned(name: str, version: int, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={b"clipline.schema": name.encode(), b"clipline.version": str(version).encode()})


def schema_id(schema: pa.Schema) -> str:
    md = schema.metadata or {}
    return f"{md.get(b'clipline.schema', b'?').decode()}/v{md.get(b'clipline.version', b'?').decode()}"


def conform(table: pa.Table, schema: pa.Schema, *, where: str = "table") -> pa.Table:
    """Return ``table`` with exactly ``schema``'s columns, order, types and metadata.

    Extra columns are dropped, missing nullable columns are filled with nulls; a missing non-nullable column, a
    null in a non-nullable column or a type that cannot be cast safely raises :class:`SchemaError` naming ``where``.
    """
    cols = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            if not col.type.equals(field.type):
                try:
                    col = col.cast(field.type, safe=True)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise SchemaError(
                        f"{where}: column {field.name!r} has type {col.type}, expected {field.type} ({exc})"
                    ) from None
            if not field.nullable and col.null_count:
                raise SchemaError(f"{where}: column {field.name!r} has {col.null_count} nulls, expected none")
        else:
            if not field.nullable:
                raise SchemaError(f"{where}: missing required column {field.name!r} ({schema_id(schema)})")
            col = pa.nulls(table.num_rows, field.type)
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
