"""Hostile command lines: every bad argument, unusable location or damaged run is one line on stderr
with its exit status (2 input, 3 storage), no traceback, no flow started and nothing created; a run
whose storage fills up exits 3; the program never aborts at exit."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flows.cli import main
from tasks.options import RunOptions

from .helpers import REPO, cli_env, one_row, scene_files, write_rows
from .test_faults import full_disk  # noqa: F401 - the fixture (a 96 KiB tmpfs; skipped unless root)

RUN = "r1"


def _plan(out: Path, **options) -> dict:
    """A plan.json as planning writes it (one shard of one edit), with `options` changed."""
    return {
        "run_id": RUN, "manifest": "m.parquet", "created": "2026-12-03T00:00:00+00:00",
        "options": RunOptions(out=str(out)).to_dict() | options,
        "rows": 1, "pending": 1, "skipped": 0, "sources": 1, "shard_size": 64, "passthrough": [],
        "shards": [{"index": 0, "edits": 1, "sources": 1}],
    }  # fmt: skip


def _damaged_run(root: Path, plan) -> str:
    """An output root holding run RUN whose plan.json is `plan` (text as is, else as JSON)."""
    folder = root / "runs" / RUN
    folder.mkdir(parents=True)
    text = plan if isinstance(plan, str) else json.dumps(plan)
    (folder / "plan.json").write_text(text)
    return str(root)


@pytest.fixture
def world(tmp_path, flow_model, s3_server):
    """What the cases name: {m} a good manifest, {model}, {new} an absent --out, {file} an existing
    file, {s3} the moto endpoint, {not_json} / {format} / {shard} output roots of damaged runs,
    {catalog} a restyle catalog, {deep} settings nested 100,000 levels."""
    [img] = scene_files(tmp_path / "img", 1)
    (tmp_path / "a-file").write_text("not a folder")
    catalog = tmp_path / "catalog.csv"
    catalog.write_text(f"image_uri,caption\n{img},a red circle\n")
    return {
        "m": write_rows(tmp_path / "m.parquet", [one_row(img)]),
        "model": flow_model,
        "new": str(tmp_path / "new-out"),
        "file": str(tmp_path / "a-file"),
        "s3": s3_server,
        "not_json": _damaged_run(tmp_path / "not-json", '{"run_id": "r1", "shards": ['),
        "format": _damaged_run(
            tmp_path / "format", _plan(tmp_path / "format", image_format="../x")
        ),
        "shard": _damaged_run(tmp_path / "shard", _plan(tmp_path / "shard") | {"shards": [{"index": -1, "edits": 1}]}),
        "catalog": str(catalog),
        "deep": "[" * 100_000 + "]" * 100_000,
        "tmp": tmp_path,
    }  # fmt: skip


@pytest.fixture
def no_flow(monkeypatch):
    """The flows, replaced by a trap: a case that reaches one started work it should have refused."""
    import flows.bulk_edit

    class Trap:
        def with_options(self, **_):
            raise AssertionError("a flow was started")

    for name in ("bulk_edit", "rerun", "restyle"):
        monkeypatch.setattr(flows.bulk_edit, name, Trap())


RUN_ARGS = ["run", "{m}", "--model", "{model}"]
# case -> (argv, exit status, text the line must hold); each printed a traceback, exited 1 or
# started the run on the code before issue 19
CASES = {
    "out empty": ([*RUN_ARGS, "--out", ""], 2, "--out"),
    "out bad bucket": ([*RUN_ARGS, "--out", "s3://Bad_Bucket!/x", "--s3-endpoint", "{s3}"], 2, "Bad_Bucket!"),
    "out under /proc": ([*RUN_ARGS, "--out", "/proc/editflow-x"], 3, "/proc/editflow-x"),
    "out is a file": ([*RUN_ARGS, "--out", "{file}"], 2, "not a folder"),
    "endpoint not a url": ([*RUN_ARGS, "--out", "{new}", "--s3-endpoint", "not a url"], 2, "--s3-endpoint"),
    "endpoint ftp": ([*RUN_ARGS, "--out", "{new}", "--s3-endpoint", "ftp://h:21"], 2, "--s3-endpoint"),
    "endpoint userinfo": ([*RUN_ARGS, "--out", "{new}", "--s3-endpoint", "http://u:hunter2@127.0.0.1:9"], 2, "AWS_ACCESS_KEY_ID"),
    "endpoint query": ([*RUN_ARGS, "--out", "{new}", "--s3-endpoint", "http://127.0.0.1:9/?X-Amz-Credential=hunter2"], 2, "AWS_ACCESS_KEY_ID"),
    "dask-workers 0": ([*RUN_ARGS, "--out", "{new}", "--runner", "dask", "--dask-workers", "0"], 2, "--dask-workers"),
    "device foo": ([*RUN_ARGS, "--out", "{new}", "--device", "foo"], 2, "--device"),
    "device cuda": ([*RUN_ARGS, "--out", "{new}", "--device", "cuda"], 2, "--device cuda"),
    "device cuda:99": ([*RUN_ARGS, "--out", "{new}", "--device", "cuda:99"], 2, "--device cuda:99"),
    "cache under /proc": ([*RUN_ARGS, "--out", "{new}", "--cache", "/proc/editflow-c"], 3, "--cache"),
    "cache missing bucket": ([*RUN_ARGS, "--out", "{new}", "--cache", "s3://no-such-bucket-19/c", "--s3-endpoint", "{s3}"], 3, "no-such-bucket-19"),
    "validate model missing": (["validate", "{m}", "--model", "/no/such/model"], 2, "--model /no/such/model"),
    "validate missing bucket": (["validate", "s3://no-such-bucket-19/m.parquet", "--s3-endpoint", "{s3}"], 3, "no-such-bucket-19"),
    "show plan not json": (["show", RUN, "--out", "{not_json}"], 2, "plan.json"),
    "show plan format ../x": (["show", RUN, "--out", "{format}"], 2, "image_format"),
    "show plan shard -1": (["show", RUN, "--out", "{shard}"], 2, "shards[0].index"),
    "show limit -1": (["show", RUN, "--out", "{format}", "--limit", "-1"], 2, "--limit"),
    "rerun plan not json": (["rerun", RUN, "--out", "{not_json}", "--model", "{model}"], 2, "plan.json"),
    "rerun plan format ../x": (["rerun", RUN, "--out", "{format}", "--model", "{model}"], 2, "image_format"),
    "rerun plan shard -1": (["rerun", RUN, "--out", "{shard}", "--model", "{model}"], 2, "shards[0].index"),
    "restyle settings 100k deep": (["restyle", "{catalog}", "--style", "x", "--settings", "{deep}", "--out", "{new}", "--model", "{model}"], 2, "nested too deeply"),
}  # fmt: skip


def _call(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's errors: one line, status 2
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_command_line_is_one_line(case, world, no_flow, capsys):
    argv, status, expect = CASES[case]
    if case == "device cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    argv = [a.format(**world) for a in argv]
    code, out, err = _call(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == status, (code, out, err[-2000:])
    assert len(lines) == 1 and not out.strip(), (out, err[-2000:])
    assert "Traceback" not in err and expect in err, err[-2000:]
    assert "hunter2" not in err  # credentials never repeated
    if case == "validate missing bucket":
        assert "--out" not in err  # validate has no --out to fix
    assert not Path(world["new"]).exists()  # nothing created before the checks passed


@pytest.mark.security
def test_env_endpoint_with_credentials_is_refused(world, no_flow, capsys, monkeypatch, aws_env):
    from storage.s3 import clear_client_cache

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://u:hunter2@127.0.0.1:9")
    clear_client_cache()
    code, out, err = _call(
        ["run", world["m"], "--model", world["model"], "--out", "s3://bucket/out"], capsys
    )
    assert code == 2 and "AWS_ENDPOINT_URL_S3" in err and "hunter2" not in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.security
def test_run_options_refuse_endpoint_credentials():
    """The flows called directly: RunOptions refuses the URL before a flow run can record it."""
    for url in ("http://u:hunter2@127.0.0.1:9", "http://127.0.0.1:9/?X-Amz-Signature=hunter2"):
        with pytest.raises(ValueError, match="AWS_ACCESS_KEY_ID") as info:
            RunOptions(out="s3://bucket/out", s3_endpoint=url)
        assert "hunter2" not in str(info.value)


@pytest.mark.security
def test_error_lines_never_show_url_credentials():
    """An endpoint that got past the checks (another tool's configuration): its error line is redacted."""
    from botocore.exceptions import EndpointConnectionError

    from flows.cli import error_line

    exc = EndpointConnectionError(
        endpoint_url="http://u:hunter2@127.0.0.1:9/b/k?X-Amz-Signature=hunter2"
    )
    line, code = error_line(exc)
    assert code == 3 and "127.0.0.1:9" in line and "hunter2" not in line, line


@pytest.mark.bad_input
def test_restyle_error_from_the_catalog_is_one_line(prefect_server, world, capsys, tmp_path):
    """A catalog restyle cannot use is reported as a manifest problem (the problems list names the
    column; no traceback), exit 2, and leaves no --out folder (the write probe's is removed)."""
    out = tmp_path / "restyle-out"
    code, printed, err = _call(
        ["restyle", world["catalog"], "--style", "x", "--caption-column", "nope", "--out", str(out),
         "--model", world["model"]],
        capsys,
    )  # fmt: skip
    said = printed + err
    assert code == 2 and "no caption column 'nope'" in said and "Traceback" not in said, said[
        -2000:
    ]
    assert "nothing was run" in said
    assert not out.exists()


@pytest.mark.fault
def test_full_disk_during_a_run_exits_3(prefect_server, flow_model, tmp_path, full_disk):  # noqa: F811
    """The program (a subprocess, on the session's Prefect server): the summary on stdout, and on stderr
    one error line, status 3."""
    from tests.flows.conftest import demo_rows

    images = scene_files(tmp_path / "img", 3)
    m = write_rows(tmp_path / "m.parquet", demo_rows(images))
    argv = ["run", m, "--out", str(full_disk / "out"), "--model", flow_model, "--run-id", "f1"]
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          env=cli_env(PREFECT_API_URL=prefect_server, EDITFLOW_PROGRESS="0"), timeout=600)  # fmt: skip
    err = proc.stderr
    assert proc.returncode == 3, (proc.returncode, proc.stdout, err[-3000:])
    assert "no space left" in err and "Traceback" not in err, err[-3000:]
    # one error line, the last; the run's own log lines (the failed shard, the report it could not
    # write) may come before it
    errors = [ln for ln in err.splitlines() if ln.startswith("editflow: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
    assert "run f1:" in proc.stdout  # the summary is still printed


@pytest.mark.fault
def test_failed_writes_and_full_shards_are_a_storage_failure():
    """A run whose outputs could not be written (the summary still could) is a storage failure (exit 3),
    not failed rows (exit 1): fixing the manifest would not help."""
    import pyarrow as pa

    from tasks.runs import storage_failures

    full = "row 1: writing output failed: OSError: [Errno 28] No space left on device: '/o/a.png'"
    results = pa.table({"status": ["succeeded", "failed", "failed"],
                        "error": [None, full, "row 2: image_uri: cannot read the image"]})  # fmt: skip
    assert storage_failures(results, []) == {"edits": 1, "shards": 0, "error": full}
    assert storage_failures(results.slice(2), ["shard 0: ValueError: bad"]) is None
    refused = "row 1: writing output failed: ValueError: cannot encode a 0x0 image"
    not_storage = pa.table({"status": ["failed"], "error": [refused]})
    assert storage_failures(not_storage, []) is None  # fails the row alone (exit 1)
    ro = "shard 3: OSError: [Errno 30] Read-only file system: '/o/runs'"
    assert storage_failures(results.slice(0, 1), [ro]) == {"edits": 0, "shards": 1, "error": ro}


def _cli(args: list[str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    return proc.returncode, proc.stderr


SHOW_RUNS = 30  # the abort came in about 1 exit in 10: 30 runs miss it with p < 0.05
VALIDATE_RUNS = 6  # each loads torch and a tokenizer; show covers the same exit path cheaply


@pytest.mark.bad_input
def test_no_abort_at_exit_in_a_loop(world, tmp_path):
    """`show` of an interrupted run and `validate` of a manifest with a column named twice used to end
    with "terminate called without an active exception" (SIGABRT, status 134): Arrow's thread pool torn
    down while a worker thread was still joinable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "interrupted"
    _damaged_run(out, _plan(out))  # a complete plan without results: an interrupted run
    dup = tmp_path / "dup.parquet"
    row = one_row("a.png")
    names = [*row, "target_prompt"]
    pq.write_table(pa.table([[v] for v in [*row.values(), "x"]], names=names), dup)
    jobs = [["show", RUN, "--out", str(out)]] * SHOW_RUNS
    jobs += [["validate", str(dup), "--model", world["model"]]] * VALIDATE_RUNS
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_cli, jobs))
    show_codes = [c for c, _ in results[:SHOW_RUNS]]
    validate_codes = [c for c, _ in results[SHOW_RUNS:]]
    aborted = [err for _, err in results if "terminate called" in err]
    assert show_codes == [0] * SHOW_RUNS and validate_codes == [2] * VALIDATE_RUNS, (
        show_codes,
        validate_codes,
        aborted[:1],
    )
