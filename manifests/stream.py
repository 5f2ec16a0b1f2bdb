"""A manifest read and checked batch by batch: memory bounded by a batch, not by the manifest.

    source = open_manifest("s3://bucket/manifests/", s3_endpoint=endpoint)  # parts agree, or ManifestError
    scan = ManifestScan(source, budget=budget)
    for batch in scan.batches():        # each batch checked as it is read (no checks across rows)
        ...                             # batch.normalized() once the scan has found no problem
    scan.finish()                       # repeated edit ids / edits, over the whole manifest
    scan.raise_if_invalid()             # ManifestError: the first problems and a count per kind

The checks across rows keep 8 bytes per row: a 64-bit hash of each given edit id and of each
derived edit's identity; only rows whose hash repeats are read again and compared exactly.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.load import FILES_METADATA_KEY, _column_problems, _Part, _parts
from manifests.normalise import _derive_ids, normalized_table, passthrough_columns
from manifests.problems import (
    ManifestError,
    Problem,
    format_problems,
    problem_kind,
    rows_text,
    show_value,
)
from manifests.prompts import prompt_problems, word_problems
from manifests.schema import REQUIRED_COLUMNS
from manifests.validate import Analysis, analyse
from storage.base import NotFound

__all__ = [
    "BATCH_ROWS",
    "PROBLEM_LIMIT",
    "CheckedBatch",
    "ManifestScan",
    "ManifestSource",
    "hash_strings",
    "mix_hashes",
    "ScanResult",
    "open_manifest",
    "scan_manifest",
]

logger = logging.getLogger(__name__)

# Rows read and checked at once: ~250 MB of working memory for catalogue-like rows (checking and
# normalising a batch makes several copies of it); 4x that is ~+400 MB for little speed.
BATCH_ROWS = 1 << 16
PROBLEM_LIMIT = 1000  # problems kept with their row and reason; beyond, only counted per kind
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: an odd multiplier that spreads bits
_GIVEN_SALT = np.uint64(0x5BD1E9955BD1E995)  # keeps given-id hashes apart from identity hashes


# ----------------------------------------------------------------------------- hashing


def hash_strings(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash (uint64) of each string, equal for equal strings within this process; 0 for
    null. Each distinct value of the array is hashed once."""
    enc = (arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr).dictionary_encode()
    distinct = enc.dictionary.to_pylist()
    hashes = np.fromiter(map(hash, distinct), np.int64, count=len(distinct)).view(np.uint64)
    codes = np.asarray(enc.indices.fill_null(len(distinct)).to_numpy(zero_copy_only=False))
    return np.append(hashes, np.uint64(0))[codes]


def mix_hashes(*parts: np.ndarray) -> np.ndarray:
    """One 64-bit hash per row from several (uint64, int64 or float64 arrays, viewed as bits)."""
    out = np.zeros(len(parts[0]), np.uint64)
    with np.errstate(over="ignore"):
        for part in parts:
            bits = np.ascontiguousarray(part).view(np.uint64)
            out = (out ^ bits) * _GOLDEN
            out ^= out >> np.uint64(29)
    return out


# ----------------------------------------------------------------------------- the parts


@dataclass(frozen=True, slots=True)
class ManifestSource:
    """A manifest's Parquet parts, checked to agree on their columns, and their common schema."""

    uri: str
    parts: tuple[_Part, ...]
    schema: pa.Schema  # the first part's columns, types promoted across parts; files metadata
    files: tuple[tuple[str, int], ...]  # (file URI, rows) in row order
    rows: int

    @property
    def passthrough(self) -> list[str]:
        return passthrough_columns(self.schema.empty_table())

    def batches(self, batch_rows: int = BATCH_ROWS) -> Iterator[tuple[int, pa.Table]]:
        """(first row, table) of each batch, parts in name order; ``ManifestError`` naming a part
        that cannot be read."""
        offset = 0
        names = self.schema.names
        for part in self.parts:
            try:
                reader = _parquet(part)
                for record_batch in reader.iter_batches(batch_size=batch_rows, columns=names):
                    table = pa.Table.from_batches([record_batch]).select(names)
                    table = table.replace_schema_metadata(None).cast(self.schema)
                    yield offset, table
                    offset += table.num_rows
            except (pa.ArrowException, OSError, NotFound) as exc:
                raise ManifestError(
                    [Problem(None, None, f"{part.name}: cannot read as Parquet: {exc}")]
                ) from None


def _parquet(part: _Part) -> pq.ParquetFile:
    return pq.ParquetFile(pa.BufferReader(part.store.get(part.key)))


def open_manifest(uri: str, *, s3_endpoint: str | None = None) -> ManifestSource:
    """The parts of the manifest at `uri` (one Parquet file, or every ``*.parquet`` below a folder
    or S3 prefix), their footers read and compared; ``ManifestError`` naming each part that is
    gone, unreadable or disagrees with the first on its columns (nothing is then run)."""
    parts = _parts(uri, s3_endpoint)
    problems: list[Problem] = []
    readable: list[tuple[_Part, pa.Schema, int]] = []
    for part in parts:
        try:
            reader = _parquet(part)
            readable.append((part, reader.schema_arrow, reader.metadata.num_rows))
        except NotFound:
            if _broken_link(part):
                continue
            problems.append(
                Problem(None, None, f"{part.name}: listed but gone when read (removed?)")
            )
        except (pa.ArrowException, OSError) as exc:
            problems.append(Problem(None, None, f"{part.name}: cannot read as Parquet: {exc}"))
    if not readable and not problems:
        raise ManifestError([Problem(None, None, f"no Parquet files at {uri}")])
    problems += _column_problems([(p.name, schema.empty_table()) for p, schema, _ in readable])
    if problems:
        raise ManifestError(problems)
    names = readable[0][1].names
    try:
        schema = pa.unify_schemas(
            [pa.schema([s.field(c) for c in names]) for _, s, _ in readable],
            promote_options="permissive",
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ManifestError([Problem(None, None, f"manifest files disagree: {exc}")]) from None
    files = tuple((p.name, rows) for p, _, rows in readable)
    schema = schema.with_metadata({FILES_METADATA_KEY: json.dumps([list(f) for f in files])})
    return ManifestSource(
        uri=uri,
        parts=tuple(p for p, _, _ in readable),
        schema=schema,
        files=files,
        rows=sum(rows for _, _, rows in readable),
    )


def _broken_link(part: _Part) -> bool:
    if os.path.islink(part.name):  # local stores name their objects by path
        logger.warning("manifest file %s is a broken link; skipped", part.name)
        return True
    return False


# ----------------------------------------------------------------------------- the scan


@dataclass(frozen=True, slots=True)
class CheckedBatch:
    """One batch of a manifest and its check (no checks across rows)."""

    first_row: int  # position of its first row in the manifest
    table: pa.Table  # as read, with the manifest's files metadata
    analysis: Analysis
    valid: bool  # no problem in this batch
    hashes: dict[str, np.ndarray]  # column -> hash_strings of it, for those the scan hashed

    def normalized(self) -> pa.Table:
        """The batch's normalised rows (``row`` = position in the manifest)."""
        return normalized_table(self.table, self.analysis, first_row=self.first_row)


class ManifestScan:
    """One pass over a manifest, checking each batch as it is read; keeps the first
    `limit` problems, a count of all per kind, and an 8-byte hash per row for the checks across
    rows that :meth:`finish` makes."""

    def __init__(
        self,
        source: ManifestSource,
        *,
        budget=None,
        limit: int = PROBLEM_LIMIT,
        batch_rows: int = BATCH_ROWS,
    ) -> None:
        self.source = source
        self.budget = budget  # an editing.prompts.PromptBudget: prompt lengths and P2P words
        self.limit = limit
        self.batch_rows = batch_rows
        self.problems: list[Problem] = []
        self.counts: Counter[str] = Counter()
        self.total = 0
        self._given: list[np.ndarray] = []  # per batch: whether the row's edit_id is given
        self._tracked: list[np.ndarray] = []  # per batch: rows that take part in the checks
        self._keys: list[np.ndarray] = []  # per batch: hash of the given id / the edit's identity

    def add(self, problems: list[Problem]) -> None:
        """Count `problems`; keep them while fewer than `limit` are kept."""
        self.total += len(problems)
        self.counts.update(map(problem_kind, problems))
        room = self.limit - len(self.problems)
        if room > 0:
            self.problems += problems[:room]

    def batches(self) -> Iterator[CheckedBatch]:
        """Each batch, checked; its problems counted (rows are positions in the manifest)."""
        if self.source.rows == 0:
            self.add(analyse(self.source.schema.empty_table()).problems)
            return
        for first_row, table in self.source.batches(self.batch_rows):
            analysis = analyse(table, duplicates=False)
            problems = [
                Problem(None if p.row is None else p.row + first_row, p.column, p.reason)
                for p in analysis.problems
                if p.row is not None or first_row == 0  # column problems: once
            ]
            if self.budget is not None and not analysis.problems:
                problems = prompt_problems(analysis.arrays, self.budget)
                if not problems:
                    problems = word_problems(analysis.arrays, analysis.values, self.budget)
                problems = [Problem(p.row + first_row, p.column, p.reason) for p in problems]
            self.add(problems)
            hashes = self._remember_keys(analysis)
            valid = not analysis.problems and not problems
            yield CheckedBatch(first_row, table, analysis, valid=valid, hashes=hashes)

    def _remember_keys(self, analysis: Analysis) -> dict[str, np.ndarray]:
        """Per row: whether its edit_id is given, and a hash of that id, or of everything that
        shapes the edit (what the derived id hashes) when it is derived. Returns the hashes of
        the columns it hashed."""
        v, arrays, n = analysis.values, analysis.arrays, analysis.n
        given = np.zeros(n, bool) if v is None else ~np.asarray(v.missing_id, bool)
        keys = np.zeros(n, np.uint64)
        # rows without an id are compared only when every required column is there (as analyse)
        tracked = given.copy()
        hashes: dict[str, np.ndarray] = {}
        if v is not None and all(c in arrays for c in REQUIRED_COLUMNS):
            tracked[:] = True  # but a row without a required value has no identity
            for c in REQUIRED_COLUMNS:
                tracked &= np.asarray(arrays[c].is_valid(), dtype=bool)
            hashes = {c: hash_strings(arrays[c]) for c in REQUIRED_COLUMNS}
            settings = np.fromiter(map(hash, v.settings_identity), np.int64)[v.settings_codes]
            keys = mix_hashes(
                hashes["image_uri"],
                hashes["source_prompt"],
                hashes["target_prompt"],
                hash_strings(v.method),
                settings,
                v.seed,
                v.num_steps,
                np.asarray(v.guidance, np.float64),
                hash_strings(v.negative),
            )
        if given.any():
            keys[given] = hash_strings(arrays["edit_id"])[given]
        self._given.append(given)
        self._tracked.append(tracked)
        self._keys.append(keys)
        return hashes

    def finish(self) -> None:
        """The checks across rows: repeated given edit ids, and rows that are the same edit (so
        their derived ids coincide). Candidate rows (hash repeats) are read again and compared."""
        if not self._keys:
            return
        given = np.concatenate(self._given)
        self._given = []
        tracked = np.concatenate(self._tracked)
        self._tracked = []
        keys = np.concatenate(self._keys)
        self._keys = []
        # one sorted copy of the keys (given ids are salted apart from derived identities; a
        # clash between the two only makes a candidate, which the exact comparison clears)
        keys[given] ^= _GIVEN_SALT
        tracked |= given
        ordered = np.sort(keys[tracked])
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        del ordered
        if len(repeated):
            candidates = tracked & np.isin(keys, np.unique(repeated))
            self.add(self._exact_duplicates(np.flatnonzero(candidates), given))

    def _exact_duplicates(self, rows: np.ndarray, given: np.ndarray) -> list[Problem]:
        """Problems of the candidate `rows` that truly repeat an edit id (given) or an edit."""
        ids: dict[int, str] = {}
        wanted = set(rows.tolist())
        for first_row, table in self.source.batches(self.batch_rows):
            local = rows[(rows >= first_row) & (rows < first_row + table.num_rows)] - first_row
            if not len(local):
                continue
            analysis = analyse(table, duplicates=False)
            derived = local[~given[local + first_row]]
            if len(derived):
                found = _derive_ids(analysis.arrays, analysis.values, derived)
                ids.update(zip((derived + first_row).tolist(), found, strict=True))
            named = local[given[local + first_row]]
            if len(named):
                values = analysis.arrays["edit_id"].take(pa.array(named)).to_pylist()
                ids.update(zip((named + first_row).tolist(), values, strict=True))
        groups: dict[tuple[bool, str], list[int]] = {}
        for row in sorted(wanted):
            groups.setdefault((bool(given[row]), ids[row]), []).append(row)
        problems: list[Problem] = []
        for (is_given, value), members in groups.items():
            if len(members) < 2:
                continue
            for r in members:
                others = rows_text([o for o in members if o != r])
                reason = (
                    f"duplicate edit_id {show_value(value)} (also in {others})"
                    if is_given
                    else f"same edit as {others} (identical image, prompts, method, settings, "
                    "seed, steps, guidance and negative prompt), so their derived edit_ids "
                    "coincide; remove the duplicate or give each row its own edit_id"
                )
                problems.append(Problem(r, "edit_id", reason))
        return sorted(problems, key=lambda p: p.row)

    def error(self) -> ManifestError:
        """The problems found as a ``ManifestError`` (the first `limit`, all counted per kind)."""
        listed = sorted(self.problems, key=lambda p: (p.row is not None, p.row or 0))
        return ManifestError(listed, total=self.total, counts=dict(self.counts))

    def raise_if_invalid(self) -> None:
        if self.total:
            raise self.error()


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What a streaming check of a manifest found (``editflow validate``)."""

    problems: list[Problem]  # the first PROBLEM_LIMIT problems, by row
    total: int  # all problems
    counts: dict[str, int]  # all problems per kind (column)
    rows: int
    files: list[tuple[str, int]]
    passthrough: list[str]

    def report(self, limit: int = 50) -> str:
        """The first `limit` problems and the count of the others per kind."""
        return format_problems(self.problems, limit=limit, total=self.total, counts=self.counts)


def scan_manifest(
    uri: str, *, s3_endpoint: str | None = None, budget=None, limit: int = PROBLEM_LIMIT
) -> ScanResult:
    """Check the manifest at `uri` in one streaming pass (plus a re-read of the rows whose ids
    might repeat); `budget` adds prompt lengths and P2P words. Loading problems are returned as
    problems (nothing is raised for a bad manifest)."""
    try:
        source = open_manifest(uri, s3_endpoint=s3_endpoint)
        scan = ManifestScan(source, budget=budget, limit=limit)
        for _ in scan.batches():
            pass
        scan.finish()
    except ManifestError as exc:
        return ScanResult(exc.problems, exc.total, exc.counts or {}, 0, [], [])
    err = scan.error()
    return ScanResult(
        err.problems, scan.total, dict(scan.counts), source.rows, list(source.files),
        source.passthrough,
    )  # fmt: skip
