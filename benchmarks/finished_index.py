"""Planning against an output that already holds N finished edits: S3 requests and seconds, with the
finished-edit index (storage/finished.py) versus listing ``assets/`` (what planning did before).

    python -m benchmarks.finished_index                  # N = 20k and 100k (~5 min, mostly moto)
    python -m benchmarks.finished_index --sizes 100000
    python -m benchmarks.finished_index --quick          # N = 20k only

Per N, against a moto S3 server started here (the output root on S3, the manifests on local disk, so
only the output's requests are counted, with a boto3 ``before-call`` hook on editflow's client):

1. Arrange (untimed): N finished edits, each an image and a sidecar under ``assets/`` (stored into
   moto's backend directly, which is faster than N PUTs), and their index written as the shards of one
   run would write it (``record_finished`` per 64-edit shard over HTTP), then merged as the flow merges
   a run's parts (``merge_run_parts``; its requests are reported: one GET and one DELETE per part).
2. ``plan_run`` of a manifest of 1,000 *new* edits (a nightly run of new catalogue items): reads the
   index and checks nothing else. Target (issue 18): < 200 requests and < 15 s at N = 100k.
3. ``plan_run`` of a manifest of the N finished edits plus 1,000 new ones (the whole catalogue again):
   the index finds the N finished; their images are verified with one listing of ``assets/``
   (cheaper than N HEADs), so this costs what the listing costs.
4. For reference, one listing of ``assets/`` (what every planning did before the index).
5. ``tasks.runs.shards_to_rerun`` of the run that finished the N edits, after one image was deleted
   (what ``editflow rerun`` asks first): one GET per shard's results, the index, and the listing
   that verifies the finished outputs; it finds the one shard to run again.

Cases 3 to 5 run only up to N = 20k: moto's listing slows with the bucket's size on every page.

Requests at 1M finished edits are extrapolated from the counts (they are linear or constant in N).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    machine_facts,
    make_bucket,
    moto_s3,
    print_machine,
    print_table,
    write_result,
)

NEW_ROWS = 1000
# moto lists a bucket in time that grows with the bucket for every page (40 pages at 20k edits took
# 97 s here): the listing cases run only up to this N, and are extrapolated (linear on S3) beyond it.
LISTING_MAX = 20_000
SHARD = 64
TARGET_REQUESTS = 200
TARGET_S = 15.0


class RequestCounter:
    """Counts the S3 operations editflow's cached boto3 client sends (``before-call`` event hook)."""

    def __init__(self, client) -> None:
        self.ops: Counter[str] = Counter()
        client.meta.events.register("before-call.s3", self._count)

    def _count(self, event_name: str, **_) -> None:
        self.ops[event_name.rsplit(".", 1)[-1]] += 1

    def take(self) -> dict[str, int]:
        ops, self.ops = dict(self.ops), Counter()
        return ops


def manifest(path: Path, edit_ids: list[str]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(edit_ids)
    src = [f"{i // 4}" for i in range(n)]
    pq.write_table(
        pa.table(
            {
                "edit_id": edit_ids,
                "image_uri": [f"s3://catalog/images/item-{s}.jpg" for s in src],
                "source_prompt": [f"a photo of item {s}" for s in src],
                "target_prompt": [f"a photo of item {s}, style {i % 4}" for i, s in enumerate(src)],
                "method": ["pnp"] * n,
            }
        ),
        path,
    )
    return str(path)


def arrange(endpoint: str, bucket: str, n: int, counter: RequestCounter) -> dict:
    """N finished edits under s3://bucket/out: assets in moto's backend, the index as one run writes it."""
    import pyarrow as pa
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from storage import keys
    from storage.finished import merge_run_parts, record_finished
    from storage.uri import open_store

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    t0 = time.perf_counter()
    for i in range(n):
        e = f"done-{i:08d}"
        backend.put_object(bucket, "out/" + keys.asset_key(e, "png"), b"png")
        backend.put_object(bucket, "out/" + keys.sidecar_key(e), b"{}")
    t_assets = time.perf_counter() - t0
    out = open_store(f"s3://{bucket}/out", s3_endpoint=endpoint)
    t0 = time.perf_counter()
    for shard, start in enumerate(range(0, n, SHARD)):
        ids = [f"done-{i:08d}" for i in range(start, min(n, start + SHARD))]
        uris = [out.uri(keys.asset_key(e, "png")) for e in ids]
        table = pa.table({"edit_id": ids, "status": ["succeeded"] * len(ids), "output_uri": uris})
        record_finished(out, "earlier", shard, table)
    t_parts = time.perf_counter() - t0
    counter.take()
    t0 = time.perf_counter()
    parts = merge_run_parts(out, "earlier")
    t_merge = time.perf_counter() - t0
    return {"assets_s": t_assets, "parts": parts, "parts_s": t_parts,
            "merge_s": t_merge, "merge_requests": counter.take()}  # fmt: skip


def plan(manifest_uri: str, out: str, endpoint: str, run_id: str, counter: RequestCounter) -> dict:
    from tasks.options import RunOptions
    from tasks.planning import plan_run

    counter.take()
    t0 = time.perf_counter()
    result = plan_run(
        manifest_uri, RunOptions(out=out, s3_endpoint=endpoint), run_id=run_id, shard_size=SHARD
    )
    seconds = time.perf_counter() - t0
    ops = counter.take()
    return {"seconds": seconds, "requests": sum(ops.values()), "ops": ops,
            "pending": result["pending"], "skipped": result["skipped"],
            "shards": len(result["shards"])}  # fmt: skip


def measure(n: int, tmp: Path, endpoint: str) -> dict:
    from storage.finished import scan_assets
    from storage.s3 import get_s3_client
    from storage.uri import open_store

    counter = RequestCounter(get_s3_client(endpoint))
    bucket = make_bucket(endpoint, f"finished-{n}")
    out = f"s3://{bucket}/out"
    arranged = arrange(endpoint, bucket, n, counter)
    new = [f"new-{i:08d}" for i in range(NEW_ROWS)]
    finished = [f"done-{i:08d}" for i in range(n)]
    only_new = plan(manifest(tmp / f"new-{n}.parquet", new), out, endpoint, "new", counter)
    assert only_new["skipped"] == 0 and only_new["pending"] == NEW_ROWS
    result = {"finished": n, "arrange": arranged, "new_rows": only_new}
    if n > LISTING_MAX:
        return result
    everything = plan(
        manifest(tmp / f"all-{n}.parquet", finished + new), out, endpoint, "all", counter
    )
    t0 = time.perf_counter()
    listed = len(scan_assets(open_store(out, s3_endpoint=endpoint)))
    listing = {"seconds": time.perf_counter() - t0, "requests": sum(counter.take().values())}
    assert listed == n and everything["skipped"] == n
    return result | {"all_rows": everything, "listing": listing, "rerun": rerun(bucket, out, endpoint, n, counter)}  # fmt: skip


def rerun(bucket: str, out: str, endpoint: str, n: int, counter: RequestCounter) -> dict:
    """``shards_to_rerun`` of the run that finished the N edits (its results files put into moto's
    backend, uncounted), after one of its images was deleted: the shard that lost it is found."""
    import pyarrow as pa
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from storage import keys
    from storage.uri import open_store
    from tasks.options import RunOptions
    from tasks.runs import shards_to_rerun

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    store = open_store(out, s3_endpoint=endpoint)
    shards = []
    for shard, start in enumerate(range(0, n, SHARD)):
        ids = [f"done-{i:08d}" for i in range(start, min(n, start + SHARD))]
        results = pa.table({
            "edit_id": ids, "row": list(range(start, start + len(ids))), "status": ["succeeded"] * len(ids),
            "output_uri": [store.uri(keys.asset_key(e, "png")) for e in ids],
            "metadata_uri": [store.uri(keys.sidecar_key(e)) for e in ids], "error": pa.nulls(len(ids), pa.string()),
        })  # fmt: skip
        sink = pa.BufferOutputStream()
        write_parquet_to(sink, results)
        backend.put_object(bucket, "out/" + keys.shard_results_key("earlier", shard), sink.getvalue().to_pybytes())  # fmt: skip
        shards.append({"index": shard, "edits": len(ids), "sources": len(ids)})
    lost = n // 2
    store.delete(keys.asset_key(f"done-{lost:08d}", "png"))
    counter.take()
    t0 = time.perf_counter()
    todo = shards_to_rerun(RunOptions(out=out, s3_endpoint=endpoint), "earlier", {"shards": shards})
    seconds = time.perf_counter() - t0
    ops = counter.take()
    assert list(todo) == [lost // SHARD], todo
    return {"seconds": seconds, "requests": sum(ops.values()), "ops": ops, "shards": len(shards)}


def write_parquet_to(sink, table) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, sink, compression="zstd")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,100000", help="finished edits, comma-separated")
    parser.add_argument("--quick", action="store_true", help="N = 20k only")
    args = parser.parse_args(argv)
    sizes = [20_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    facts = machine_facts()
    print_machine(facts)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp, moto_s3(tmp) as endpoint:
        for n in sizes:
            r = measure(n, Path(tmp), endpoint)
            results.append(r)
            for case, label in (("new_rows", f"plan {NEW_ROWS:,} new edits"),
                                ("all_rows", f"plan the {n:,} finished + {NEW_ROWS:,} new"),
                                ("listing", "list assets/ (planning before the index)"),
                                ("rerun", "shards_to_rerun of the run, one image deleted")):  # fmt: skip
                if case not in r:
                    continue
                c = r[case]
                ops = ", ".join(f"{k} {v}" for k, v in sorted(c.get("ops", {}).items()))
                rows.append([f"{n:,}", label, c["requests"], f"{c['seconds']:.2f}", ops])
    print_table(["finished", "case", "S3 requests", "seconds", "requests by operation"], rows)
    last, listed = results[-1], [r for r in results if "listing" in r]
    per_run = last["new_rows"]["requests"]
    line = (f"\nAt 1M finished edits (extrapolated): planning {NEW_ROWS:,} new edits ~{per_run} requests "
            f"(as at N = {last['finished']:,}: constant in N, one listing of index/finished/ and one GET "
            f"per index part, plus the plan's own writes)")  # fmt: skip
    if listed:
        scale = 1_000_000 / listed[-1]["finished"]
        line += (f"; planning the whole catalogue again ~{round(listed[-1]['all_rows']['requests'] * scale):,} "
                 f"(the listing that verifies the finished images: 2 objects per edit, 1,000 per page); "
                 f"listing assets/ alone ~{round(listed[-1]['listing']['requests'] * scale):,}")  # fmt: skip
    print(line + ".")
    target_ok = per_run < TARGET_REQUESTS and last["new_rows"]["seconds"] < TARGET_S
    print(
        f"target (< {TARGET_REQUESTS} requests, < {TARGET_S:.0f} s, new edits): {'met' if target_ok else 'NOT met'}"
    )
    write_result("finished_index", {"results": results}, facts=facts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
