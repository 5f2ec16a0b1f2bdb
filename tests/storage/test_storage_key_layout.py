"""The key layout helpers of storage.keys: prefixes, the keys parsed back from listings, run files."""

from __future__ import annotations

import pytest

from storage import keys
from tasks.planning import finished_assets

EDIT = "0123abcd" * 4


def test_assets_prefix_holds_every_asset_and_sidecar_key():
    prefix = keys.assets_prefix()
    assert prefix == "assets/"
    for fmt in keys.IMAGE_FORMATS:
        assert keys.asset_key(EDIT, fmt) == f"{prefix}{EDIT}.{fmt}"
    assert keys.sidecar_key(EDIT) == f"{prefix}{EDIT}.json"


def test_edit_ids_are_parsed_back_from_asset_and_sidecar_keys():
    assert keys.edit_id_of_sidecar(keys.sidecar_key(EDIT)) == EDIT
    for fmt in keys.IMAGE_FORMATS:
        assert keys.edit_id_of_image(keys.asset_key(EDIT, fmt)) == EDIT
        assert keys.edit_id_of_sidecar(keys.asset_key(EDIT, fmt)) is None
    assert keys.edit_id_of_image(f"assets/{EDIT}.jpg") == EDIT  # JPEG's other extension
    assert keys.edit_id_of_image("assets/a.b.png") == "a.b"  # dots inside the id are kept
    for other in (f"assets/{EDIT}.txt", f"assets/{EDIT}", f"runs/{EDIT}.png", f"{EDIT}.json"):
        assert keys.edit_id_of_image(other) is None
    assert keys.edit_id_of_sidecar(f"runs/r/{EDIT}.json") is None
    assert keys.edit_id_of_image(keys.sidecar_key(EDIT)) is None


def test_image_formats_are_one_list_shared_by_the_writer_and_the_options():
    from storage import writer
    from tasks import options

    assert keys.IMAGE_FORMATS == ("png", "jpeg", "webp")
    assert writer.IMAGE_FORMATS is keys.IMAGE_FORMATS
    assert options.IMAGE_FORMATS is keys.IMAGE_FORMATS
    assert set(keys.IMAGE_EXTENSIONS) == {*keys.IMAGE_FORMATS, "jpg"}


def test_run_results_files():
    prefix = keys.run_results_prefix("r1")
    assert prefix == "runs/r1/results/"
    assert keys.shard_results_key("r1", 3) == prefix + "shard-00003.parquet"
    assert keys.skipped_results_key("r1") == prefix + "skipped.parquet"
    assert keys.is_results_file("r1", keys.shard_results_key("r1", 0))
    assert keys.is_results_file("r1", keys.skipped_results_key("r1"))
    assert not keys.is_results_file("r1", prefix + "notes.txt")
    assert not keys.is_results_file("r1", keys.shard_results_key("r2", 0))
    assert not keys.is_results_file("r1", keys.shard_plan_key("r1", 0))
    assert keys.is_shard_results_file(keys.shard_results_key("r1", 7))
    assert not keys.is_shard_results_file(keys.skipped_results_key("r1"))
    assert keys.shard_plan_key_of_results(keys.shard_results_key("r1", 7)) == keys.shard_plan_key(
        "r1", 7
    )
    assert keys.shard_plan_key_of_results("out/runs/r1/results/shard-00002.parquet") == (
        "out/runs/r1/shards/shard-00002.parquet"
    )
    with pytest.raises(ValueError, match="not a shard results key"):
        keys.shard_plan_key_of_results(keys.skipped_results_key("r1"))
    with pytest.raises(ValueError, match="run_id"):
        keys.run_results_prefix("../x")


def test_run_report_and_manifest_keys():
    assert keys.report_key("r1") == "runs/r1/report.html"
    assert keys.contact_sheet_key("r1") == "runs/r1/contact_sheet.png"
    assert keys.failures_key("r1") == "runs/r1/failures.csv"
    assert keys.report_info_key("r1") == "runs/r1/report.json"
    assert keys.run_manifest_key("r1") == "runs/r1/manifest.parquet"
    assert keys.report_key("r1").endswith("/" + keys.REPORT_NAME)


def test_finished_assets_of_an_old_root_are_the_edits_with_image_and_sidecar(store):
    done, unfinished, no_image = "a" * 32, "b" * 32, "c" * 32
    store.put(keys.asset_key(done, "webp"), b"img")
    store.put(keys.sidecar_key(done), b"{}")
    store.put(keys.asset_key(unfinished, "png"), b"img")  # no sidecar: not finished
    store.put(keys.sidecar_key(no_image), b"{}")
    store.put(f"assets/{no_image}.txt", b"not an image")
    store.put(keys.plan_key("r1"), b"{}")
    done_index = finished_assets(store)  # no index yet: one listing
    assert len(done_index) == 1 and done in done_index and no_image not in done_index
    assert done_index.image_key(done, int(done_index.lookup([done])[0])) == keys.asset_key(
        done, "webp"
    )


def test_run_refs_split_into_root_and_run_id():
    assert keys.split_run_ref("out/demo/runs/r1") == ("out/demo", "r1")
    assert keys.split_run_ref("s3://b/p/runs/r1/") == ("s3://b/p", "r1")
    assert keys.split_run_ref("runs/r1") == (None, "r1")  # relative to the output root
    assert keys.split_run_ref(keys.run_prefix("r1")) == (None, "r1")
    for other in ("r1", "out/runs/r1/results", "out/runs/", "runsx/r1"):
        assert keys.split_run_ref(other) is None, other
