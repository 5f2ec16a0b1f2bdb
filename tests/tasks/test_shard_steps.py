"""The shard's pipeline steps (tasks.shard), each on real storage (a local folder and S3 via moto) with
the tiny model: load -> prepare sources -> prepare edits -> edit -> write -> results."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import editing.inversion as inversion_mod
import tasks.shard as shard_mod
from storage import keys, open_store
from storage.cache import BlobCache
from storage.writer import embedded_identity, read_json, write_parquet
from tasks.progress import ShardProgress
from tasks.results import results_table
from tasks.shard import (
    EditGroup,
    WriteJob,
    edit_sources,
    load_shard,
    prepare_edits,
    prepare_sources,
    read_source,
    run_shard,
    shard_results,
    store_features,
    write_jobs,
    write_outputs,
)
from tests.tasks.conftest import png_bytes, row


def cache_of(run) -> BlobCache:
    return BlobCache(open_store(run.options.cache_uri, s3_endpoint=run.options.s3_endpoint))


def counting(monkeypatch, name: str) -> list:
    """Count the calls ``tasks.shard`` makes to its function `name` (the real function still runs)."""
    calls = []
    real = getattr(shard_mod, name)

    def wrapped(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(shard_mod, name, wrapped)
    return calls


# ---------------------------------------------------------------- 1. load_shard


def test_load_shard_keeps_finished_results_and_redoes_failed_ones(make_run, root):
    run = make_run(root, [row("img:1"), row("img:1", target="a green circle"), row("img:2")])
    shard = run.shard()
    assert [r.row for r in shard.rows] == [0, 1, 2]
    assert shard.table.num_rows == 3
    assert shard.previous == {} and shard.kept() == {} and shard.todo() == shard.rows
    earlier = [
        {"edit_id": r.edit_id, "status": status}
        for r, status in zip(shard.rows, ("succeeded", "failed", "skipped"))
    ]
    key = keys.shard_results_key(run.run_id, 0)
    write_parquet(run.out, key, results_table(earlier, shard.table))
    again = load_shard(run.out, run.run_id, 0)
    assert set(again.previous) == {r.edit_id for r in shard.rows}
    assert set(again.kept()) == {shard.rows[0].edit_id, shard.rows[2].edit_id}
    assert again.kept()[shard.rows[0].edit_id]["status"] == "succeeded"
    assert [r.row for r in again.todo()] == [1]


# ---------------------------------------------------------------- 2. sources


def test_read_source_names_the_field_and_reason(model, make_run, root):
    run = make_run(root, [row("img:1"), row("missing:1"), row("junk:1")])
    good, missing, junk = run.shard().rows
    data, image = read_source(model, good, run.options)
    assert data == png_bytes(1)
    assert image.mode == "RGB" and image.size == (32, 32)
    with pytest.raises(
        shard_mod.RowError,
        match=r"^image_uri: (no object at s3://|no such file: /).*missing-1\.png",
    ):
        read_source(model, missing, run.options)
    with pytest.raises(
        shard_mod.RowError, match=r"^image_uri: .*junk-1\.png is not a readable image"
    ):
        read_source(model, junk, run.options)


def test_prepare_sources_inverts_once_per_source_then_reads_the_cache(
    model, make_run, root, monkeypatch
):
    rows = [
        row("img:1"),
        row("img:2"),
        row("img:1", target="a green circle"),
        row("img:1", num_steps=3),  # same image, other steps: its own inversion
    ]
    run = make_run(root, rows)
    todo, cache = run.shard().todo(), cache_of(run)
    facts_calls = counting(monkeypatch, "inversion_facts")
    engine_calls = []  # the engine's own calls (invert_many takes the shard's facts instead)
    real_facts = inversion_mod.inversion_facts
    monkeypatch.setattr(
        inversion_mod,
        "inversion_facts",
        lambda *a, **k: engine_calls.append(a) or real_facts(*a, **k),
    )
    cold = prepare_sources(model, todo, run.options, cache)
    assert [[r.row for r in s.rows] for s in cold.sources] == [[0, 2], [1], [3]]
    assert len(facts_calls) == 3 and engine_calls == []  # inversion facts: once per source in all
    assert [s.inversion.facts["num_steps"] for s in cold.sources] == [2, 2, 3]
    assert all(s.error is None and s.inversion is not None for s in cold.sources)
    assert (cold.inversions_computed, cold.cache_hits) == (3, 0)
    assert set(cold.seconds) == {"read", "inversion"}
    assert cold.sources[0].content_sha256 == keys.sha256_hex(png_bytes(1))
    for s in cold.sources:
        assert cache.exists(keys.inversion_object_key(s.inversion_key))
        assert not s.cache_hit
    assert cold.sources[2].inversion.num_steps == 3

    warm = prepare_sources(model, todo, run.options, cache)
    assert (warm.inversions_computed, warm.cache_hits) == (0, 3)
    for c, w in zip(cold.sources, warm.sources):
        assert w.cache_hit and w.inversion_key == c.inversion_key
        assert torch.equal(w.inversion.latents, c.inversion.latents)
        assert torch.equal(w.inversion.corrections, c.inversion.corrections)


def test_prepare_sources_fails_bad_sources_alone_and_replaces_a_corrupt_entry(
    model, make_run, root
):
    run = make_run(root, [row("img:1"), row("missing:2"), row("junk:3"), row("img:4")])
    todo, cache = run.shard().todo(), cache_of(run)
    first = prepare_sources(model, todo, run.options, cache)
    ok1, missing, junk, ok4 = first.sources
    assert missing.error.startswith(("image_uri: no object at s3://", "image_uri: no such file: /"))
    assert missing.inversion is None
    assert "is not a readable image" in junk.error
    assert ok1.error is None and ok4.error is None
    assert first.inversions_computed == 2
    # a corrupt entry (no checksum) counts as absent, is recomputed and replaced
    store = open_store(run.options.cache_uri, s3_endpoint=run.options.s3_endpoint)
    store.put(keys.inversion_object_key(ok1.inversion_key), b"garbage")
    second = prepare_sources(model, todo, run.options, cache)
    assert (second.inversions_computed, second.cache_hits) == (1, 1)
    assert not second.sources[0].cache_hit and second.sources[3].cache_hit
    third = prepare_sources(model, todo, run.options, cache)
    assert (third.inversions_computed, third.cache_hits) == (0, 2)


# ---------------------------------------------------------------- 3. edits


def test_prepare_edits_checks_rows_and_fails_a_bad_sources_rows(model, make_run, root):
    rows = [row("img:1"), row("img:1", target="a green square"), row("missing:2"), row("img:3")]
    run = make_run(root, rows)
    shard = run.shard()
    too_long = dataclasses.replace(shard.rows[1], target_prompt="circle " * 200)
    todo = [shard.rows[0], too_long, shard.rows[2], shard.rows[3]]
    sources = prepare_sources(model, todo, run.options, cache_of(run)).sources
    edits = prepare_edits(model, sources, run.options, cache_of(run))
    assert set(edits.failed) == {too_long.edit_id, shard.rows[2].edit_id}
    bad = edits.failed[too_long.edit_id]
    assert bad["status"] == "failed" and bad["error"].startswith("row 1: target_prompt/settings: ")
    assert edits.failed[shard.rows[2].edit_id]["error"].startswith(
        ("row 2: image_uri: no object at s3://", "row 2: image_uri: no such file: /")
    )
    assert [[r.row for r in g.rows] for g in edits.groups] == [[0], [3]]
    for g in edits.groups:
        assert isinstance(g, EditGroup)
        assert [t.edit_id for t in g.group.targets] == [r.edit_id for r in g.rows]
        assert [t.prompt for t in g.group.targets] == [r.target_prompt for r in g.rows]
        assert g.group.inversion is g.source.inversion
        assert g.features_key == "" and g.group.features is None  # cache_features is off


def test_pnp_features_are_keyed_once_per_source_stored_then_attached(
    model, make_run, root, monkeypatch
):
    rows = [row("img:1"), row("img:1", target="a green circle"), row("img:2", method="p2p")]
    run = make_run(root, rows, cache_features=True)
    todo, cache = run.shard().todo(), cache_of(run)
    sources = prepare_sources(model, todo, run.options, cache).sources
    facts_calls = counting(monkeypatch, "pnp_feature_facts")
    cold = prepare_edits(model, sources, run.options, cache)
    pnp, p2p = cold.groups
    assert len(facts_calls) == 1  # once for the PnP source; the P2P-only source has none to share
    assert pnp.features_key.startswith("features/") and pnp.group.features is None
    assert p2p.features_key == ""
    edited = edit_sources(model, [g.group for g in cold.groups], run.options)
    assert store_features(cache, cold.groups, edited) == 1
    assert cache.exists(pnp.features_key)
    warm = prepare_edits(model, sources, run.options, cache)
    assert len(facts_calls) == 2
    assert warm.groups[0].group.features is not None
    assert store_features(cache, warm.groups, edited) == 0  # nothing new to store
    replayed = edit_sources(model, [g.group for g in warm.groups], run.options)
    assert all(not isinstance(r, Exception) for res in replayed for r in res)
    assert replayed[0][0].unet_evals["source"] == 0  # the cached features replace the source row


# ---------------------------------------------------------------- 4. editing


def test_edit_sources_reports_each_chunk_and_fails_a_broken_source_alone(
    model, make_run, local_root_uri
):
    rows = [
        row("img:1"),
        row("img:1", target="a green circle"),
        row("img:1", target="a red square"),
    ]
    rows += [row("img:2", target="a blue square")]
    run = make_run(local_root_uri, rows, max_batch=2)
    sources = prepare_sources(model, run.shard().todo(), run.options, cache_of(run)).sources
    groups = [g.group for g in prepare_edits(model, sources, run.options, cache_of(run)).groups]
    events = []
    progress = ShardProgress(run.run_id, 0, 4, sink=events.append)
    edited = edit_sources(model, groups, run.options, progress)
    assert [len(r) for r in edited] == [3, 1]
    for g, res in zip(groups, edited):
        assert [r.edit_id for r in res] == [t.edit_id for t in g.targets]
    assert [e["done"] for e in events] == [2, 4]  # the engine's chunks of at most max_batch targets
    # a source whose inversion is unusable fails its own edits; the other source's edits succeed
    inv = groups[1].inversion
    broken = dataclasses.replace(
        groups[1], inversion=dataclasses.replace(inv, cond=inv.cond[:, :3])
    )
    edited = edit_sources(model, [groups[0], broken], run.options)
    assert all(not isinstance(r, Exception) for r in edited[0])
    assert all(isinstance(r, Exception) for r in edited[1])


# ---------------------------------------------------------------- 5. writing and 6. results


def test_write_jobs_and_outputs_then_nothing_is_rewritten(model, make_run, root):
    rows = [
        row("img:1", sku="A"),
        row("img:1", target="a green circle", sku="B"),
        row("img:2", sku="C"),
    ]
    run = make_run(root, rows)
    shard = run.shard()
    sources = prepare_sources(model, shard.todo(), run.options, cache_of(run)).sources
    edits = prepare_edits(model, sources, run.options, cache_of(run))
    edited = edit_sources(model, [g.group for g in edits.groups], run.options)
    edited[0][1] = RuntimeError("boom")  # an edit that failed in the engine
    jobs, failed = write_jobs(model, run.run_id, edits.groups, edited)
    second = shard.rows[1]
    assert list(failed) == [second.edit_id]
    assert failed[second.edit_id]["error"] == "row 1: edit failed: RuntimeError: boom"
    assert [j.row.row for j in jobs] == [0, 2] and all(isinstance(j, WriteJob) for j in jobs)
    first = jobs[0]
    inv = edits.groups[0].source.inversion
    res = edited[0][0]
    assert not first.cache_hit
    assert (
        first.unet_evals == inv.unet_evals / 2 + res.unet_evals["source"] + res.unet_evals["target"]
    )
    assert first.metadata["edit_id"] == first.row.edit_id
    assert first.metadata["unet_evals"] == first.unet_evals
    assert first.metadata["passthrough"] == {"sku": "A"}
    assert first.metadata["inversion_key"] == edits.groups[0].source.inversion_key

    written = write_outputs(run.out, "png", jobs)
    assert set(written) == {j.row.edit_id for j in jobs}
    for job in jobs:
        result = written[job.row.edit_id]
        assert result["status"] == "succeeded" and result["error"] is None
        akey, skey = keys.asset_key(job.row.edit_id, "png"), keys.sidecar_key(job.row.edit_id)
        assert result["output_uri"] == run.out.uri(akey)
        assert result["metadata_uri"] == run.out.uri(skey)
        sidecar = read_json(run.out, skey)
        assert sidecar["edit_id"] == job.row.edit_id
        assert sidecar["output_sha256"] == keys.sha256_hex(run.out.get(akey))
        embedded = json.loads(embedded_identity(run.out.get(akey)))
        assert embedded["edit_id"] == job.row.edit_id and set(embedded) == set(shard_mod.EMBEDDED)
    again = write_outputs(run.out, "png", jobs)
    assert {r["status"] for r in again.values()} == {"skipped"}
    assert {r["reason"] for r in again.values()} == {"finished earlier or by another worker"}
    assert {r["error"] for r in again.values()} == {None}

    results = {**written, **failed}
    table = shard_results(shard, results)
    assert table.column("edit_id").to_pylist() == [r.edit_id for r in shard.rows]
    assert table.column("status").to_pylist() == ["succeeded", "failed", "succeeded"]
    assert table.column("sku").to_pylist() == ["A", "B", "C"]


def test_run_shard_writes_results_and_a_rerun_keeps_them(make_run, root):
    rows = [row("img:1"), row("img:1", target="a green circle"), row("missing:2")]
    run = make_run(root, rows)
    stats = run_shard(run.options, run.run_id, 0)
    assert (stats["edits"], stats["succeeded"], stats["failed"], stats["skipped"]) == (3, 2, 1, 0)
    assert (stats["inversions_computed"], stats["inversion_cache_hits"]) == (1, 0)
    assert set(stats["seconds"]) == {"read", "inversion", "edit", "qa", "write", "total"}
    assert stats["unet_evals"] > 0 and stats["threads"] >= 1
    first = shard_mod.read_run_results(run.options, run.run_id)
    assert first.column("status").to_pylist() == ["succeeded", "succeeded", "failed"]
    again = run_shard(
        run.options, run.run_id, 0
    )  # only the failed row is retried (and fails again)
    assert (again["succeeded"], again["failed"], again["inversions_computed"]) == (2, 1, 0)
    second = shard_mod.read_run_results(run.options, run.run_id)
    assert second.drop_columns(["seconds"]).equals(first.drop_columns(["seconds"]))
