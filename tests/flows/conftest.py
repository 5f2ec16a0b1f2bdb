"""Fixtures for flow tests: Prefect's own test server, a tiny model, and source images in real S3 (moto)."""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refmodel.toy import TINY, build_toy_pipeline

STEPS = 4  # denoising steps of the test manifests: the flows, not the model, are under test here


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[str]:
    """One Prefect test server for the session; its URL is exported so Dask worker processes use it too."""
    home = tmp_path_factory.mktemp("prefect-home")
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        from prefect.settings import get_current_settings
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            url = str(get_current_settings().api.url)
            mp.setenv("PREFECT_API_URL", url)
            yield url


@dataclass
class ReadmeRun:
    """What running the README's steps left: the scratch checkout, each step's record, the first mismatch."""

    scratch: Path
    steps: list[dict] = field(
        default_factory=list
    )  # {"kind", "command" or "code", "status", "out"}
    failure: str | None = None


@pytest.fixture(scope="session")
def readme_run(prefect_server, tmp_path_factory) -> ReadmeRun:
    """Every README step that can run here, run once in README order in a scratch copy of ``manifests/``
    (convention: tests/flows/test_readme_commands.py); stops at the first command whose exit status is
    not the README's. Shared by the README test and the restyle demo test (the README's restyle command)."""
    from tests.flows.test_readme_commands import README, REPO, readme_blocks, runnable

    scratch = tmp_path_factory.mktemp("readme") / "checkout"
    scratch.mkdir()
    shutil.copytree(REPO / "manifests", scratch / "manifests")
    run = ReadmeRun(scratch)
    from flows.cli import main

    run_id = None
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(scratch)
        mp.setenv("EDITFLOW_THREADS", "1")
        mp.delenv("EDITFLOW_PROGRESS", raising=False)
        for kind, step in runnable(readme_blocks(README.read_text())):
            out = io.StringIO()
            if kind == "sh":
                command, expected = step
                # a trailing "# ..." is a comment, as in bash
                argv = shlex.split(command, comments=True)
                if argv[0] == "editflow":
                    with redirect_stdout(out), redirect_stderr(io.StringIO()):
                        code = main(argv[1:])
                    m = re.search(r"^run (\S+): ", out.getvalue(), re.M)
                    run_id = m.group(1) if m and argv[1] == "run" else run_id
                    text = out.getvalue()
                else:
                    done = subprocess.run(
                        ["bash", "-c", command], capture_output=True, text=True, timeout=120
                    )
                    code, text = done.returncode, done.stdout + done.stderr
                run.steps.append({"kind": kind, "command": command, "status": code, "out": text})
                if code != expected:
                    run.failure = f"README command {command!r} exited {code}, expected {expected}:\n{text[-3000:]}"
                    break
            else:
                code_text = step.replace("RUN_ID", run_id or "RUN_ID")
                name = f"README python block ({code_text.splitlines()[0]!r}...)"
                with redirect_stdout(out):
                    exec(compile(code_text, name, "exec"), {"__name__": "__readme__"})
                run.steps.append(
                    {"kind": kind, "code": code_text, "status": 0, "out": out.getvalue()}
                )
    return run


@pytest.fixture(scope="session")
def flow_model(tmp_path_factory) -> str:
    return str(build_toy_pipeline(tmp_path_factory.mktemp("flow-model"), TINY, seed=1))


def scene_png(seed: int) -> bytes:
    from refmodel import domain

    scene = domain.sample_scene(np.random.default_rng(seed))
    image, _ = domain.render(scene)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def scene_files(folder, n: int) -> list[str]:
    """`n` scene PNGs (seeds 0..n-1) written as ``scene-{i}.png`` into `folder`; their paths."""
    paths = []
    for i in range(n):
        path = folder / f"scene-{i}.png"
        path.write_bytes(scene_png(i))
        paths.append(str(path))
    return paths


def run_args(manifest, out, model: str, *, shard_size: int, run_id: str) -> list[str]:
    """The `editflow run` arguments of the CLI tests."""
    return ["run", str(manifest), "--out", str(out), "--model", model,
            "--shard-size", str(shard_size), "--run-id", run_id]  # fmt: skip


def put(s3_client, uri: str, data: bytes) -> None:
    bucket, key = uri[len("s3://") :].split("/", 1)
    s3_client.put_object(Bucket=bucket, Key=key, Body=data)


def get(s3_client, uri: str) -> bytes:
    bucket, key = uri[len("s3://") :].split("/", 1)
    return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()


def keys_under(s3_client, uri: str) -> dict[str, str]:
    """key -> ETag of every object under an s3:// prefix."""
    bucket, prefix = uri[len("s3://") :].split("/", 1)
    out = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj["ETag"]
    return out


def write_manifest(s3_client, uri: str, rows: list[dict]) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    put(s3_client, uri, buf.getvalue())


def demo_rows(images: list[str], steps: int = STEPS) -> list[dict]:
    """9 edits over 3 sources (3, 4 and 2 targets), both methods, a passthrough `sku`."""
    src = [
        "a red circle on a gray background",
        "a blue square on a black background",
        "a green triangle on a white background",
    ]
    targets = [
        [
            "a blue circle on a gray background",
            "a red square on a gray background",
            "a red circle on a white background",
        ],
        [
            "a red square on a black background",
            "a blue circle on a black background",
            "a yellow square on a black background",
            "a blue square on a gray background",
        ],
        ["a purple triangle on a white background", "a green circle on a white background"],
    ]
    rows = []
    for i, (uri, s, ts) in enumerate(zip(images, src, targets)):
        for j, t in enumerate(ts):
            rows.append({"image_uri": uri, "source_prompt": s, "target_prompt": t, "method": "p2p" if j == 1 else "pnp",
                         "num_steps": steps, "sku": f"SKU-{i}-{j}"})  # fmt: skip
    return rows


@pytest.fixture
def env_clean() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
