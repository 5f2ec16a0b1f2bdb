"""Security: credentials never in logs, outputs or Prefect's flow-run parameters and artifacts; nothing
written outside --out; pickle weights never loaded without --allow-pickle, on any path (run, restyle,
the flows called directly, rerun with a tampered plan.json)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.cli import main
from tests.flows.conftest import demo_rows, get, keys_under, put, scene_png, write_manifest

from .helpers import one_row, results, scene_files, write_rows

pytestmark = pytest.mark.security

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAEDITFLOWCANARY77",
    "AWS_SECRET_ACCESS_KEY": "editflow-canary-secret/Value+0123456789",
    "AWS_SESSION_TOKEN": "editflow-canary-session-token-0123456789",
}


def test_credentials_appear_nowhere(
    prefect_server, s3_server, s3_client, s3_bucket, flow_model, capsys, editflow_log, monkeypatch
):
    from prefect.client.orchestration import get_client

    from storage.s3 import clear_client_cache

    images = [f"{s3_bucket}/images/scene-{i}.png" for i in range(2)]
    for i, uri in enumerate(images):
        put(s3_client, uri, scene_png(i))
    manifest = f"{s3_bucket}/manifests/m.parquet"
    write_manifest(s3_client, manifest, demo_rows([*images, f"{s3_bucket}/images/missing.png"]))
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    clear_client_cache()
    try:
        out = f"{s3_bucket}/out"
        code = main(
            [
                "-v",
                "run",
                manifest,
                "--out",
                out,
                "--s3-endpoint",
                s3_server,
                "--model",
                flow_model,
                "--run-id",
                "sec",
            ]
        )
    finally:
        clear_client_cache()
    cap = capsys.readouterr()
    assert code == 1  # the missing image's rows failed: their errors are scanned too
    texts = {"stdout": cap.out, "stderr": cap.err, "log": editflow_log.text}
    bucket = s3_bucket[len("s3://") :].split("/")[0]
    for key in keys_under(s3_client, f"s3://{bucket}/prefix/out/"):
        texts[key] = get(s3_client, f"s3://{bucket}/{key}").decode("latin-1")
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        texts["flow-run parameters"] = json.dumps([r.parameters for r in runs], default=str)
        texts["artifacts"] = json.dumps(
            [a.model_dump(mode="json") for a in client.read_artifacts()], default=str
        )
    assert any("runs/sec/results/" in k for k in texts)
    for name, text in texts.items():
        for secret in SECRETS.values():
            assert secret not in text, f"{secret} appears in {name}"


ENDPOINT_SECRET = "editflow-endpoint-canary-0123456789"


def _prefect_files() -> dict[str, bytes]:
    """Every file of the Prefect test server's database (sqlite, its journal) and of PREFECT_HOME."""
    import os

    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url.get_secret_value()
    db = Path(url.split(":///", 1)[1])
    folders = [db.parent, Path(os.environ["PREFECT_HOME"])]
    return {str(f): f.read_bytes() for d in folders for f in d.rglob("*") if f.is_file()}


@pytest.mark.parametrize("where", ["userinfo", "query", "environment"])
def test_endpoint_credentials_are_refused_and_stored_nowhere(
    prefect_server, s3_server, s3_client, s3_bucket, flow_model, capsys, editflow_log, monkeypatch,
    where,
):  # fmt: skip
    """Credentials in an endpoint URL (``http://user:SECRET@host``, ``?X-Amz-Credential=SECRET``, in
    --s3-endpoint or AWS_ENDPOINT_URL_S3) are refused with exit 2 before anything is stored: the
    secret is in no object, no output line, no log record and not in Prefect's database."""
    from storage.s3 import clear_client_cache

    secret = f"{ENDPOINT_SECRET}-{where}"
    scheme, hostport = s3_server.split("://")
    url = {
        "userinfo": f"{scheme}://editflow:{secret}@{hostport}",
        "query": f"{s3_server}/?X-Amz-Credential={secret}",
        "environment": f"{scheme}://editflow:{secret}@{hostport}",
    }[where]
    images = [f"{s3_bucket}/images/scene-{i}.png" for i in range(2)]
    for i, uri in enumerate(images):
        put(s3_client, uri, scene_png(i))
    manifest = f"{s3_bucket}/manifests/m.parquet"
    write_manifest(s3_client, manifest, demo_rows(images))
    argv = ["run", manifest, "--out", f"{s3_bucket}/out", "--model", flow_model, "--run-id", "ep"]
    if where == "environment":
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
    else:
        argv += ["--s3-endpoint", url]
    clear_client_cache()
    try:
        code = main(["-v", *argv])
    except SystemExit as exc:  # refused by the argument check: argparse's one line, status 2
        code = exc.code
    finally:
        clear_client_cache()
    cap = capsys.readouterr()
    err = [ln for ln in cap.err.splitlines() if ln.startswith("editflow")]
    assert code == 2 and "AWS_ACCESS_KEY_ID" in err[0], (code, cap.out, cap.err[-2000:])
    texts = {"stdout": cap.out, "stderr": cap.err, "log": editflow_log.text}
    bucket = s3_bucket[len("s3://") :].split("/")[0]
    for key in keys_under(s3_client, f"s3://{bucket}/"):
        texts[key] = get(s3_client, f"s3://{bucket}/{key}").decode("latin-1")
    texts.update({name: data.decode("latin-1") for name, data in _prefect_files().items()})
    assert any("prefect-test.db" in name for name in texts)
    for name, text in texts.items():
        assert secret not in text, f"the endpoint's secret appears in {name}"


def test_nothing_written_outside_out(prefect_server, flow_model, tmp_path, capsys):
    world = tmp_path / "world"
    images = scene_files(world / "img", 1)
    manifest = write_rows(world / "m.parquet", [one_row(images[0], edit_id="e1")])
    elsewhere = world / "elsewhere"
    elsewhere.mkdir()
    out = world / "out"
    out.mkdir()
    (out / "assets").symlink_to(
        elsewhere, target_is_directory=True
    )  # planted by someone who can write out/
    before = {p: p.read_bytes() for p in world.rglob("*") if p.is_file() and out not in p.parents}
    code = main(["run", manifest, "--out", str(out), "--model", flow_model, "--run-id", "w"])
    capsys.readouterr()
    [row] = results(out, "w")
    # editflow refuses the write through the planted link: the edit fails with that reason (exit 1,
    # failed rows), naming the link and what to do
    assert code == 1, row["error"]
    assert row["status"] == "failed" and "refusing the symbolic link" in row["error"]
    assert "remove it" in row["error"]
    assert not list(elsewhere.iterdir())
    after = {
        p: p.read_bytes()
        for p in world.rglob("*")
        if p.is_file() and out not in p.parents and p.parent != elsewhere
    }
    assert after == before


@pytest.fixture
def booby_trapped_model(tmp_path, flow_model) -> tuple[str, Path]:
    """The tiny model with its UNet as a pickle only; unpickling it creates a marker file."""
    import torch

    folder = tmp_path / "trap-model"
    shutil.copytree(flow_model, folder)
    marker = tmp_path / "UNPICKLED"
    for st in (folder / "unet").glob("*.safetensors"):
        st.unlink()

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"trap": Trap()}, folder / "unet" / "diffusion_pytorch_model.bin")
    return str(folder), marker


def test_no_unpickling_without_the_flag_on_any_path(
    prefect_server, flow_model, tmp_path, capsys, booby_trapped_model
):
    from flows.bulk_edit import bulk_edit, rerun
    from tasks.options import RunOptions

    trap, marker = booby_trapped_model
    images = scene_files(tmp_path / "img", 1)
    manifest = write_rows(
        tmp_path / "m.parquet",
        [
            one_row(images[0]),
            one_row(str(tmp_path / "later.png"), "a red square on a gray background"),
        ],
    )
    out = tmp_path / "out"
    catalog = tmp_path / "catalog.csv"
    catalog.write_text(f"image_uri,caption\n{images[0]},a red circle on a gray background\n")
    # the CLI: run and restyle refuse before any work
    for argv in (["run", manifest], ["restyle", str(catalog), "--style", "striped"]):
        code = main([*argv, "--out", str(out), "--model", trap])
        text = "".join(capsys.readouterr())
        assert code == 2 and "pickle" in text, text
    # the flow called directly: the shard refuses to load the model
    summary = bulk_edit(manifest, RunOptions(out=str(out), model=trap), run_id="direct")
    assert summary["counts"]["succeeded"] == 0 and "PickleWeightsRefused" in " ".join(
        summary["failed_shards"]
    )
    # rerun of a run whose stored plan was switched to the trap with allow_pickle on
    assert main(["run", manifest, "--out", str(out), "--model", flow_model, "--run-id", "r"]) == 1
    capsys.readouterr()
    plan_path = out / "runs" / "r" / "plan.json"
    plan = json.loads(plan_path.read_text())
    plan["options"].update(model=trap, allow_pickle=True)
    plan_path.write_text(json.dumps(plan))
    assert (
        main(["rerun", "r", "--out", str(out), "--model", flow_model]) == 2
    )  # refused: the plan's model differs
    assert (
        main(["rerun", "r", "--out", str(out), "--model", trap]) == 2
    )  # the trap, but no --allow-pickle
    capsys.readouterr()
    again = rerun(
        "r", RunOptions(out=str(out), model=trap)
    )  # the flow API: allow_pickle defaults to off, not to the plan's
    assert "PickleWeightsRefused" in " ".join(again["failed_shards"])
    assert not marker.exists()
