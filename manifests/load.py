"""Loading a manifest: one Parquet file, or every ``*.parquet`` below a folder or S3 prefix.

Everything is read through the ``storage`` object-store interface (``open_store`` + ``exists``,
``list`` and ``get``), so a local folder and an S3 prefix follow one code path. The files of a
folder must agree on their columns; the table remembers which file each row came from
(:func:`manifest_files`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.problems import ManifestError, Problem
from storage.base import NotFound, ObjectStore
from storage.uri import open_store, split_uri

__all__ = ["FILES_METADATA_KEY", "load_manifest", "manifest_files"]

logger = logging.getLogger(__name__)

FILES_METADATA_KEY = b"editflow.manifest_files"  # schema metadata: JSON [[file uri, rows], ...]


@dataclass(frozen=True, slots=True)
class _Part:
    """One Parquet file of a manifest: where it is and how to name it."""

    store: ObjectStore
    key: str

    @property
    def name(self) -> str:
        return self.store.uri(self.key)


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _single_object(scheme: str, bucket: str, path: str, s3_endpoint: str | None) -> _Part | None:
    """The one object `path` names when it is a file (local) or an existing key (S3), else None."""
    if scheme == "s3":
        if not path or path.endswith("/"):
            return None
        root = open_store(f"s3://{bucket}", s3_endpoint=s3_endpoint)
        return _Part(root, path) if root.exists(path) else None
    folder, name = os.path.split(path)
    if not name:
        return None
    parent = open_store(folder or os.sep, follow_links=True)  # inputs: links are followed
    try:
        return _Part(parent, name) if parent.exists(name) else None
    except ValueError:  # a name that cannot be a key ('.', '..'): not a file
        return None


def _parts(uri: str, s3_endpoint: str | None) -> list[_Part]:
    """The Parquet files of the manifest at `uri`, in name order (hidden names skipped)."""
    scheme, bucket, path = split_uri(uri)
    single = _single_object(scheme, bucket, path, s3_endpoint)
    if single is not None:
        return [single]
    store = open_store(uri, s3_endpoint=s3_endpoint, follow_links=True)
    listed = list(store.list())
    # An empty local folder and a missing one list alike; only the message tells them apart.
    if scheme == "file" and not listed and not os.path.isdir(path):
        raise ManifestError([Problem(None, None, f"no manifest file or folder at {path}")])
    return [_Part(store, k) for k in listed if k.endswith(".parquet") and not _hidden(k)]


def _read(part: _Part) -> pa.Table | None:
    """The file's table; None for a broken local link (not a file: the old folder walk never took one).
    Raises ``NotFound`` when a listed object is gone (removed while the manifest was being read)."""
    try:
        data = part.store.get(part.key)
    except NotFound:
        if os.path.islink(part.name):  # local stores name their objects by path
            logger.warning("manifest file %s is a broken link; skipped", part.name)
            return None
        raise
    return pq.ParquetFile(pa.BufferReader(data)).read()


def _column_problems(tables: list[tuple[str, pa.Table]]) -> list[Problem]:
    """Columns named twice in one file; files whose columns or types disagree with the first's."""
    problems: list[Problem] = []
    for name, t in tables:
        for col, count in Counter(t.column_names).items():
            if count > 1:
                problems.append(
                    Problem(
                        None,
                        col,
                        f"{name}: column appears {count} times; rename or drop the copies",
                    )
                )
    if not tables:
        return problems
    first_name, first = tables[0]
    ref = first.column_names
    for name, t in tables[1:]:
        lacking = [c for c in ref if c not in t.column_names]
        extra = [c for c in t.column_names if c not in ref]
        if lacking or extra:
            detail = "; ".join(
                part
                for part in (
                    f"lacks {lacking} that {first_name} has" if lacking else "",
                    f"has {extra} that {first_name} lacks" if extra else "",
                )
                if part
            )
            problems.append(
                Problem(None, None, f"manifest files disagree on columns: {name} {detail}")
            )
            continue
        for col in ref:
            t1, t2 = first.schema.field(col).type, t.schema.field(col).type
            if t1 == t2:
                continue
            try:
                pa.unify_schemas(
                    [pa.schema([(col, t1)]), pa.schema([(col, t2)])], promote_options="permissive"
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                problems.append(
                    Problem(None, col, f"{name} has type {t2} but {first_name} has {t1}")
                )
    return problems


def load_manifest(uri: str, *, s3_endpoint: str | None = None) -> pa.Table:
    """Read the manifest at `uri`: one Parquet file, or every ``*.parquet`` below a folder or S3
    prefix (name order; names starting with '.' or '_' skipped), concatenated.

    The files must agree on their columns (checked here: no silent null-filling); types are
    promoted where lossless (int32 + int64, string + large_string). Raises
    :class:`ManifestError` listing unreadable or disagreeing files.
    """
    parts = _parts(uri, s3_endpoint)
    if not parts:
        raise ManifestError([Problem(None, None, f"no Parquet files at {uri}")])
    problems: list[Problem] = []
    readable: list[tuple[str, pa.Table]] = []
    for part in parts:
        try:
            table = _read(part)
        except NotFound:
            problems.append(
                Problem(
                    None,
                    None,
                    f"{part.name}: listed but gone when read (was it removed while loading?)",
                )
            )
            continue
        except (pa.ArrowException, OSError) as exc:
            problems.append(Problem(None, None, f"{part.name}: cannot read as Parquet: {exc}"))
            continue
        if table is not None:
            readable.append((part.name, table))
    if not readable and not problems:
        raise ManifestError([Problem(None, None, f"no Parquet files at {uri}")])
    problems += _column_problems(readable)
    if problems:
        raise ManifestError(problems)
    ref = readable[0][1].column_names
    ordered = [t.select(ref) for _, t in readable]
    table = (
        ordered[0] if len(ordered) == 1 else pa.concat_tables(ordered, promote_options="permissive")
    )
    files = json.dumps([[name, t.num_rows] for name, t in readable]).encode()
    metadata = dict(table.schema.metadata or {})
    metadata[FILES_METADATA_KEY] = files
    logger.info("loaded manifest %s: %d rows from %d file(s)", uri, table.num_rows, len(readable))
    return table.replace_schema_metadata(metadata)


def manifest_files(table: pa.Table) -> list[tuple[str, int]]:
    """The (file URI, row count) pairs a :func:`load_manifest` table was read from, in row order."""
    raw = (table.schema.metadata or {}).get(FILES_METADATA_KEY)
    return [(name, int(rows)) for name, rows in json.loads(raw)] if raw else []
