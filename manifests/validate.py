"""Manifest validation (every problem, with row, column and reason), loading and normalising.

Column-level checks are vectorised (pyarrow/numpy); ``settings`` JSON is parsed and checked
once per distinct (method, settings) pair, so a million-row manifest validates in seconds.
Row numbers are 0-based positions in the manifest (files of a folder concatenated in name order).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from editing.configs import config_from_settings
from manifests.schema import (
    DEFAULT_METHOD,
    DEFAULT_NUM_STEPS,
    DEFAULT_SEED,
    GUIDANCE_RANGE,
    KNOWN_COLUMNS,
    METHODS,
    NORMALIZED_SCHEMA,
    NUM_STEPS_RANGE,
    REQUIRED_COLUMNS,
    RESERVED_COLUMNS,
    EditRow,
    default_guidance,
)
from storage.keys import EDIT_ID_MAX_LEN, UNSAFE_ID_PATTERN, canonical_json, derive_edit_id_json
from storage.uri import SCHEME_PATTERN, SUPPORTED_URI_PATTERN, split_uri

__all__ = [
    "Problem",
    "ManifestError",
    "validate_table",
    "format_problems",
    "load_manifest",
    "check_manifest",
    "prompt_length_problems",
    "normalize",
    "edit_rows",
    "manifest_files",
    "passthrough_columns",
]

logger = logging.getLogger(__name__)

_STRING_COLUMNS = (
    "image_uri",
    "source_prompt",
    "target_prompt",
    "edit_id",
    "method",
    "negative_prompt",
    "settings",
)
_INT_COLUMNS = ("seed", "num_steps")
_FLOAT_COLUMNS = ("guidance_scale",)
_INT64_MAX = 2**63 - 1
_PANDAS_INDEX_RE = re.compile(r"^__index_level_\d+__$")  # written by pandas, not user data
_FILES_METADATA_KEY = b"editflow.manifest_files"
_OTHERS_SHOWN = 5  # rows named in a duplicate message


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a manifest."""

    row: int | None  # 0-based position in the manifest; None = the whole manifest or column
    column: str | None  # None = not about one column
    reason: str

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return (", ".join(where) + ": " if where else "") + self.reason


class ManifestError(ValueError):
    """A manifest that cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(format_problems(problems))


def format_problems(problems: list[Problem], *, limit: int = 50) -> str:
    """A readable report: a count, up to `limit` problems, and counts per column beyond that."""
    if not problems:
        return "manifest is valid"
    lines = [
        f"{len(problems)} problem(s) in the manifest (rows are 0-based positions in the manifest):"
    ]
    lines += [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        rest = Counter(p.column or "(manifest)" for p in problems[limit:])
        summary = ", ".join(f"{col}: {count}" for col, count in rest.most_common())
        lines.append(f"  ... and {len(problems) - limit} more ({summary})")
    return "\n".join(lines)


def _show(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _rows_text(rows: list[int]) -> str:
    """'row 3' or 'rows 3, 7 and 12 more'."""
    shown = ", ".join(str(r) for r in rows[:_OTHERS_SHOWN])
    more = len(rows) - _OTHERS_SHOWN
    return (
        ("row " if len(rows) == 1 else "rows ") + shown + (f" and {more} more" if more > 0 else "")
    )


# ----------------------------------------------------------------------------- column helpers


def _is_string_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _type_problem(name: str, t: pa.DataType) -> str | None:
    """Why column `name` of type `t` cannot be used, or None."""
    if pa.types.is_null(t):  # every value missing
        return "has no values (type null)" if name in REQUIRED_COLUMNS else None
    if name in _STRING_COLUMNS:
        return None if _is_string_type(t) else f"must be a string column, got {t}"
    if name in _INT_COLUMNS:
        ok = pa.types.is_integer(t) or pa.types.is_floating(t)
        return None if ok else f"must be an integer column, got {t}"
    if name in _FLOAT_COLUMNS:
        ok = pa.types.is_integer(t) or pa.types.is_floating(t)
        return None if ok else f"must be a number column, got {t}"
    return None


def _array(column: pa.ChunkedArray, name: str) -> pa.Array:
    """One contiguous array; dictionaries decoded; strings as string/large_string; nulls typed."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    if pa.types.is_null(t):
        target = pa.string() if name in _STRING_COLUMNS else pa.float64()
        return pa.nulls(len(arr), target)
    if pa.types.is_string_view(t):
        arr = arr.cast(pa.large_string())
    return arr


def _mask(arr: pa.Array) -> np.ndarray:
    """A boolean pyarrow array (nulls = False) as numpy."""
    return np.asarray(arr.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _floats(arr: pa.Array) -> np.ndarray:
    """Numbers as float64 with NaN for nulls."""
    return np.asarray(
        arr.cast(pa.float64()).fill_null(math.nan).to_numpy(zero_copy_only=False), dtype=np.float64
    )


def _codes(arr: pa.Array) -> tuple[np.ndarray, list[Any]]:
    """Dictionary codes (int64, -1 for null) and the distinct values."""
    enc = arr.dictionary_encode()
    codes = np.asarray(enc.indices.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
    return codes, enc.dictionary.to_pylist()


# ----------------------------------------------------------------------------- analysis


@dataclass
class _Analysis:
    """Problems plus the resolved per-row values that normalize() needs (internal)."""

    problems: list[Problem]
    n: int
    arrays: dict[str, pa.Array]  # known columns of a usable type
    method: np.ndarray | None = None  # object array of method names, defaults filled
    seed: np.ndarray | None = None  # int64
    num_steps: np.ndarray | None = None  # int64
    guidance: np.ndarray | None = None  # float64
    negative: pa.Array | None = None  # strings, defaults filled
    settings_codes: np.ndarray | None = None  # index into settings_identity; -1 = no settings
    settings_identity: list[str] | None = None  # canonical JSON per distinct settings text
    missing_id: np.ndarray | None = None  # rows whose edit_id must be derived


class _Checker:
    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.n = table.num_rows
        self.problems: list[Problem] = []
        self.arrays: dict[str, pa.Array] = {}

    def add(self, row: int | None, column: str | None, reason: str) -> None:
        self.problems.append(Problem(row, column, reason))

    def add_rows(
        self,
        mask: np.ndarray,
        column: str | None,
        reason: str | Any,
        values: pa.Array | None = None,
    ) -> None:
        """A problem for every row in `mask`; `reason` is text or a function of the row's value."""
        rows = np.flatnonzero(mask)
        if len(rows) == 0:
            return
        if values is None:
            self.problems.extend(Problem(int(r), column, reason) for r in rows)
        else:
            picked = values.take(pa.array(rows)).to_pylist()
            self.problems.extend(
                Problem(int(r), column, reason(v)) for r, v in zip(rows, picked, strict=True)
            )

    # -- manifest and column level
    def columns(self) -> None:
        names = self.table.column_names
        if self.n == 0:
            self.add(None, None, "manifest is empty: it has no rows")
        for name, count in Counter(names).items():
            if count > 1:
                self.add(None, name, f"column appears {count} times")
        for name in REQUIRED_COLUMNS:
            if name not in names:
                self.add(None, name, "required column is missing")
        for name in RESERVED_COLUMNS:
            if name in names:
                self.add(None, name, "column name is reserved for the results table; rename it")
        for name in KNOWN_COLUMNS:
            if name not in names or names.count(name) > 1:
                continue
            column = self.table.column(name)
            reason = _type_problem(name, column.type)
            if reason is not None:
                self.add(None, name, reason)
            else:
                self.arrays[name] = _array(column, name)

    # -- row level
    def required_strings(self) -> None:
        for name in REQUIRED_COLUMNS:
            arr = self.arrays.get(name)
            if arr is None:
                continue
            self.add_rows(_mask(arr.is_null()), name, "is null (a value is required)")
            self.add_rows(
                _mask(pc.equal(pc.utf8_trim_whitespace(arr), "")),
                name,
                "is empty (a value is required)",
            )

    def uris(self) -> None:
        arr = self.arrays.get("image_uri")
        if arr is None:
            return
        has_scheme = _mask(pc.match_substring_regex(arr, SCHEME_PATTERN))
        supported = _mask(pc.match_substring_regex(arr, SUPPORTED_URI_PATTERN))

        def reason(uri: str) -> str:
            try:
                split_uri(uri)
            except ValueError as exc:
                return f"unsupported image URI: {exc}"
            return f"image URI {_show(uri)} names no object (expected s3://bucket/key)"

        self.add_rows(has_scheme & ~supported, "image_uri", reason, arr)

    def edit_ids(self) -> None:
        arr = self.arrays.get("edit_id")
        if arr is None:
            self.missing_id = np.ones(self.n, dtype=bool)
            return
        self.missing_id = _mask(arr.is_null()) | _mask(pc.equal(arr, ""))  # derived for these rows
        unsafe = _mask(pc.match_substring_regex(arr, UNSAFE_ID_PATTERN)) | _mask(pc.equal(arr, "."))
        self.add_rows(
            unsafe,
            "edit_id",
            lambda v: (
                f"edit_id {_show(v)} is not key-safe (no '/', '\\', '..' or control characters)"
            ),
            arr,
        )
        nbytes = pc.binary_length(
            arr
        )  # UTF-8 bytes: file names are limited in bytes, not characters
        too_long = _mask(pc.greater(nbytes, EDIT_ID_MAX_LEN))
        self.add_rows(
            too_long & ~unsafe,
            "edit_id",
            lambda n: (
                f"edit_id is longer than {EDIT_ID_MAX_LEN} bytes ({n} bytes in UTF-8); it becomes "
                "a file name, which may have at most 255 bytes with its extension"
            ),
            nbytes,
        )
        codes, values = _codes(arr)
        codes = np.where(self.missing_id, -1, codes)
        self._duplicates(
            codes,
            values,
            "edit_id",
            lambda v, others: f"duplicate edit_id {_show(v)} (also in {others})",
        )

    def _duplicates(self, codes: np.ndarray, values: list[Any], column: str, reason: Any) -> None:
        """Report every row whose code (>= 0) occurs more than once, naming the other rows."""
        valid = codes >= 0
        if not valid.any():
            return
        counts = np.bincount(codes[valid], minlength=len(values))
        dup_rows = np.flatnonzero(valid & (counts[np.where(valid, codes, 0)] > 1))
        if len(dup_rows) == 0:
            return
        order = np.argsort(codes[dup_rows], kind="stable")
        groups: dict[int, list[int]] = {}
        for r in dup_rows[order]:
            groups.setdefault(int(codes[r]), []).append(int(r))
        for code, rows in groups.items():
            for r in rows:
                others = [o for o in rows if o != r]
                self.add(r, column, reason(values[code], _rows_text(others)))

    def methods(self) -> None:
        arr = self.arrays.get("method")
        if arr is None:
            self.method_arr = pa.array(np.full(self.n, DEFAULT_METHOD, dtype=object), pa.string())
            return
        self.method_arr = arr.fill_null(DEFAULT_METHOD)
        known = _mask(
            pc.is_in(self.method_arr, value_set=pa.array(METHODS, type=self.method_arr.type))
        )
        self.add_rows(
            ~known,
            "method",
            lambda v: f"unknown method {_show(v)}; known: {', '.join(METHODS)}",
            self.method_arr,
        )
        self.method_ok = known

    def integers(self, name: str, lo: int | None, hi: int | None, default: int) -> np.ndarray:
        """Check an integer-valued column; return it as int64 with `default` for nulls and bad rows."""
        arr = self.arrays.get(name)
        out = np.full(self.n, default, dtype=np.int64)
        if arr is None:
            return out
        valid = ~_mask(arr.is_null())
        bad = np.zeros(self.n, dtype=bool)
        if pa.types.is_floating(arr.type):
            x = _floats(arr)
            with np.errstate(invalid="ignore"):
                integral = np.isfinite(x) & (np.floor(x) == x) & (np.abs(x) < 2.0**63)
            self.add_rows(
                valid & ~integral, name, lambda v: f"{name} must be an integer, got {_show(v)}", arr
            )
            bad |= valid & ~integral
            ints = np.where(valid & integral, x, default).astype(np.int64)
        else:
            if arr.type == pa.uint64():  # the only integer type that can exceed int64
                limit = pa.scalar(_INT64_MAX, arr.type)
                over = _mask(pc.greater(arr, limit))
                self.add_rows(over, name, lambda v: f"{name} {v} does not fit in int64", arr)
                bad |= over
                arr = pc.if_else(pc.greater(arr, limit), pa.scalar(0, arr.type), arr)
            ints = np.asarray(
                arr.cast(pa.int64()).fill_null(default).to_numpy(zero_copy_only=False),
                dtype=np.int64,
            )
        if lo is not None and hi is not None:
            out_of_range = valid & ~bad & ((ints < lo) | (ints > hi))
            self.add_rows(
                out_of_range, name, lambda v: f"{name} must be in [{lo}, {hi}], got {_show(v)}", arr
            )
            bad |= out_of_range
        out[valid & ~bad] = ints[valid & ~bad]
        return out

    def guidance_column(self) -> np.ndarray:
        """Guidance scales as float64 (NaN = not given or bad)."""
        arr = self.arrays.get("guidance_scale")
        if arr is None:
            return np.full(self.n, math.nan)
        x = _floats(arr)
        valid = ~_mask(arr.is_null())
        lo, hi = GUIDANCE_RANGE
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(x) & (x >= lo) & (x <= hi)
        self.add_rows(
            valid & ~ok,
            "guidance_scale",
            lambda v: f"guidance_scale must be a number in [{lo:g}, {hi:g}], got {_show(v)}",
            arr,
        )
        return np.where(valid & ok, x, math.nan)

    def settings(self) -> None:
        """Parse each distinct settings text once; check each distinct (method, settings) once."""
        arr = self.arrays.get("settings")
        if arr is None:
            codes, texts = np.full(self.n, -1, dtype=np.int64), []
        else:
            codes, texts = _codes(arr)
        parsed: list[dict[str, Any] | None] = []
        parse_errors: list[str | None] = []
        for text in texts:
            if text.strip() == "":
                parsed.append({})
                parse_errors.append(None)
                continue
            try:
                value = json.loads(text)
            except ValueError as exc:
                parsed.append(None)
                parse_errors.append(f"settings is not valid JSON ({exc}): {_show(text)}")
                continue
            if not isinstance(value, dict):
                parsed.append(None)
                parse_errors.append(
                    f"settings must be a JSON object, got {type(value).__name__}: {_show(text)}"
                )
                continue
            parsed.append(value)
            parse_errors.append(None)

        # distinct (method, settings) pairs -> one config check each
        m_codes, m_values = _codes(self.method_arr)
        width = len(texts) + 1
        pairs = m_codes * width + (codes + 1)
        unique_pairs, inverse = np.unique(pairs, return_inverse=True)
        reasons: list[str | None] = []
        for pair in unique_pairs.tolist():
            method = m_values[pair // width] if pair >= 0 else None
            s_code = pair % width - 1
            settings = parsed[s_code] if s_code >= 0 else {}
            if s_code >= 0 and parse_errors[s_code] is not None:
                reasons.append(parse_errors[s_code])
            elif method in METHODS:
                try:
                    config_from_settings(method, settings)
                    reasons.append(None)
                except ValueError as exc:
                    reasons.append(f"settings rejected for method {method!r}: {exc}")
            else:
                reasons.append(None)  # unknown method: reported on its own
        reason_arr = np.array(reasons + [None], dtype=object)[np.asarray(inverse).reshape(-1)]
        bad_rows = np.flatnonzero(reason_arr != None)  # noqa: E711 - elementwise on an object array
        self.problems.extend(Problem(int(r), "settings", reason_arr[r]) for r in bad_rows)

        # settings' own guidance_scale / negative_prompt, per row
        self.settings_guidance = np.full(len(texts) + 1, math.nan)  # last slot: no settings
        settings_negative: list[str | None] = [None] * (len(texts) + 1)
        identity: list[str] = []
        for i, value in enumerate(parsed):
            value = value or {}
            g = value.get("guidance_scale")
            if isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g):
                self.settings_guidance[i] = float(g)
            neg = value.get("negative_prompt")
            if isinstance(neg, str):
                settings_negative[i] = neg
            rest = {
                k: v for k, v in value.items() if k not in ("guidance_scale", "negative_prompt")
            }
            try:
                identity.append(canonical_json(rest))
            except ValueError:  # NaN inside settings: already reported by the config check
                identity.append("{}")
        identity.append("{}")  # for rows without settings
        code_of: dict[str, int] = {}
        self.identity_codes = np.array(
            [code_of.setdefault(t, len(code_of)) for t in identity], dtype=np.int64
        )
        self.settings_codes = np.where(codes >= 0, codes, len(texts))
        self.settings_identity = identity
        self.settings_negative = pa.array(settings_negative, pa.string())

    def resolve_guidance_and_negative(self, column_guidance: np.ndarray) -> None:
        """Column values win over settings' ones; disagreeing pairs are problems; defaults fill the rest."""
        from_settings = self.settings_guidance[self.settings_codes]
        both = ~np.isnan(column_guidance) & ~np.isnan(from_settings)
        clash = both & (column_guidance != from_settings)
        for r in np.flatnonzero(clash):
            self.add(
                int(r),
                "guidance_scale",
                f"guidance_scale {column_guidance[r]:g} disagrees with settings' guidance_scale {from_settings[r]:g}",
            )
        guidance = np.where(np.isnan(column_guidance), from_settings, column_guidance)
        missing = np.isnan(guidance)
        if missing.any():  # each method's config default
            m_codes, m_values = _codes(self.method_arr)
            per_value = np.array(
                [default_guidance(m if m in METHODS else DEFAULT_METHOD) for m in m_values]
            )
            guidance[missing] = per_value[m_codes[missing]]
        self.guidance = guidance

        row_settings_negative = self.settings_negative.take(pa.array(self.settings_codes))
        arr = self.arrays.get("negative_prompt")
        if arr is not None:
            clash_neg = _mask(
                pc.and_(
                    pc.and_(arr.is_valid(), row_settings_negative.is_valid()),
                    pc.not_equal(arr, row_settings_negative),
                )
            )
            self.add_rows(
                clash_neg,
                "negative_prompt",
                "negative_prompt disagrees with settings' negative_prompt",
            )
            negative = pc.coalesce(
                arr.cast(pa.large_string()), row_settings_negative.cast(pa.large_string()), ""
            )
        else:
            negative = pc.coalesce(row_settings_negative.cast(pa.large_string()), "")
        self.negative = negative

    def derived_duplicates(self) -> None:
        """Rows without an edit_id whose derived ids would coincide (the same edit twice)."""
        rows = np.flatnonzero(self.missing_id)
        if len(rows) < 2 or any(name not in self.arrays for name in REQUIRED_COLUMNS):
            return
        take = pa.array(rows)
        frame = pd.DataFrame(
            {
                "image_uri": _codes(self.arrays["image_uri"].take(take))[0],
                "source_prompt": _codes(self.arrays["source_prompt"].take(take))[0],
                "target_prompt": _codes(self.arrays["target_prompt"].take(take))[0],
                "method": _codes(self.method_arr.take(take))[0],
                "settings": self.identity_codes[self.settings_codes[rows]],
                "seed": self.seed[rows],
                "num_steps": self.num_steps[rows],
                "guidance": self.guidance[rows],
                "negative": _codes(self.negative.take(take))[0],
            }
        )
        dup = frame.duplicated(keep=False).to_numpy()
        if not dup.any():
            return
        dup_rows = rows[dup]
        group_ids = (
            frame[dup].groupby(list(frame.columns), sort=False, dropna=False).ngroup().to_numpy()
        )
        groups: dict[int, list[int]] = {}
        for g, r in zip(group_ids.tolist(), dup_rows.tolist(), strict=True):
            groups.setdefault(g, []).append(r)
        for members in groups.values():
            for r in members:
                others = [o for o in members if o != r]
                self.add(
                    r,
                    "edit_id",
                    f"same edit as {_rows_text(others)} (identical image, prompts, method, settings, seed, "
                    "steps, guidance and negative prompt), so their derived edit_ids coincide; remove the "
                    "duplicate or give each row its own edit_id",
                )


def _analyse(table: pa.Table) -> _Analysis:
    c = _Checker(table)
    c.columns()
    if c.n == 0:
        return _Analysis(c.problems, 0, c.arrays)
    c.required_strings()
    c.uris()
    c.edit_ids()
    c.methods()
    c.seed = c.integers("seed", None, None, DEFAULT_SEED)
    c.num_steps = c.integers("num_steps", NUM_STEPS_RANGE[0], NUM_STEPS_RANGE[1], DEFAULT_NUM_STEPS)
    column_guidance = c.guidance_column()
    c.settings()
    c.resolve_guidance_and_negative(column_guidance)
    c.derived_duplicates()
    problems = sorted(c.problems, key=lambda p: (p.row is not None, -1 if p.row is None else p.row))
    return _Analysis(
        problems=problems,
        n=c.n,
        arrays=c.arrays,
        method=c.method_arr,
        seed=c.seed,
        num_steps=c.num_steps,
        guidance=c.guidance,
        negative=c.negative,
        settings_codes=c.settings_codes,
        settings_identity=c.settings_identity,
        missing_id=c.missing_id,
    )


def validate_table(table: pa.Table) -> list[Problem]:
    """Every problem of the manifest `table` (empty list = valid), manifest/column-level first,
    then by row. Checks: required columns, types, nulls and empty required strings, URI
    schemes, key-safe and unique edit_ids, methods, seed/num_steps/guidance_scale ranges,
    settings JSON and each method's config, reserved column names, repeated identical edits.
    """
    return _analyse(table).problems


# ----------------------------------------------------------------------------- normalising


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


def _derive_ids(a: _Analysis, rows: np.ndarray) -> list[str]:
    """Derived edit ids of `rows` (resolved values, settings hashed as canonical JSON)."""
    take = pa.array(rows)
    identity = np.array(a.settings_identity, dtype=object)[a.settings_codes[rows]].tolist()
    return [
        derive_edit_id_json(*values)
        for values in zip(
            a.arrays["image_uri"].take(take).to_pylist(),
            a.arrays["source_prompt"].take(take).to_pylist(),
            a.arrays["target_prompt"].take(take).to_pylist(),
            a.method.take(take).to_pylist(),
            identity,
            a.seed[rows].tolist(),
            a.num_steps[rows].tolist(),
            a.guidance[rows].tolist(),
            a.negative.take(take).to_pylist(),
            strict=True,
        )
    ]


def normalize(table: pa.Table) -> pa.Table:
    """The manifest with every value resolved, ready for planning; raises :class:`ManifestError`.

    Columns: those of ``NORMALIZED_SCHEMA`` (``row`` = position in `table`; ``edit_id`` given
    or derived; ``method``, ``seed``, ``num_steps``, ``guidance_scale``, ``negative_prompt``
    filled; ``settings`` = canonical JSON of the method settings other than guidance_scale and
    negative_prompt), then the passthrough columns untouched. ``image_uri`` is kept as written.
    Turn rows into :class:`EditRow` objects with :func:`edit_rows`.
    """
    a = _analyse(table)
    if a.problems:
        raise ManifestError(a.problems)
    n = a.n
    settings = pa.array(a.settings_identity, pa.string()).take(pa.array(a.settings_codes))
    missing = np.asarray(a.missing_id, dtype=bool)
    derived_rows = np.flatnonzero(missing)
    derived: list[str] = []
    if len(derived_rows):
        with (
            _gc_paused()
        ):  # millions of short-lived strings, no cycles: skip the collector's passes
            derived = _derive_ids(a, derived_rows)
    if "edit_id" in a.arrays and len(derived_rows) < n:
        given = a.arrays["edit_id"].cast(pa.string())
        edit_id = (
            pc.replace_with_mask(given, pa.array(missing), pa.array(derived, pa.string()))
            if derived
            else given
        )
    else:
        edit_id = pa.array(derived, pa.string())

    columns: dict[str, pa.Array] = {
        "row": pa.array(np.arange(n, dtype=np.int64)),
        "edit_id": edit_id,
        "image_uri": a.arrays["image_uri"].cast(pa.string()),
        "source_prompt": a.arrays["source_prompt"].cast(pa.string()),
        "target_prompt": a.arrays["target_prompt"].cast(pa.string()),
        "method": a.method.cast(pa.string()),
        "seed": pa.array(a.seed, pa.int64()),
        "num_steps": pa.array(a.num_steps, pa.int64()),
        "guidance_scale": pa.array(a.guidance, pa.float64()),
        "negative_prompt": a.negative.cast(pa.string()),
        "settings": settings,
    }
    fields = list(NORMALIZED_SCHEMA)
    arrays: list[pa.Array | pa.ChunkedArray] = [columns[f.name] for f in fields]
    for name in passthrough_columns(table):
        fields.append(table.schema.field(name))
        arrays.append(table.column(name))
    metadata = {k: v for k, v in (table.schema.metadata or {}).items() if k == _FILES_METADATA_KEY}
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=metadata or None))


def passthrough_columns(table: pa.Table) -> list[str]:
    """The manifest's passthrough column names (not known columns, not pandas index columns)."""
    return [
        c
        for c in table.column_names
        if c not in KNOWN_COLUMNS and c != "row" and not _PANDAS_INDEX_RE.match(c)
    ]


def edit_rows(normalized: pa.Table, *, batch_size: int = 8192) -> Iterator[EditRow]:
    """:class:`EditRow` objects from a :func:`normalize`\\ d table (or any subset of its rows), lazily."""
    known = [f.name for f in NORMALIZED_SCHEMA]
    absent = [c for c in known if c not in normalized.column_names]
    if absent:
        raise ValueError(f"not a normalized manifest: missing column(s) {absent}")
    extra = [c for c in normalized.column_names if c not in known]
    parsed: dict[str, dict[str, Any]] = {}
    for batch in normalized.to_batches(max_chunksize=batch_size):
        cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
        for i in range(batch.num_rows):
            text = cols["settings"][i]
            base = parsed.get(text)
            if base is None:
                base = parsed[text] = json.loads(text)
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
                settings={
                    **base,
                    "guidance_scale": cols["guidance_scale"][i],
                    "negative_prompt": cols["negative_prompt"][i],
                },
                passthrough={name: cols[name][i] for name in extra},
            )


# ----------------------------------------------------------------------------- loading


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _manifest_sources(uri: str, s3_endpoint: str | None) -> list[tuple[str, Any]]:
    """(URI, reader) for each Parquet file of the manifest at `uri`."""
    scheme, bucket, path = split_uri(uri)
    if scheme == "s3":
        from storage.s3 import S3Store

        store = S3Store(bucket, "", endpoint=s3_endpoint)
        if path and not path.endswith("/") and store.exists(path):
            keys = [path]
        else:
            prefix = path if not path or path.endswith("/") else path + "/"
            keys = [
                k
                for k in store.list(prefix)
                if k.endswith(".parquet") and not _hidden(k[len(prefix) :])
            ]
        return [
            (store.uri(k), lambda k=k: pq.ParquetFile(pa.BufferReader(store.get(k))).read())
            for k in keys
        ]
    from pathlib import Path

    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        found = [p for p in root.rglob("*.parquet") if p.is_file()]
        files = sorted(
            (p for p in found if not _hidden(p.relative_to(root).as_posix())),
            key=lambda p: p.relative_to(root).as_posix(),
        )
    else:
        raise ManifestError([Problem(None, None, f"no manifest file or folder at {path}")])
    return [(str(p), lambda p=p: pq.ParquetFile(p).read()) for p in files]


def load_manifest(uri: str, *, s3_endpoint: str | None = None) -> pa.Table:
    """Read the manifest at `uri`: one Parquet file, or every ``*.parquet`` below a folder or S3
    prefix (name order; names starting with '.' or '_' skipped), concatenated.

    The files must agree on their columns (checked here: no silent null-filling); types are
    promoted where lossless (int32 + int64, string + large_string). Raises
    :class:`ManifestError` listing unreadable or disagreeing files.
    """
    sources = _manifest_sources(uri, s3_endpoint)
    if not sources:
        raise ManifestError([Problem(None, None, f"no Parquet files at {uri}")])
    tables: list[pa.Table] = []
    problems: list[Problem] = []
    for name, read in sources:
        try:
            tables.append(read())
        except (pa.ArrowException, OSError) as exc:
            problems.append(Problem(None, None, f"{name}: cannot read as Parquet: {exc}"))
            tables.append(None)  # type: ignore[arg-type]
    for (name, _), t in zip(sources, tables, strict=True):
        if t is None:
            continue
        for col, count in Counter(t.column_names).items():
            if count > 1:
                problems.append(
                    Problem(
                        None,
                        col,
                        f"{name}: column appears {count} times; rename or drop the copies",
                    )
                )
    readable = [(name, t) for (name, _), t in zip(sources, tables, strict=True) if t is not None]
    if readable:
        first_name, first = readable[0]
        ref = first.column_names
        for name, t in readable[1:]:
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
                        [pa.schema([(col, t1)]), pa.schema([(col, t2)])],
                        promote_options="permissive",
                    )
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                    problems.append(
                        Problem(None, col, f"{name} has type {t2} but {first_name} has {t1}")
                    )
    if problems:
        raise ManifestError(problems)
    ordered = [t.select(ref) for _, t in readable]
    table = (
        ordered[0] if len(ordered) == 1 else pa.concat_tables(ordered, promote_options="permissive")
    )
    files = json.dumps([[name, t.num_rows] for name, t in readable]).encode()
    metadata = dict(table.schema.metadata or {})
    metadata[_FILES_METADATA_KEY] = files
    logger.info("loaded manifest %s: %d rows from %d file(s)", uri, table.num_rows, len(readable))
    return table.replace_schema_metadata(metadata)


def manifest_files(table: pa.Table) -> list[tuple[str, int]]:
    """The (file URI, row count) pairs a :func:`load_manifest` table was read from, in row order."""
    raw = (table.schema.metadata or {}).get(_FILES_METADATA_KEY)
    return [(name, int(rows)) for name, rows in json.loads(raw)] if raw else []


PROMPT_COLUMNS = ("source_prompt", "target_prompt", "negative_prompt")


def prompt_length_problems(table: pa.Table, budget: Any) -> list[Problem]:
    """Rows whose prompt does not fit the model's text encoder, per prompt column.

    `budget` is an :class:`editing.prompts.PromptBudget` (``max_tokens`` and ``counts(prompts)``).
    Each distinct prompt is tokenized once, so a large manifest with repeated prompts stays cheap.
    """
    problems: list[Problem] = []
    for name in PROMPT_COLUMNS:
        if name not in table.column_names or not _is_string_type(table.schema.field(name).type):
            continue
        column = table.column(name).cast(pa.string())
        distinct = [p for p in pc.unique(column).to_pylist() if p]
        counts = dict(zip(distinct, budget.counts(distinct), strict=True))
        too_long = [p for p in distinct if counts[p] > budget.max_tokens]
        if not too_long:
            continue
        rows = np.flatnonzero(
            pc.fill_null(pc.is_in(column, value_set=pa.array(too_long)), False).to_numpy(
                zero_copy_only=False
            )
        )
        values = column.take(pa.array(rows)).to_pylist()
        for row, prompt in zip(rows.tolist(), values, strict=True):
            problems.append(
                Problem(
                    row,
                    name,
                    f"prompt is too long for the model: {counts[prompt]} tokens, the model takes "
                    f"{budget.max_tokens} (start and end tokens included): {_show(prompt)}",
                )
            )
    problems.sort(key=lambda p: (p.row, p.column))
    return problems


def check_manifest(
    uri: str, *, s3_endpoint: str | None = None
) -> tuple[pa.Table | None, list[Problem]]:
    """Load and validate the manifest at `uri`: ``(table, problems)``; table is None if unloadable."""
    try:
        table = load_manifest(uri, s3_endpoint=s3_endpoint)
    except ManifestError as exc:
        return None, exc.problems
    return table, validate_table(table)
