"""Planning in bounded memory: the manifest streamed in batches gives the plan the whole table gave;
checks across rows span batches; a huge bad manifest gives its first problems and a count per kind;
a folder with one bad part names it and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests import ManifestError, format_problems, validate_table
from manifests import stream as stream_module
from manifests.stream import ManifestScan, open_manifest, scan_manifest
from storage import keys
from storage.base import NotFound
from storage.finished import record_finished
from storage.local import LocalStore
from storage.writer import write_parquet
from tasks import planning
from tasks.options import RunOptions
from tasks.planning import auto_shard_size, plan_run, read_shard_plan
from tasks.report import _read_plan_rows


def _manifest(n: int = 200, seed: int = 0) -> pa.Table:
    """Sources scattered over the manifest (a group's rows are not adjacent), some ids given."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, n // 4, n)
    return pa.table(
        {
            "image_uri": [f"s3://b/img-{i}.png" for i in image],
            "source_prompt": [f"a photo of item {i}" for i in image],
            "target_prompt": [f"a photo of item {i}, style {j}" for j, i in enumerate(image)],
            "num_steps": pa.array(rng.choice([20, 50], n)),
            "edit_id": [f"id-{j}" if j % 3 == 0 else None for j in range(n)],
            "sku": pa.array(rng.integers(0, 10**6, n), pa.int32()),
        }
    )


def _folder(tmp_path: Path, table: pa.Table, cuts: list[int]) -> str:
    folder = tmp_path / "manifest"
    folder.mkdir(parents=True)
    bounds = [0, *cuts, table.num_rows]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        pq.write_table(table.slice(a, b - a), folder / f"part-{i}.parquet")
    return str(folder)


def _shards(out: Path, plan: dict) -> list[pa.Table]:
    return [read_shard_plan(LocalStore(out), plan["run_id"], s["index"]) for s in plan["shards"]]


def test_batches_give_the_plan_one_batch_gives(tmp_path: Path) -> None:
    table = _manifest()
    uri = _folder(tmp_path, table, cuts=[70, 71])
    groups = set(zip(*(table.column(c).to_pylist() for c in ("image_uri", "source_prompt", "num_steps"))))  # fmt: skip
    plans = {}
    for batch_rows in (7, 10_000):
        out = tmp_path / f"out-{batch_rows}"
        plan = plan_run(uri, RunOptions(out=str(out)), run_id="r", shard_size=9, batch_rows=batch_rows)  # fmt: skip
        plans[batch_rows] = (plan, _shards(out, plan))
    (small, small_shards), (one, one_shards) = plans[7], plans[10_000]
    assert small["shards"] == one["shards"] and small["sources"] == one["sources"] == len(groups)
    for a, b in zip(small_shards, one_shards, strict=True):
        assert a.equals(b, check_metadata=True)
    rows = pa.concat_tables(small_shards).column("row").to_pylist()
    assert sorted(rows) == list(range(200))
    # every source's rows in consecutive shards, rows within a shard in manifest order
    for shard in small_shards:
        assert shard.column("row").to_pylist() == sorted(shard.column("row").to_pylist())


def test_finished_edits_are_skipped_across_batches(tmp_path: Path) -> None:
    uri = _folder(tmp_path, _manifest(), cuts=[100])
    out = tmp_path / "out"
    first = plan_run(uri, RunOptions(out=str(out)), run_id="r1", shard_size=8, batch_rows=16)
    ids = pa.concat_tables(_shards(out, first)).column("edit_id").to_pylist()
    for e in ids[::5]:  # as if these edits had finished: image and sidecar
        (out / keys.asset_key(e, "png")).parent.mkdir(parents=True, exist_ok=True)
        (out / keys.asset_key(e, "png")).write_bytes(b"png")
        (out / keys.sidecar_key(e)).write_text("{}")
    # and as their shard records them in the finished-edit index (planning reads it, not assets/)
    done = ids[::5]
    record_finished(LocalStore(out), "r1", 0, pa.table({
        "edit_id": done, "status": ["succeeded"] * len(done),
        "output_uri": [str(out / keys.asset_key(e, "png")) for e in done],
    }))  # fmt: skip
    again = plan_run(uri, RunOptions(out=str(out)), run_id="r2", shard_size=8, batch_rows=16)
    assert again["skipped"] == 40 and again["pending"] == 160
    pending = pa.concat_tables(_shards(out, again)).column("edit_id").to_pylist()
    assert set(pending) == set(ids) - set(ids[::5])
    skipped = pq.read_table(out / keys.skipped_results_key("r2"))
    assert sorted(skipped.column("edit_id").to_pylist()) == sorted(ids[::5])


def test_duplicates_are_found_across_batches_as_validate_table_finds_them(tmp_path: Path) -> None:
    table = _manifest(60)
    dup_given = table.column("edit_id").to_pylist()
    dup_given[57] = "id-3"  # a given id again, far from the first
    table = table.set_column(4, "edit_id", pa.array(dup_given))
    table = pa.concat_tables([table, table.slice(10, 1)])  # row 10 (derived id) again, as row 60
    uri = _folder(tmp_path, table, cuts=[30])
    scan = scan_manifest(uri)
    key = lambda p: (p.row, p.column, p.reason)  # noqa: E731
    assert sorted(map(key, scan.problems)) == sorted(map(key, validate_table(table)))
    assert {(p.row, p.column) for p in scan.problems} == {
        (3, "edit_id"), (57, "edit_id"), (10, "edit_id"), (60, "edit_id")
    }  # fmt: skip


def test_hash_collisions_are_not_reported_as_duplicates(tmp_path: Path, monkeypatch) -> None:
    # every row hashes alike: all are candidates, and the exact comparison clears them
    monkeypatch.setattr(stream_module, "mix_hashes", lambda *parts: np.zeros(len(parts[0]), np.uint64))  # fmt: skip
    monkeypatch.setattr(stream_module, "hash_strings", lambda arr: np.zeros(len(arr), np.uint64))  # fmt: skip
    uri = _folder(tmp_path, _manifest(50), cuts=[20])
    assert scan_manifest(uri).problems == []


def test_a_huge_bad_manifest_gives_its_first_problems_and_a_count_per_kind(tmp_path: Path) -> None:
    n = 5000
    table = pa.table(
        {
            "image_uri": ["a.png"] * n,
            "source_prompt": ["a cat"] * n,
            "target_prompt": [f"a dog {i}" for i in range(n)],
            "method": ["magic" if i % 2 else "pnp" for i in range(n)],
            "num_steps": [0 if i % 5 == 0 else 10 for i in range(n)],
        }
    )
    uri = _folder(tmp_path, table, cuts=[1234])
    source = open_manifest(uri)
    scan = ManifestScan(source, limit=20, batch_rows=512)
    for _ in scan.batches():
        pass
    scan.finish()
    assert scan.total == 2500 + 1000 and dict(scan.counts) == {"method": 2500, "num_steps": 1000}
    assert len(scan.problems) == 20
    error = scan.error()
    assert [p.row for p in error.problems] == sorted(p.row for p in error.problems)
    text = format_problems(error.problems, limit=10, total=error.total, counts=error.counts)
    assert text.startswith("3500 problem(s)")
    assert text.splitlines()[-1].startswith("  ... and 3490 more (method: ")
    with pytest.raises(ManifestError) as info:
        plan_run(uri, RunOptions(out=str(tmp_path / "out")), run_id="r", batch_rows=512)
    assert info.value.total == 3500 and len(info.value.problems) == 1000
    assert not (tmp_path / "out" / "runs" / "r").exists()


@pytest.mark.parametrize("damage", ["unreadable", "other columns", "other type"])
def test_a_folder_with_one_bad_part_names_it_and_runs_nothing(tmp_path: Path, damage: str) -> None:
    table = _manifest(40)
    uri = _folder(tmp_path, table, cuts=[10, 20])
    bad = Path(uri) / "part-1.parquet"
    if damage == "unreadable":
        bad.write_bytes(b"PAR1 not really parquet PAR1")
    elif damage == "other columns":
        pq.write_table(table.slice(10, 10).drop_columns(["sku"]), bad)
    else:
        pq.write_table(table.slice(10, 10).set_column(5, "sku", pa.array(["x"] * 10)), bad)
    out = tmp_path / "out"
    with pytest.raises(ManifestError) as info:
        plan_run(uri, RunOptions(out=str(out)), run_id="r")
    assert "part-1.parquet" in str(info.value)
    assert "part-0.parquet" not in str(info.value).replace(f"{uri}/part-0.parquet has", "")
    assert not (out / "runs").exists()
    scan = scan_manifest(uri)
    assert scan.total >= 1 and "part-1.parquet" in scan.report()


def test_validate_cli_counts_every_problem_and_lists_the_first(tmp_path: Path, capsys) -> None:
    from flows.cli import main

    n = 3000
    table = pa.table(
        {
            "image_uri": ["a.png"] * n,
            "source_prompt": ["a cat"] * n,
            "target_prompt": [f"a dog {i}" for i in range(n)],
            "method": ["magic"] * n,
        }
    )
    uri = _folder(tmp_path, table, cuts=[1000])
    assert main(["validate", uri, "--no-check-sources"]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("3000 problem(s) in the manifest")
    assert out[1] == "  row 0, column 'method': unknown method 'magic'; known: pnp, p2p"
    assert out[-2] == "  ... and 2000 more (method: 2000)"
    assert out[-1].startswith(f"{uri}: INVALID (3000 problem(s)); prompt lengths checked against")
    short = {"source_prompt": ["a red circle"] * 30, "target_prompt": [f"a blue circle {i}" for i in range(30)]}  # fmt: skip
    good_table = pa.table({"image_uri": [f"img-{i}.png" for i in range(30)], **short})
    good = _folder(tmp_path / "good", good_table, cuts=[10])
    assert main(["validate", good, "--no-check-sources"]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{good}: valid (30 rows);")


def test_shard_plans_are_written_a_part_per_64_shards_and_each_shard_reads_its_own_rows(
    tmp_path: Path,
) -> None:
    uri = _folder(tmp_path, _manifest(), cuts=[100])
    out = tmp_path / "out"
    plan = plan_run(uri, RunOptions(out=str(out)), run_id="r", shard_size=1, batch_rows=16)
    n_shards = len(plan["shards"])
    assert n_shards == 200 and keys.SHARDS_PER_PLAN_PART == 64  # four parts, the last one short
    written = sorted(p.name for p in (out / "runs" / "r" / "shards").iterdir())
    assert written == [f"part-{i:05d}.parquet" for i in (0, 64, 128, 192)]
    shards = _shards(out, plan)
    assert [t.num_rows for t in shards] == [s["edits"] for s in plan["shards"]]
    assert sorted(pa.concat_tables(shards).column("row").to_pylist()) == list(range(200))
    for table in shards:  # in manifest order
        rows = table.column("row").to_pylist()
        assert rows == sorted(rows)
        assert b"editflow.shard_rows" not in table.schema.metadata
    # the report finds a shard's prompts and settings in its part
    shown = _read_plan_rows(LocalStore(out), keys.shard_plan_key("r", 70))
    assert list(shown) == shards[70].column("edit_id").to_pylist()
    assert next(iter(shown.values()))["source_prompt"] == shards[70]["source_prompt"][0].as_py()
    # a shard beyond the plan is not there; a run planned with a file per shard still reads
    with pytest.raises(NotFound):
        read_shard_plan(LocalStore(out), "r", n_shards)
    write_parquet(LocalStore(out), keys.shard_plan_key("old", 3), shards[5])
    assert read_shard_plan(LocalStore(out), "old", 3).equals(shards[5])


@pytest.mark.parametrize(
    ("rows", "size"),
    [(0, 64), (1000, 64), (640_000, 64), (640_001, 65), (1_000_001, 101), (10_000_000, 1000)],
)
def test_the_automatic_shard_size_keeps_a_run_to_about_10k_shards(rows: int, size: int) -> None:
    assert auto_shard_size(rows) == size


def test_a_plan_without_a_shard_size_picks_one_for_the_manifest_and_records_it(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(planning, "MIN_AUTO_SHARD_SIZE", 2)
    monkeypatch.setattr(planning, "MAX_AUTO_SHARDS", 10)  # 200 rows: 20 per shard
    uri = _folder(tmp_path, _manifest(), cuts=[100])
    auto = plan_run(uri, RunOptions(out=str(tmp_path / "a")), run_id="r", batch_rows=64)
    assert auto["shard_size"] == 20 and auto["options"]["shard_size"] is None
    assert 10 <= len(auto["shards"]) <= 12 and max(s["edits"] for s in auto["shards"]) == 20
    on_disk = json.loads((tmp_path / "a" / keys.plan_key("r")).read_text())
    assert on_disk["shard_size"] == 20
    # the user's size wins, in the options or given to plan_run
    given = plan_run(uri, RunOptions(out=str(tmp_path / "b"), shard_size=5), run_id="r")
    assert given["shard_size"] == 5 and max(s["edits"] for s in given["shards"]) == 5
    assert plan_run(uri, RunOptions(out=str(tmp_path / "c")), run_id="r", shard_size=7)["shard_size"] == 7  # fmt: skip
    with pytest.raises(ValueError, match="shard_size"):
        RunOptions(out=str(tmp_path), shard_size=0)


def test_the_cli_leaves_the_shard_size_to_planning_unless_given() -> None:
    from flows.cli import _run_options, build_parser

    def parse(*extra: str) -> RunOptions:
        return _run_options(build_parser().parse_args(["run", "m.parquet", "--out", "o", *extra]))

    assert parse().shard_size is None
    assert parse("--shard-size", "7").shard_size == 7
