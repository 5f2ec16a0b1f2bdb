"""prepare_manifest: one load and one analysis, normalised from that analysis; prompt lengths in the
same pass; the problems a caller saw before (validate_table, then prompt_length_problems when the
manifest was otherwise valid); plan_run uses it; ManifestError crosses process boundaries."""

from __future__ import annotations

import pickle
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import manifests.normalise as normalise
import manifests.prepare as prepare
from editing.prompts import prompt_budget
from manifests import (
    ManifestError,
    Problem,
    normalize,
    prepare_manifest,
    prepare_table,
    prompt_length_problems,
    validate_table,
)
from refmodel import REFERENCE_MODEL_DIR

LONG = "a yellow triangle on a black background in a very very long watercolor style"
TABLE = pa.table(
    {
        "image_uri": ["a.png", "a.png", "b.png"],
        "source_prompt": ["a cat", "a cat", "a red circle"],
        "target_prompt": ["a dog", "a fox", "a red square"],
        "method": ["pnp", None, "p2p"],
        "settings": ['{"attn_t": 0.4}', None, '{"kind": "replace"}'],
        "sku": ["A", "B", "C"],
    }
)


@pytest.fixture(scope="module")
def budget():
    return prompt_budget(REFERENCE_MODEL_DIR)


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """Every load and analysis prepare_manifest makes (and any normalize() that analyses again)."""
    seen: list[str] = []

    def spy(module, name):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            seen.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    spy(prepare, "load_manifest")
    spy(prepare, "analyse")
    spy(normalise, "analyse")  # used by normalize(), which a single pass must not call
    return seen


def _write(folder: Path, table: pa.Table) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.slice(0, 2), folder / "part-0.parquet")
    pq.write_table(table.slice(2), folder / "part-1.parquet")
    return str(folder)


def test_one_load_one_analysis(tmp_path: Path, calls: list[str]) -> None:
    uri = _write(tmp_path / "m", TABLE)
    prepared = prepare_manifest(uri)
    assert calls == ["load_manifest", "analyse"]
    assert prepared.problems == []
    assert prepared.passthrough == ["sku"]
    assert prepared.files == [(f"{uri}/part-0.parquet", 2), (f"{uri}/part-1.parquet", 1)]
    assert prepared.table.num_rows == 3
    assert prepared.require_normalized() is prepared.normalized
    calls.clear()
    assert prepared.normalized.equals(normalize(prepared.table), check_metadata=True)
    with pytest.raises(AttributeError):
        prepared.problems = []  # type: ignore[misc]  # frozen


def test_problems_as_before(tmp_path: Path, calls: list[str]) -> None:
    bad = TABLE.set_column(3, "method", pa.array(["pnp", "nope", "p2p"]))
    uri = _write(tmp_path / "bad", bad)
    prepared = prepare_manifest(uri)
    assert calls == ["load_manifest", "analyse"]
    assert prepared.problems == validate_table(prepared.table) != []
    assert prepared.normalized is None
    with pytest.raises(ManifestError) as info:
        prepared.require_normalized()
    assert info.value.problems == prepared.problems

    missing = prepare_manifest(str(tmp_path / "nope"))
    assert missing.table is None and missing.normalized is None and missing.files == []
    assert [p.reason for p in missing.problems] == [
        f"no manifest file or folder at {tmp_path}/nope"
    ]


def test_prompt_lengths_in_the_same_pass(tmp_path: Path, calls: list[str], budget) -> None:
    long = TABLE.set_column(2, "target_prompt", pa.array(["a dog", LONG, "a red square"]))
    prepared = prepare_manifest(_write(tmp_path / "long", long), budget=budget)
    assert calls == ["load_manifest", "analyse"]
    assert prepared.problems == prompt_length_problems(long, budget)
    assert [(p.row, p.column) for p in prepared.problems] == [(1, "target_prompt")]
    assert prepared.normalized is None
    assert prepare_table(long).problems == []  # without a budget nothing is tokenised


def test_prompt_lengths_only_when_otherwise_valid(budget) -> None:
    """As the CLI combined them: prompt problems only for an otherwise valid manifest."""
    both = TABLE.set_column(2, "target_prompt", pa.array(["a dog", LONG, "a red square"]))
    both = both.set_column(3, "method", pa.array(["pnp", "pnp", "nope"]))
    assert prepare_table(both, budget=budget).problems == validate_table(both)
    fixed = both.set_column(3, "method", pa.array(["pnp", "pnp", "p2p"]))
    assert prepare_table(fixed, budget=budget).problems == prompt_length_problems(fixed, budget)
    assert [(p.row, p.column) for p in prepare_table(fixed, budget=budget).problems] == [
        (1, "target_prompt")
    ]


def test_check_only_skips_normalising(calls: list[str]) -> None:
    prepared = prepare_table(TABLE, normalize=False)
    assert prepared.problems == [] and prepared.normalized is None
    assert calls == ["analyse"]


def test_plan_run_checks_each_batch_once_and_reads_again_only_to_write(
    tmp_path: Path, monkeypatch
) -> None:
    from manifests import stream
    from tasks import planning
    from tasks.options import RunOptions
    from tasks.planning import plan_run

    seen: list[tuple[str, int]] = []
    for module, where in ((stream, "check"), (planning, "write")):
        real = module.analyse

        def counted(table, *args, _real=real, _where=where, **kwargs):
            seen.append((_where, table.num_rows))
            return _real(table, *args, **kwargs)

        monkeypatch.setattr(module, "analyse", counted)
    uri = _write(tmp_path / "m", TABLE)  # two parts: 2 rows and 1 row
    plan = plan_run(uri, RunOptions(out=str(tmp_path / "out")), run_id="r1")
    assert seen == [("check", 2), ("check", 1), ("write", 2), ("write", 1)]
    assert plan["rows"] == 3 and plan["passthrough"] == ["sku"]

    seen.clear()
    bad = _write(tmp_path / "bad", TABLE.set_column(3, "method", pa.array(["x", None, "p2p"])))
    with pytest.raises(ManifestError) as info:
        plan_run(bad, RunOptions(out=str(tmp_path / "out")), run_id="r2")
    assert seen == [("check", 2), ("check", 1)]  # nothing read again, nothing written
    assert [(p.row, p.column) for p in info.value.problems] == [(0, "method")]
    assert not (tmp_path / "out" / "runs" / "r2").exists()


def _raise_manifest_error() -> None:
    raise ManifestError([Problem(None, "seed", "must be an integer column"), Problem(3, None, "x")])


def test_manifest_error_pickles_with_its_problems() -> None:
    error = ManifestError([Problem(2, "seed", "bad"), Problem(None, None, "worse")])
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is ManifestError and again.problems == error.problems
    assert str(again) == str(error)
    with ProcessPoolExecutor(max_workers=1) as pool:  # as a Dask worker hands it back
        with pytest.raises(ManifestError) as info:
            pool.submit(_raise_manifest_error).result()
    assert info.value.problems[1] == Problem(3, None, "x")
