"""Normalising a checked manifest: every value resolved, edit ids derived, then typed rows.

:func:`normalized_table` turns a table and its :class:`~manifests.validate.Analysis` into the
normalised table (``NORMALIZED_SCHEMA`` columns, then the passthrough columns) that planning
shards; :func:`edit_rows` turns (a subset of) that table into :class:`EditRow` objects, building
each distinct method config once.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from editing.configs import P2PConfig, PnPConfig, config_from_settings
from manifests.identity import derive_edit_ids
from manifests.load import FILES_METADATA_KEY
from manifests.problems import ManifestError
from manifests.schema import KNOWN_COLUMNS, NORMALIZED_SCHEMA, EditRow
from manifests.validate import Analysis, RowValues, analyse

__all__ = ["normalize", "normalized_table", "edit_rows", "passthrough_columns"]

_PANDAS_INDEX_RE = re.compile(r"^__index_level_\d+__$")  # written by pandas, not user data


def passthrough_columns(table: pa.Table) -> list[str]:
    """The manifest's passthrough column names (not known columns, not pandas index columns)."""
    return [
        c
        for c in table.column_names
        if c not in KNOWN_COLUMNS and c != "row" and not _PANDAS_INDEX_RE.match(c)
    ]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (for bulk creation of acyclic objects)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _derive_ids(arrays: dict[str, pa.Array], v: RowValues, rows: np.ndarray) -> list[str]:
    """Derived edit ids of `rows` (resolved values, settings hashed as canonical JSON)."""
    take = pa.array(rows)
    settings = pa.array(v.settings_identity, pa.large_string()).take(
        pa.array(v.settings_codes[rows])
    )
    return derive_edit_ids(
        arrays["image_uri"].take(take),
        arrays["source_prompt"].take(take),
        arrays["target_prompt"].take(take),
        v.method.take(take),
        settings,
        v.seed[rows],
        v.num_steps[rows],
        v.guidance[rows],
        v.negative.take(take),
    )


def normalized_table(table: pa.Table, analysis: Analysis, *, first_row: int = 0) -> pa.Table:
    """The normalised form of `table` from its `analysis` (which must have no problems).

    Columns: those of ``NORMALIZED_SCHEMA`` (``row`` = position in `table` plus `first_row`, for
    a batch of a larger manifest; ``edit_id`` given
    or derived; ``method``, ``seed``, ``num_steps``, ``guidance_scale``, ``negative_prompt``
    filled; ``settings`` = canonical JSON of the method settings other than guidance_scale and
    negative_prompt), then the passthrough columns untouched. ``image_uri`` is kept as written.
    """
    if analysis.problems:
        raise ManifestError(analysis.problems)
    v, arrays, n = analysis.values, analysis.arrays, analysis.n
    if v is None:  # pragma: no cover - an empty manifest is a problem
        raise ValueError("an empty manifest has no normalised form")
    settings = pa.array(v.settings_identity, pa.string()).take(pa.array(v.settings_codes))
    missing = np.asarray(v.missing_id, dtype=bool)
    derived_rows = np.flatnonzero(missing)
    derived: list[str] = []
    if len(derived_rows):
        with (
            _gc_paused()
        ):  # millions of short-lived strings, no cycles: skip the collector's passes
            derived = _derive_ids(arrays, v, derived_rows)
    if "edit_id" in arrays and len(derived_rows) < n:
        given = arrays["edit_id"].cast(pa.string())
        edit_id = (
            pc.replace_with_mask(given, pa.array(missing), pa.array(derived, pa.string()))
            if derived
            else given
        )
    else:
        edit_id = pa.array(derived, pa.string())

    columns: dict[str, pa.Array] = {
        "row": pa.array(np.arange(first_row, first_row + n, dtype=np.int64)),
        "edit_id": edit_id,
        "image_uri": arrays["image_uri"].cast(pa.string()),
        "source_prompt": arrays["source_prompt"].cast(pa.string()),
        "target_prompt": arrays["target_prompt"].cast(pa.string()),
        "method": v.method.cast(pa.string()),
        "seed": pa.array(v.seed, pa.int64()),
        "num_steps": pa.array(v.num_steps, pa.int64()),
        "guidance_scale": pa.array(v.guidance, pa.float64()),
        "negative_prompt": v.negative.cast(pa.string()),
        "settings": settings,
    }
    fields = list(NORMALIZED_SCHEMA)
    out: list[pa.Array | pa.ChunkedArray] = [columns[f.name] for f in fields]
    for name in passthrough_columns(table):
        fields.append(table.schema.field(name))
        out.append(table.column(name))
    metadata = {
        k: val for k, val in (table.schema.metadata or {}).items() if k == FILES_METADATA_KEY
    }
    return pa.Table.from_arrays(out, schema=pa.schema(fields, metadata=metadata or None))


def normalize(table: pa.Table) -> pa.Table:
    """Check `table` and return its normalised form (see :func:`normalized_table`); raises
    :class:`ManifestError` listing every problem. Turn rows into :class:`EditRow` objects with
    :func:`edit_rows`. (``manifests.prepare_manifest`` loads, checks and normalises in one pass.)
    """
    return normalized_table(table, analyse(table))


def edit_rows(normalized: pa.Table, *, batch_size: int = 8192) -> Iterator[EditRow]:
    """:class:`EditRow` objects from a normalised table (or any subset of its rows), lazily.

    Each distinct settings text is parsed once and each distinct (method, settings, guidance,
    negative prompt) becomes one config, shared by its rows (configs are frozen).
    """
    known = [f.name for f in NORMALIZED_SCHEMA]
    absent = [c for c in known if c not in normalized.column_names]
    if absent:
        raise ValueError(f"not a normalized manifest: missing column(s) {absent}")
    extra = [c for c in normalized.column_names if c not in known]
    parsed: dict[str, dict[str, Any]] = {}
    configs: dict[tuple[str, str, float, str], PnPConfig | P2PConfig] = {}

    def config_of(row: int, method: str, text: str, guidance: float, negative: str):
        key = (method, text, guidance, negative)
        config = configs.get(key)
        if config is None:
            base = parsed.get(text)
            if base is None:
                base = parsed[text] = json.loads(text)
            settings = {**base, "guidance_scale": guidance, "negative_prompt": negative}
            try:
                config = configs[key] = config_from_settings(method, settings)
            except ValueError as exc:  # a normalised table holds checked settings
                raise ValueError(
                    f"row {row}: settings {text!r} of method {method!r}: {exc}"
                ) from exc
        return config

    for batch in normalized.to_batches(max_chunksize=batch_size):
        cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
        for i in range(batch.num_rows):
            yield EditRow(
                row=cols["row"][i],
                edit_id=cols["edit_id"][i],
                image_uri=cols["image_uri"][i],
                source_prompt=cols["source_prompt"][i],
                target_prompt=cols["target_prompt"][i],
                method=cols["method"][i],
                seed=cols["seed"][i],
                num_steps=cols["num_steps"][i],
                guidance_scale=cols["guidance_scale"][i],
                negative_prompt=cols["negative_prompt"][i],
                config=config_of(
                    cols["row"][i],
                    cols["method"][i],
                    cols["settings"][i],
                    cols["guidance_scale"][i],
                    cols["negative_prompt"][i],
                ),
                passthrough={name: cols[name][i] for name in extra},
            )
