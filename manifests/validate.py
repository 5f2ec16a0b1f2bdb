"""Manifest validation: every problem, with row, column and reason, and the resolved per-row values.

:func:`analyse` checks a loaded table once and returns a frozen :class:`Analysis`: the problems
(manifest/column level first, then by row) and, for a non-empty manifest, the values every row
resolves to (defaults filled), which normalising uses without checking again. Each check is a
function that returns its problems and values; none depends on state left by another.

Column-level checks are vectorised (pyarrow/numpy); ``settings`` JSON is parsed once per distinct
text and checked once per distinct (method, settings) pair, so a million-row manifest validates in
seconds. Row numbers are 0-based positions in the manifest.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from editing.configs import config_from_settings
from manifests.problems import Problem, format_problems, rows_text, show_value
from manifests.schema import (
    DEFAULT_METHOD,
    DEFAULT_NUM_STEPS,
    DEFAULT_SEED,
    GUIDANCE_RANGE,
    KNOWN_COLUMNS,
    METHODS,
    NUM_STEPS_RANGE,
    QA_CONTRAST_COLUMN,
    REQUIRED_COLUMNS,
    RESERVED_COLUMNS,
    contrast_prompts,
    default_guidance,
)
from storage.base import NotFound, NotRegularFile
from storage.errors import describe_storage_error
from storage.keys import EDIT_ID_MAX_BYTES, UNSAFE_ID_PATTERN, canonical_json
from storage.uri import (
    SCHEME_PATTERN,
    SUPPORTED_URI_PATTERN,
    is_supported_uri,
    split_uri,
    unreadable_uris,
)

__all__ = [
    "Analysis",
    "RowValues",
    "analyse",
    "validate_table",
    "is_string_type",
    "source_problems",
]

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
# Given edit ids become file names and show in listings and reports: no control or format
# characters (bidi overrides, zero-width spaces), no line separators, no leading or trailing
# whitespace and no leading dot (a hidden file). Derived ids are hex and never match.
_SPOOFING_ID_PATTERN = r"[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]|^[\s\p{Z}]|[\s\p{Z}]$|^\."
_CONTROL_PATTERN = r"\p{Cc}"  # NUL, newlines, escapes: never part of an image URI
SETTINGS_MAX_BYTES = 64 * 1024  # a settings text's size in UTF-8; real ones are a few hundred bytes
# concurrent stats/HEADs of `validate`'s source check: latency-bound requests, a small machine kept responsive
SOURCE_CHECK_THREADS = 16
SETTINGS_MAX_DEPTH = 32  # nesting of JSON objects and arrays; the configs use at most 2

Reason = str | Callable[[Any], str]  # a problem's text, or a function of the row's value


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class RowValues:
    """What every row resolves to once defaults are filled (valid rows; bad ones hold a default)."""

    method: pa.Array  # method names
    seed: np.ndarray  # int64
    num_steps: np.ndarray  # int64
    guidance: np.ndarray  # float64: column, else settings' guidance_scale, else the method default
    negative: pa.Array  # strings: column, else settings' negative_prompt, else ""
    settings_codes: np.ndarray  # int64 index into settings_identity per row
    settings_identity: list[
        str
    ]  # canonical JSON of each distinct settings text (last: no settings)
    missing_id: np.ndarray  # bool: rows whose edit_id is derived


@dataclass(frozen=True, slots=True)
class Analysis:
    """One check of a manifest table: its problems and, unless it is empty, its resolved values."""

    problems: list[Problem]  # manifest/column level first, then by row
    n: int  # rows
    arrays: dict[str, pa.Array]  # the known columns of a usable type, one contiguous array each
    values: RowValues | None  # None for a manifest without rows


@dataclass(frozen=True, slots=True)
class _Settings:
    """The distinct settings texts of a manifest, parsed: one slot each, plus one for 'no settings'."""

    codes: np.ndarray  # per row: its slot
    identity: list[str]  # per slot: canonical JSON without guidance_scale/negative_prompt
    identity_codes: np.ndarray  # per slot: a code equal for equal identities
    guidance: np.ndarray  # per slot: the settings' own guidance_scale (NaN = none)
    negative: pa.Array  # per slot: the settings' own negative_prompt (null = none)


# ----------------------------------------------------------------------------- column helpers


def is_string_type(t: pa.DataType) -> bool:
    """Whether a column of type `t` holds strings (plain, large, view or dictionary-encoded)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _type_problem(name: str, t: pa.DataType) -> str | None:
    """Why column `name` of type `t` cannot be used, or None."""
    if pa.types.is_null(t):  # every value missing
        return "has no values (type null)" if name in REQUIRED_COLUMNS else None
    if name in _STRING_COLUMNS:
        return None if is_string_type(t) else f"must be a string column, got {t}"
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


def _row_problems(
    mask: np.ndarray, column: str | None, reason: Reason, values: pa.Array | None = None
) -> list[Problem]:
    """A problem for every row in `mask`; a callable `reason` gets the row's value from `values`."""
    rows = np.flatnonzero(mask)
    if len(rows) == 0:
        return []
    if values is None:
        return [Problem(int(r), column, reason) for r in rows]  # type: ignore[arg-type]
    picked = values.take(pa.array(rows)).to_pylist()
    return [Problem(int(r), column, reason(v)) for r, v in zip(rows, picked, strict=True)]  # type: ignore[operator]


# ----------------------------------------------------------------------------- checks


def _check_columns(table: pa.Table) -> tuple[list[Problem], dict[str, pa.Array]]:
    """Manifest- and column-level problems, and the known columns of a usable type."""
    names = table.column_names
    problems: list[Problem] = []
    arrays: dict[str, pa.Array] = {}
    if table.num_rows == 0:
        problems.append(Problem(None, None, "manifest is empty: it has no rows"))
    for name, count in Counter(names).items():
        if count > 1:
            problems.append(Problem(None, name, f"column appears {count} times"))
    for name in REQUIRED_COLUMNS:
        if name not in names:
            problems.append(Problem(None, name, "required column is missing"))
    for name in RESERVED_COLUMNS:
        if name in names:
            problems.append(
                Problem(None, name, "column name is reserved for the results table; rename it")
            )
    for name in KNOWN_COLUMNS:
        if name not in names or names.count(name) > 1:
            continue
        column = table.column(name)
        if name not in REQUIRED_COLUMNS and len(column) and column.null_count == len(column):
            # every value missing (pandas types such a column float64 or object): the defaults
            column = pa.chunked_array([pa.nulls(len(column))])
        reason = _type_problem(name, column.type)
        if reason is not None:
            problems.append(Problem(None, name, reason))
        else:
            arrays[name] = _array(column, name)
    return problems, arrays


def _required_strings(arrays: dict[str, pa.Array]) -> list[Problem]:
    problems: list[Problem] = []
    for name in REQUIRED_COLUMNS:
        arr = arrays.get(name)
        if arr is None:
            continue
        problems += _row_problems(_mask(arr.is_null()), name, "is null (a value is required)")
        problems += _row_problems(
            _mask(pc.equal(pc.utf8_trim_whitespace(arr), "")),
            name,
            "is empty (a value is required)",
        )
    return problems


def _uri_reason(uri: str) -> str:
    try:
        split_uri(uri)
    except ValueError as exc:
        return f"unsupported image URI: {exc}"
    return f"image URI {show_value(uri)} names no object (expected s3://bucket/key)"


def _uris(arrays: dict[str, pa.Array]) -> list[Problem]:
    arr = arrays.get("image_uri")
    if arr is None:
        return []
    control = _mask(pc.match_substring_regex(arr, _CONTROL_PATTERN))
    has_scheme = _mask(pc.match_substring_regex(arr, SCHEME_PATTERN))
    supported = _mask(pc.match_substring_regex(arr, SUPPORTED_URI_PATTERN))
    return _row_problems(
        control,
        "image_uri",
        lambda v: f"image URI {show_value(v)} contains a control character (NUL, newline, ...)",
        arr,
    ) + _row_problems(has_scheme & ~supported & ~control, "image_uri", _uri_reason, arr)


def _duplicates(
    codes: np.ndarray, values: list[Any], column: str, reason: Callable[[Any, str], str]
) -> list[Problem]:
    """A problem for every row whose code (>= 0) occurs more than once, naming the other rows."""
    valid = codes >= 0
    if not valid.any():
        return []
    counts = np.bincount(codes[valid], minlength=len(values))
    dup_rows = np.flatnonzero(valid & (counts[np.where(valid, codes, 0)] > 1))
    if len(dup_rows) == 0:
        return []
    order = np.argsort(codes[dup_rows], kind="stable")
    groups: dict[int, list[int]] = {}
    for r in dup_rows[order]:
        groups.setdefault(int(codes[r]), []).append(int(r))
    problems: list[Problem] = []
    for code, rows in groups.items():
        for r in rows:
            others = [o for o in rows if o != r]
            problems.append(Problem(r, column, reason(values[code], rows_text(others))))
    return problems


def _edit_ids(
    arrays: dict[str, pa.Array], n: int, *, duplicates: bool = True
) -> tuple[list[Problem], np.ndarray]:
    """Problems of the given edit ids, and the rows whose id is to be derived (none given)."""
    arr = arrays.get("edit_id")
    if arr is None:
        return [], np.ones(n, dtype=bool)
    missing = _mask(arr.is_null()) | _mask(pc.equal(arr, ""))
    unsafe = _mask(pc.match_substring_regex(arr, UNSAFE_ID_PATTERN)) | _mask(pc.equal(arr, "."))
    problems = _row_problems(
        unsafe,
        "edit_id",
        lambda v: (
            f"edit_id {show_value(v)} is not key-safe (no '/', '\\', '..' or control characters)"
        ),
        arr,
    )
    nbytes = pc.binary_length(arr)  # UTF-8 bytes: file names are limited in bytes, not characters
    too_long = _mask(pc.greater(nbytes, EDIT_ID_MAX_BYTES))
    spoofing = _mask(pc.match_substring_regex(arr, _SPOOFING_ID_PATTERN)) & ~unsafe
    problems += _row_problems(
        spoofing,
        "edit_id",
        lambda v: (
            f"edit_id {show_value(v)} has a control or invisible character (bidi, zero-width), "
            "leading or trailing whitespace, or a leading '.'"
        ),
        arr,
    )
    unsafe |= spoofing
    problems += _row_problems(
        too_long & ~unsafe,
        "edit_id",
        lambda size: (
            f"edit_id is longer than {EDIT_ID_MAX_BYTES} bytes ({size} bytes in UTF-8); it becomes "
            "a file name, which may have at most 255 bytes with its extension"
        ),
        nbytes,
    )
    if not duplicates:
        return problems, missing
    codes, values = _codes(arr)
    problems += _duplicates(
        np.where(missing, -1, codes),
        values,
        "edit_id",
        lambda v, others: f"duplicate edit_id {show_value(v)} (also in {others})",
    )
    return problems, missing


def _methods(arrays: dict[str, pa.Array], n: int) -> tuple[list[Problem], pa.Array]:
    """Unknown methods, and each row's method (the default where none is given)."""
    arr = arrays.get("method")
    if arr is None:
        return [], pa.array(np.full(n, DEFAULT_METHOD, dtype=object), pa.string())
    method = arr.fill_null(DEFAULT_METHOD)
    known = _mask(pc.is_in(method, value_set=pa.array(METHODS, type=method.type)))
    problems = _row_problems(
        ~known,
        "method",
        lambda v: f"unknown method {show_value(v)}; known: {', '.join(METHODS)}",
        method,
    )
    return problems, method


def _integers(
    arrays: dict[str, pa.Array], n: int, name: str, lo: int | None, hi: int | None, default: int
) -> tuple[list[Problem], np.ndarray]:
    """Check an integer-valued column; its values as int64 with `default` for nulls and bad rows."""
    arr = arrays.get(name)
    out = np.full(n, default, dtype=np.int64)
    if arr is None:
        return [], out
    problems: list[Problem] = []
    valid = ~_mask(arr.is_null())
    bad = np.zeros(n, dtype=bool)
    if pa.types.is_floating(arr.type):
        x = _floats(arr)
        with np.errstate(invalid="ignore"):
            integral = np.isfinite(x) & (np.floor(x) == x) & (np.abs(x) < 2.0**63)
        problems += _row_problems(
            valid & ~integral,
            name,
            lambda v: f"{name} must be an integer, got {show_value(v)}",
            arr,
        )
        bad |= valid & ~integral
        ints = np.where(valid & integral, x, default).astype(np.int64)
    else:
        if arr.type == pa.uint64():  # the only integer type that can exceed int64
            limit = pa.scalar(_INT64_MAX, arr.type)
            over = _mask(pc.greater(arr, limit))
            problems += _row_problems(
                over, name, lambda v: f"{name} {v} does not fit in int64", arr
            )
            bad |= over
            arr = pc.if_else(pc.greater(arr, limit), pa.scalar(0, arr.type), arr)
        ints = np.asarray(
            arr.cast(pa.int64()).fill_null(default).to_numpy(zero_copy_only=False),
            dtype=np.int64,
        )
    if lo is not None and hi is not None:
        out_of_range = valid & ~bad & ((ints < lo) | (ints > hi))
        problems += _row_problems(
            out_of_range,
            name,
            lambda v: f"{name} must be in [{lo}, {hi}], got {show_value(v)}",
            arr,
        )
        bad |= out_of_range
    out[valid & ~bad] = ints[valid & ~bad]
    return problems, out


def _guidance_column(arrays: dict[str, pa.Array], n: int) -> tuple[list[Problem], np.ndarray]:
    """Problems of the guidance_scale column, and its values as float64 (NaN = not given or bad)."""
    arr = arrays.get("guidance_scale")
    if arr is None:
        return [], np.full(n, math.nan)
    x = _floats(arr)
    valid = ~_mask(arr.is_null())
    lo, hi = GUIDANCE_RANGE
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(x) & (x >= lo) & (x <= hi)
    problems = _row_problems(
        valid & ~ok,
        "guidance_scale",
        lambda v: f"guidance_scale must be a number in [{lo:g}, {hi:g}], got {show_value(v)}",
        arr,
    )
    return problems, np.where(valid & ok, x, math.nan)


class _DuplicateKey(ValueError):
    """A JSON object with the same key twice (``json`` would keep the last silently)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object_pairs_hook: the object, or ``_DuplicateKey``."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


_JSON_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')


def _json_depth(text: str) -> int:
    """How deeply JSON `text` nests objects and arrays (brackets inside strings do not count),
    without parsing it: a parser would recurse once per level."""
    bare = np.frombuffer(_JSON_STRING_RE.sub("", text).encode("utf-8", "surrogatepass"), np.uint8)
    steps = np.isin(bare, (ord("["), ord("{"))).astype(np.int64)
    steps -= np.isin(bare, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def _parse_settings(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """One settings text: (its object, None) or (None, why it is not one)."""
    if text.strip() == "":
        return {}, None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > SETTINGS_MAX_BYTES:
        return None, f"settings is {size} bytes; at most {SETTINGS_MAX_BYTES} are allowed"
    depth = _json_depth(text)
    if depth > SETTINGS_MAX_DEPTH:
        return None, (
            f"settings nests {depth} levels deep; at most {SETTINGS_MAX_DEPTH} are allowed"
        )
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        return None, f"settings has the key {exc.key!r} twice: {show_value(text)}"
    except (ValueError, RecursionError) as exc:
        return None, f"settings is not valid JSON ({exc}): {show_value(text)}"
    if not isinstance(value, dict):
        return (
            None,
            f"settings must be a JSON object, got {type(value).__name__}: {show_value(text)}",
        )
    return value, None


def _settings(
    arrays: dict[str, pa.Array], n: int, method: pa.Array
) -> tuple[list[Problem], _Settings]:
    """Parse each distinct settings text once; check each distinct (method, settings) once."""
    arr = arrays.get("settings")
    if arr is None:
        codes, texts = np.full(n, -1, dtype=np.int64), []
    else:
        codes, texts = _codes(arr)
    parsed_and_errors = [_parse_settings(text) for text in texts]
    parsed = [value for value, _ in parsed_and_errors]
    parse_errors = [error for _, error in parsed_and_errors]

    # distinct (method, settings) pairs -> one config check each
    m_codes, m_values = _codes(method)
    width = len(texts) + 1
    pairs = m_codes * width + (codes + 1)
    unique_pairs, inverse = np.unique(pairs, return_inverse=True)
    reasons: list[str | None] = []
    for pair in unique_pairs.tolist():
        name = m_values[pair // width] if pair >= 0 else None
        s_code = pair % width - 1
        if s_code >= 0 and parse_errors[s_code] is not None:
            reasons.append(parse_errors[s_code])
        elif name in METHODS:
            try:
                config_from_settings(name, parsed[s_code] if s_code >= 0 else {})
                reasons.append(None)
            except ValueError as exc:
                reasons.append(f"settings rejected for method {name!r}: {exc}")
        else:
            reasons.append(None)  # unknown method: reported on its own
    reason_arr = np.array(reasons + [None], dtype=object)[np.asarray(inverse).reshape(-1)]
    bad_rows = np.flatnonzero(reason_arr != None)  # noqa: E711 - elementwise on an object array
    problems = [Problem(int(r), "settings", reason_arr[r]) for r in bad_rows]

    # settings' own guidance_scale / negative_prompt, per slot; the rest is the identity
    guidance = np.full(width, math.nan)  # last slot: no settings
    negative: list[str | None] = [None] * width
    identity: list[str] = []
    for i, value in enumerate(parsed):
        value = value or {}
        g = value.get("guidance_scale")
        if isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g):
            guidance[i] = float(g)
        neg = value.get("negative_prompt")
        if isinstance(neg, str):
            negative[i] = neg
        rest = {k: v for k, v in value.items() if k not in ("guidance_scale", "negative_prompt")}
        try:
            identity.append(canonical_json(rest))
        except ValueError:  # NaN inside settings: already reported by the config check
            identity.append("{}")
    identity.append("{}")  # for rows without settings
    code_of: dict[str, int] = {}
    identity_codes = np.array([code_of.setdefault(t, len(code_of)) for t in identity], np.int64)
    return problems, _Settings(
        codes=np.where(codes >= 0, codes, len(texts)),
        identity=identity,
        identity_codes=identity_codes,
        guidance=guidance,
        negative=pa.array(negative, pa.string()),
    )


def _resolve_guidance(
    column: np.ndarray, settings: _Settings, method: pa.Array
) -> tuple[list[Problem], np.ndarray]:
    """Column values win over settings' ones (disagreeing pairs are problems); then the default."""
    from_settings = settings.guidance[settings.codes]
    both = ~np.isnan(column) & ~np.isnan(from_settings)
    clash = both & (column != from_settings)
    problems = [
        Problem(
            int(r),
            "guidance_scale",
            f"guidance_scale {column[r]:g} disagrees with settings' guidance_scale {from_settings[r]:g}",
        )
        for r in np.flatnonzero(clash)
    ]
    guidance = np.where(np.isnan(column), from_settings, column)
    missing = np.isnan(guidance)
    if missing.any():  # each method's config default
        m_codes, m_values = _codes(method)
        per_value = np.array(
            [default_guidance(m if m in METHODS else DEFAULT_METHOD) for m in m_values]
        )
        guidance[missing] = per_value[m_codes[missing]]
    return problems, guidance


def _resolve_negative(
    arrays: dict[str, pa.Array], settings: _Settings
) -> tuple[list[Problem], pa.Array]:
    """The column's negative prompt, else the settings' one (disagreeing pairs are problems), else ""."""
    from_settings = settings.negative.take(pa.array(settings.codes))
    arr = arrays.get("negative_prompt")
    if arr is None:
        return [], pc.coalesce(from_settings.cast(pa.large_string()), "")
    clash = _mask(
        pc.and_(pc.and_(arr.is_valid(), from_settings.is_valid()), pc.not_equal(arr, from_settings))
    )
    problems = _row_problems(
        clash, "negative_prompt", "negative_prompt disagrees with settings' negative_prompt"
    )
    negative = pc.coalesce(arr.cast(pa.large_string()), from_settings.cast(pa.large_string()), "")
    return problems, negative


def _derived_duplicates(
    arrays: dict[str, pa.Array], values: RowValues, identity_codes: np.ndarray
) -> list[Problem]:
    """Rows without an edit_id whose derived ids would coincide (the same edit twice)."""
    rows = np.flatnonzero(values.missing_id)
    if len(rows) < 2 or any(name not in arrays for name in REQUIRED_COLUMNS):
        return []
    take = pa.array(rows)
    frame = pd.DataFrame(
        {
            "image_uri": _codes(arrays["image_uri"].take(take))[0],
            "source_prompt": _codes(arrays["source_prompt"].take(take))[0],
            "target_prompt": _codes(arrays["target_prompt"].take(take))[0],
            "method": _codes(values.method.take(take))[0],
            "settings": identity_codes[values.settings_codes[rows]],
            "seed": values.seed[rows],
            "num_steps": values.num_steps[rows],
            "guidance": values.guidance[rows],
            "negative": _codes(values.negative.take(take))[0],
        }
    )
    dup = frame.duplicated(keep=False).to_numpy()
    if not dup.any():
        return []
    dup_rows = rows[dup]
    group_ids = (
        frame[dup].groupby(list(frame.columns), sort=False, dropna=False).ngroup().to_numpy()
    )
    groups: dict[int, list[int]] = {}
    for g, r in zip(group_ids.tolist(), dup_rows.tolist(), strict=True):
        groups.setdefault(g, []).append(r)
    problems: list[Problem] = []
    for members in groups.values():
        for r in members:
            others = [o for o in members if o != r]
            problems.append(
                Problem(
                    r,
                    "edit_id",
                    f"same edit as {rows_text(others)} (identical image, prompts, method, settings, "
                    "seed, steps, guidance and negative prompt), so their derived edit_ids coincide; "
                    "remove the duplicate or give each row its own edit_id",
                )
            )
    return problems


def _qa_contrast(table: pa.Table) -> list[Problem]:
    """The ``qa_contrast`` passthrough column: strings or lists of strings, each value readable by
    :func:`manifests.schema.contrast_prompts` (each distinct string checked once)."""
    names = table.column_names
    if names.count(QA_CONTRAST_COLUMN) != 1:  # absent, or repeated (a column problem already)
        return []
    column = table.column(QA_CONTRAST_COLUMN)
    if column.null_count == len(column):  # every value missing: judged against the source prompt
        return []
    arr = _array(column, QA_CONTRAST_COLUMN)
    t = arr.type
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t)
    if not (is_string_type(t) or (is_list and is_string_type(t.value_type))):
        reason = f"must be a string column ('|'-separated prompts) or a list of strings, got {t}"
        return [Problem(None, QA_CONTRAST_COLUMN, reason)]
    if is_list:
        codes, distinct = np.arange(len(arr)), arr.to_pylist()
    else:  # each distinct string once
        codes, distinct = _codes(arr)
    reasons = {}
    for j, value in enumerate(distinct):
        try:
            contrast_prompts(value)
        except ValueError as exc:
            reasons[j] = str(exc)
    bad = np.flatnonzero(np.isin(codes, list(reasons)))
    return [Problem(int(r), QA_CONTRAST_COLUMN, reasons[int(codes[r])]) for r in bad]


# ----------------------------------------------------------------------------- the analysis


def _sorted(problems: list[Problem]) -> list[Problem]:
    """Manifest/column-level problems first, then by row; the order of the checks within a row."""
    return sorted(problems, key=lambda p: (p.row is not None, -1 if p.row is None else p.row))


def analyse(table: pa.Table, *, duplicates: bool = True) -> Analysis:
    """Check the manifest `table` once: its problems and the values its rows resolve to.

    ``duplicates=False`` leaves out the checks across rows (repeated edit ids, repeated edits):
    a streaming check (``manifests.stream``) makes them over the whole manifest itself."""
    problems, arrays = _check_columns(table)
    n = table.num_rows
    if n == 0:
        return Analysis(problems=problems, n=0, arrays=arrays, values=None)
    problems += _required_strings(arrays)
    problems += _uris(arrays)
    id_problems, missing_id = _edit_ids(arrays, n, duplicates=duplicates)
    method_problems, method = _methods(arrays, n)
    seed_problems, seed = _integers(arrays, n, "seed", None, None, DEFAULT_SEED)
    steps_problems, num_steps = _integers(
        arrays, n, "num_steps", *NUM_STEPS_RANGE, DEFAULT_NUM_STEPS
    )
    column_guidance_problems, column_guidance = _guidance_column(arrays, n)
    settings_problems, settings = _settings(arrays, n, method)
    guidance_problems, guidance = _resolve_guidance(column_guidance, settings, method)
    negative_problems, negative = _resolve_negative(arrays, settings)
    values = RowValues(
        method=method,
        seed=seed,
        num_steps=num_steps,
        guidance=guidance,
        negative=negative,
        settings_codes=settings.codes,
        settings_identity=settings.identity,
        missing_id=missing_id,
    )
    problems += (
        id_problems
        + method_problems
        + seed_problems
        + steps_problems
        + column_guidance_problems
        + settings_problems
        + guidance_problems
        + negative_problems
        + (_derived_duplicates(arrays, values, settings.identity_codes) if duplicates else [])
        + _qa_contrast(table)
    )
    return Analysis(problems=_sorted(problems), n=n, arrays=arrays, values=values)


def validate_table(table: pa.Table) -> list[Problem]:
    """Every problem of the manifest `table` (empty list = valid), manifest/column-level first,
    then by row. Checks: required columns, types, nulls and empty required strings, URI
    schemes, key-safe and unique edit_ids, methods, seed/num_steps/guidance_scale ranges,
    settings JSON and each method's config, reserved column names, repeated identical edits.
    (:func:`analyse`'s problems; use ``manifests.prepare_manifest`` to load, check and normalise
    in one pass.)
    """
    return analyse(table).problems


# ----------------------------------------------------------------------------- the sources


def _source_reason(uri: str, exc: Exception) -> str:
    """Why the source at `uri` cannot be read, in a phrase (no exception class names for the usual ones)."""
    if isinstance(exc, NotFound):
        return f"source image not found: {uri}"
    if isinstance(exc, NotRegularFile):
        return f"source image {uri} is {exc.kind}, not a regular file"
    if isinstance(exc, PermissionError):
        return f"source image {uri} is not readable (permission denied)"
    described = describe_storage_error(exc)
    return f"source image {uri} cannot be checked: {described or f'{type(exc).__name__}: {exc}'}"


def source_problems(
    uri: str, *, s3_endpoint: str | None = None, threads: int = SOURCE_CHECK_THREADS
) -> list[Problem]:
    """One problem per distinct ``image_uri`` of the manifest at `uri` that is not a readable regular
    file or object (a stat or HEAD each, `threads` at a time; nothing is read), at the first row that
    names it (its other rows are counted in the reason). URIs the table check refuses are left to it."""
    from manifests.stream import open_manifest  # here: manifests.stream imports this module

    rows: dict[str, list[int]] = {}
    for first, table in open_manifest(uri, s3_endpoint=s3_endpoint).batches():
        if "image_uri" not in table.column_names:
            return []
        for i, value in enumerate(table.column("image_uri").to_pylist()):
            if isinstance(value, str) and value and is_supported_uri(value):
                rows.setdefault(value, []).append(first + i)
    bad = unreadable_uris(rows, s3_endpoint=s3_endpoint, threads=threads)
    problems = []
    for source, exc in bad.items():
        first, *others = rows[source]
        also = f" (also {rows_text(others)})" if others else ""
        problems.append(Problem(first, "image_uri", _source_reason(source, exc) + also))
    return _sorted(problems)


def merge_problems(scan: Any, sources: list[Problem], *, limit: int = 1000) -> tuple[str, int]:
    """The report of a manifest scan's problems (``manifests.stream.ScanResult``) and `sources`'
    (:func:`source_problems`) together, by row, and their total."""
    total = scan.total + len(sources)
    if not total:
        return "manifest is valid", 0
    counts = dict(scan.counts)
    counts["image_uri"] = counts.get("image_uri", 0) + len(sources)
    problems = _sorted(list(scan.problems) + sources)
    return format_problems(problems, limit=limit, total=total, counts=counts), total
