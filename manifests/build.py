"""Manifest builders: a catalog (image URI + caption) times a list of styles -> a restyle manifest.

Bad inputs (a missing or unreadable catalog, a malformed template, an unknown column, an empty
style) raise :class:`~manifests.problems.ManifestError` naming the input and the problem, before
anything is written.
"""

from __future__ import annotations

import io
import os
import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from manifests.problems import ManifestError, Problem
from manifests.schema import KNOWN_COLUMNS, METHODS
from storage.base import NotFound
from storage.uri import read_uri

__all__ = ["read_catalog", "restyle_manifest"]

DEFAULT_TEMPLATE = "{caption}, {style}"


def _refuse(reason: str, column: str | None = None) -> ManifestError:
    """The error of a restyle input that cannot be used (one problem, not about a row)."""
    return ManifestError([Problem(None, column, reason)])


def read_catalog(catalog: str | os.PathLike[str], *, s3_endpoint: str | None = None) -> pa.Table:
    """A catalog file (``.parquet`` or ``.csv`` in UTF-8, local path or URI) as a table;
    ``ManifestError`` naming the catalog when it is missing or cannot be read."""
    uri = os.fspath(catalog)
    suffix = Path(uri.split("?")[0]).suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise _refuse(f"catalog must be a .parquet or .csv file, got {uri!r}")
    try:
        data = read_uri(uri, s3_endpoint=s3_endpoint)
    except NotFound:
        raise _refuse(f"catalog {uri!r} does not exist") from None
    if suffix == ".parquet":
        try:
            return pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as exc:
            raise _refuse(f"catalog {uri!r} cannot be read as Parquet: {exc}") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refuse(
            f"catalog {uri!r} is not UTF-8 text (byte {exc.start}: {data[exc.start : exc.start + 1]!r}); "
            "save the CSV as UTF-8"
        ) from None
    try:
        return pacsv.read_csv(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise _refuse(f"catalog {uri!r} cannot be read as CSV: {exc}") from None


# Manifest columns a restyle writes itself: a catalog column of one of these names would clash.
RESTYLE_COLUMNS = (
    "source_prompt",
    "target_prompt",
    "method",
    "settings",
    "style",
    "image_uri",
    "edit_id",
)


def restyle_manifest(
    catalog: pa.Table | str | os.PathLike[str],
    styles: Sequence[str],
    *,
    template: str = DEFAULT_TEMPLATE,
    method: str = "pnp",
    image_column: str = "image_uri",
    caption_column: str = "caption",
    s3_endpoint: str | None = None,
    settings: str | None = None,
) -> pa.Table:
    """Catalog x styles -> a manifest: one row per (catalog row, style), catalog order then style order.

    ``source_prompt`` is the caption; ``target_prompt`` is ``template`` formatted with
    ``caption``, ``style`` and any other catalog column (e.g. ``"{caption} in {style}"``).
    The other catalog columns are kept as passthrough, plus a ``style`` column. ``settings`` (a JSON
    object of the method's settings, e.g. ``'{"attn_t": 0.8}'``) goes into every row; validation
    checks it like any manifest's.
    """
    styles = _checked_styles(styles, method)
    table = (
        catalog if isinstance(catalog, pa.Table) else read_catalog(catalog, s3_endpoint=s3_endpoint)
    )
    fields, extras = _check_catalog(table, template, image_column, caption_column)
    # each catalog row once per style
    n, k = table.num_rows, len(styles)
    expanded = table.take(pa.array(np.repeat(np.arange(n, dtype=np.int64), k)))
    style_col = pa.array(styles * n, pa.string())
    targets = _target_prompts(expanded, style_col, template, fields, caption_column, k)
    # known columns first, then passthrough
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        "image_uri": pc.cast(expanded.column(image_column), pa.string()),
        "source_prompt": pc.cast(expanded.column(caption_column), pa.string()),
        "target_prompt": pa.array(targets, pa.string()),
        "method": pa.array([method] * (n * k), pa.string()),
    }
    if settings is not None:
        columns["settings"] = pa.array([settings] * (n * k), pa.string())
    for c in extras:
        columns[c] = expanded.column(c)
    columns["style"] = style_col
    known_first = [c for c in KNOWN_COLUMNS if c in columns] + [
        c for c in columns if c not in KNOWN_COLUMNS
    ]
    return pa.table({c: columns[c] for c in known_first})


def _checked_styles(styles: Sequence[str], method: str) -> list[str]:
    """The styles as a list; ``ValueError`` for no, empty or repeated styles, or an unknown method."""
    if isinstance(styles, str):
        raise _refuse("styles must be a list of strings, not one string")
    styles = list(styles)
    if not styles:
        raise _refuse("need at least one style")
    bad = [s for s in styles if not isinstance(s, str) or not s.strip()]
    if bad:
        raise _refuse(f"styles must be non-empty strings, got {bad!r} (an empty --style?)")
    dupes = sorted({s for s in styles if styles.count(s) > 1})
    if dupes:
        raise _refuse(f"duplicate styles {dupes}")
    if method not in METHODS:
        raise _refuse(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return styles


def _check_catalog(
    table: pa.Table, template: str, image_column: str, caption_column: str
) -> tuple[set[str], list[str]]:
    """(the template's fields, the catalog's passthrough columns); ``ValueError`` for a missing image or
    caption column, a template field that is no column, a clashing column name, or no rows."""
    names = table.column_names
    for col, what in ((image_column, "image"), (caption_column, "caption")):
        if col not in names:
            raise _refuse(f"catalog has no {what} column {col!r}; columns: {names}")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise _refuse(
            f"template {template!r} is malformed ({exc}); write fields as {{caption}} and {{style}}, "
            "and a literal brace as {{ or }}"
        ) from None
    allowed = {"caption", "style", *names}
    unknown = sorted(fields - allowed)
    if unknown or "" in fields:
        raise _refuse(
            f"template {template!r} uses unknown field(s) {unknown or ['{}']}; use {sorted(allowed)}"
        )
    extras = [c for c in names if c not in (image_column, caption_column)]
    clash = [c for c in extras if c in RESTYLE_COLUMNS]
    if clash:
        raise _refuse(f"catalog column(s) {clash} would clash with the manifest's own; rename them")
    if table.num_rows == 0:
        raise _refuse("catalog has no rows")
    return fields, extras


def _target_prompts(
    expanded: pa.Table,
    style_col: pa.Array,
    template: str,
    fields: set[str],
    caption_column: str,
    per_row: int,
) -> list[str]:
    """The template filled for each (catalog row, style) row; ``ValueError`` for an empty caption."""
    names = expanded.column_names
    captions = expanded.column(caption_column).to_pylist()
    context_cols = {
        c: expanded.column(c).to_pylist() for c in fields if c in names and c != caption_column
    }
    targets = []
    for i, (cap, style) in enumerate(zip(captions, style_col.to_pylist(), strict=True)):
        if cap is None or not str(cap).strip():
            raise _refuse(
                f"catalog row {i // per_row} has an empty caption in column {caption_column!r}"
            )
        values = {c: v[i] for c, v in context_cols.items()}
        try:
            targets.append(template.format(**{**values, "caption": cap, "style": style}))
        except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            raise _refuse(
                f"template {template!r} cannot be filled for catalog row {i // per_row}: {exc}"
            ) from None
    return targets
