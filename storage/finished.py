"""The finished-edit index: which edits under an output root are finished, without listing ``assets/``.

Each shard writes one Parquet part (:func:`storage.keys.finished_part_key`) naming the edits it left
finished (image and sidecar stored). Planning reads the index with one listing of ``index/finished/``
and one GET per part, and merges the parts into one when there are more than :data:`COMPACT_AFTER`.
Edit ids are held as 64-bit hashes with their image's extension: 10M finished edits take ~90 MB.
A root written before the index existed is listed once and that listing becomes its first part.

The index says which edits *were* finished; :meth:`FinishedIndex.verify` checks that their images still
exist (a HEAD per edit, or one listing of ``assets/`` when that takes fewer requests), so an edit whose
image was deleted is redone.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from storage import keys
from storage.base import ObjectStore
from storage.writer import read_parquet, write_parquet

__all__ = [
    "COMPACT_AFTER",
    "FinishedIndex",
    "hash_ids",
    "load_finished",
    "record_finished",
    "record_shard",
    "still_stored",
]

logger = logging.getLogger(__name__)

# Parts read before planning merges them into one: one GET each, so this bounds planning's requests.
COMPACT_AFTER = 64
# Concurrent HEADs/GETs: object-store requests are latency-bound; 16 keeps a small machine responsive.
IO_THREADS = 16
# Keys per listing page (S3's maximum): what a listing of ``assets/`` costs, compared with HEADs.
LIST_PAGE = 1000
# Fixed so that hashes written by one version are read by the next (pandas' SipHash key is 16 bytes).
_HASH_KEY = "editflow-finish1"
_EXTS = keys.IMAGE_EXTENSIONS


def hash_ids(edit_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """The index's 64-bit hash of each edit id (uint64)."""
    values = np.asarray(edit_ids, dtype=object)
    if not len(values):
        return np.zeros(0, np.uint64)
    return pd.util.hash_array(values, encoding="utf8", hash_key=_HASH_KEY, categorize=False)


def _ext_codes(exts: Sequence[str]) -> np.ndarray:
    lookup = {e: i for i, e in enumerate(_EXTS)}
    return np.fromiter((lookup.get(e, -1) for e in exts), dtype=np.int16, count=len(exts))


def _part(hashes: np.ndarray, codes: np.ndarray) -> pa.Table:
    exts = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int16()), pa.array(_EXTS))
    return pa.table({"edit_hash": pa.array(hashes, pa.uint64()), "ext": exts})


class FinishedIndex:
    """The finished edits of one output root: sorted edit-id hashes and their images' extension codes."""

    def __init__(self, store: ObjectStore, hashes: np.ndarray, codes: np.ndarray) -> None:
        order = np.argsort(hashes, kind="stable")
        hashes, codes = hashes[order], codes[order]
        first = np.ones(len(hashes), bool)  # one entry per edit (the first recorded)
        first[1:] = hashes[1:] != hashes[:-1]
        self.store = store
        self.hashes, self.codes = hashes[first], codes[first]
        self.heads = 0  # HEADs sent by verify()
        # edit hash -> image found, for a second pass over the rows
        self._headed: dict[int, bool] = {}
        self._listed: FinishedIndex | None = None  # set once verify() listed ``assets/``

    def __len__(self) -> int:
        return len(self.hashes)

    def __contains__(self, edit_id: str) -> bool:
        return bool(self.lookup([edit_id])[0] >= 0)

    def lookup(self, edit_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Per edit id: its image's extension code when the index holds it, else -1 (int16)."""
        wanted = hash_ids(edit_ids)
        if not len(self.hashes):
            return np.full(len(wanted), -1, np.int16)
        at = np.minimum(np.searchsorted(self.hashes, wanted), len(self.hashes) - 1)
        return np.where(self.hashes[at] == wanted, self.codes[at], -1).astype(np.int16)

    @staticmethod
    def image_key(edit_id: str, code: int) -> str:
        """The key of `edit_id`'s image with extension code `code` (from :meth:`lookup`)."""
        return keys.asset_key(edit_id, _EXTS[code])

    @property
    def listing_cost(self) -> int:
        """The requests one listing of ``assets/`` takes (two objects per finished edit)."""
        return max(1, math.ceil(2 * len(self) / LIST_PAGE))

    def verify(self, edit_ids: Sequence[str], codes: np.ndarray) -> np.ndarray:
        """Which of `edit_ids` (held by the index, `codes` from :meth:`lookup`) still have their image
        and their sidecar: two HEADs each (once: planning may pass the rows twice), or, once the edits
        to check would outnumber a listing's pages, one listing of ``assets/``."""
        hashes = hash_ids(edit_ids).tolist()
        new = [i for i, h in enumerate(hashes) if h not in self._headed]
        if self._listed is None and self.heads + len(new) > self.listing_cost:
            self._listed = scan_assets(self.store)
        if self._listed is not None:
            return self._listed.lookup(edit_ids) >= 0
        self.heads += len(new)  # edits checked (two HEADs each)

        def both_stored(i: int) -> bool:
            image = self.image_key(edit_ids[i], int(codes[i]))
            return self.store.exists(image) and self.store.exists(keys.sidecar_key(edit_ids[i]))

        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
            for i, found in zip(new, pool.map(both_stored, new)):
                self._headed[hashes[i]] = found
        return np.fromiter((self._headed[h] for h in hashes), bool, len(hashes))


def still_stored(index: FinishedIndex, results: pa.Table) -> np.ndarray:
    """Which rows of `results` (finished edits: ``edit_id`` and ``output_uri``) still have their image
    and sidecar, checked through :meth:`FinishedIndex.verify` of the root's `index` (HEADs, or one
    listing of ``assets/`` once that takes fewer requests); an image of unknown extension is gone."""
    edit_ids = results.column("edit_id").to_pylist()
    exts = [uri.rpartition(".")[2].lower() for uri in results.column("output_uri").to_pylist()]
    codes = _ext_codes(exts)
    found = np.zeros(len(edit_ids), bool)
    known = np.flatnonzero(codes >= 0)
    if len(known):
        found[known] = index.verify([edit_ids[i] for i in known], codes[known])
    return found


def scan_assets(store: ObjectStore, *, chunk: int = 100_000) -> FinishedIndex:
    """The finished edits found by listing ``assets/`` (those with both a sidecar and an image); ids
    are hashed a chunk at a time, so memory stays ~10 bytes per object listed."""
    sidecars: list[np.ndarray] = []
    images: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    side_ids: list[str] = []
    image_ids: list[str] = []
    image_exts: list[str] = []

    def flush() -> None:
        sidecars.append(hash_ids(side_ids))
        images.append(hash_ids(image_ids))
        codes.append(_ext_codes(image_exts))
        side_ids.clear(), image_ids.clear(), image_exts.clear()

    for key in store.list(keys.assets_prefix()):
        edit_id = keys.edit_id_of_sidecar(key)
        if edit_id is not None:
            side_ids.append(edit_id)
        elif (edit_id := keys.edit_id_of_image(key)) is not None:
            image_ids.append(edit_id)
            image_exts.append(key.rpartition(".")[2])
        if len(side_ids) + len(image_ids) >= chunk:
            flush()
    flush()
    image_hashes, image_codes = np.concatenate(images), np.concatenate(codes)
    both = np.isin(image_hashes, np.concatenate(sidecars))
    return FinishedIndex(store, image_hashes[both], image_codes[both])


def record_finished(store: ObjectStore, run_id: str, shard_index: int, results: pa.Table) -> int:
    """Write the index part of one shard from its results table: the rows whose image and sidecar are
    stored (succeeded, or skipped with an ``output_uri``). Returns how many it names."""
    done = pc.and_(
        pc.is_in(results.column("status"), pa.array(["succeeded", "skipped"])),
        pc.is_valid(results.column("output_uri")),
    )
    rows = results.filter(done)
    edit_ids = rows.column("edit_id").to_pylist()
    exts = [uri.rpartition(".")[2].lower() for uri in rows.column("output_uri").to_pylist()]
    codes = _ext_codes(exts)
    known = codes >= 0
    hashes = hash_ids(edit_ids)[known]
    write_parquet(store, keys.finished_part_key(run_id, shard_index), _part(hashes, codes[known]))
    return int(known.sum())


def record_shard(store: ObjectStore, run_id: str, shard_index: int) -> int:
    """:func:`record_finished` of the results the shard wrote (``runs/{run_id}/results/shard-{i}``)."""
    results = read_parquet(store, keys.shard_results_key(run_id, shard_index))
    return record_finished(store, run_id, shard_index, results)


def _read_parts(store: ObjectStore, part_keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The (hashes, extension codes) of index parts `part_keys`, read concurrently."""
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        tables = list(pool.map(lambda k: read_parquet(store, k), part_keys))
    hashes, codes = [np.zeros(0, np.uint64)], [np.zeros(0, np.int16)]
    for table in tables:
        ext = pc.dictionary_encode(table.column("ext").combine_chunks())
        if isinstance(ext, pa.ChunkedArray):
            ext = ext.combine_chunks()
        part_codes = _ext_codes(ext.dictionary.to_pylist())[
            ext.indices.to_numpy(zero_copy_only=False)
        ]
        hashes.append(table.column("edit_hash").to_numpy().astype(np.uint64)[part_codes >= 0])
        codes.append(part_codes[part_codes >= 0])
    return np.concatenate(hashes), np.concatenate(codes)


def merge_parts(
    store: ObjectStore, part_keys: list[str], name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Merge index parts `part_keys` into one (:func:`storage.keys.finished_merged_key` of `name` and a
    random token), then delete them; returns the merged (hashes, codes). A part a shard rewrites while
    this runs may be lost: its edits are then redone, found finished at write time, and indexed again."""
    hashes, codes = _read_parts(store, part_keys)
    key = keys.finished_merged_key(f"{name}-{secrets.token_hex(4)}")
    write_parquet(store, key, _part(hashes, codes))
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        list(pool.map(store.delete, part_keys))
    return hashes, codes


def merge_run_parts(store: ObjectStore, run_id: str) -> int:
    """Merge the index parts the shards of `run_id` wrote into one (after the run's fan-out), so that
    planning reads one part per run; returns how many parts were merged."""
    prefix = keys.finished_part_key(run_id, 0).rpartition("-shard-")[0] + "-shard-"
    part_keys = [k for k in store.list(prefix) if re.fullmatch(r"\d+\.parquet", k[len(prefix) :])]
    if len(part_keys) > 1:
        merge_parts(store, part_keys, run_id)
    return len(part_keys)


def load_finished(store: ObjectStore) -> FinishedIndex:
    """The finished-edit index of `store`: its parts read (and merged into one when there are more
    than :data:`COMPACT_AFTER`); a root without an index is listed once and the listing written as
    its index."""
    part_keys = [k for k in store.list(keys.finished_index_prefix()) if k.endswith(".parquet")]
    if not part_keys:
        index = scan_assets(store)
        key = keys.finished_merged_key(f"listing-{secrets.token_hex(4)}")
        write_parquet(store, key, _part(index.hashes, index.codes))
        logger.info("no finished-edit index under %s: listed assets/ once (%d finished)",
                    store.uri(), len(index))  # fmt: skip
        index._listed = index  # that listing is fresh: verify() need not look again
        return index
    if len(part_keys) > COMPACT_AFTER:
        hashes, codes = merge_parts(store, part_keys, "all")
        logger.info("merged %d finished-index parts under %s", len(part_keys), store.uri())
    else:
        hashes, codes = _read_parts(store, part_keys)
    return FinishedIndex(store, hashes, codes)
