"""A quiet terminal: the CLI run as a program on a terminal (a pty) shows its progress and summary and
no third-party warnings, banners or telemetry notices; ``-v`` adds editflow's own log."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pyarrow as pa
import pyarrow.parquet as pq

from .conftest import demo_rows, scene_files

NOISE = ("Warning", "warning", "accelerate", "Loading weights", "Prefect collects", "telemetry", "DO_NOT_TRACK",
         "Starting temporary server", "prefect.io", "INFO", "WARNING")  # fmt: skip
# what the CLI sets by default; cleared so that the test sees what a new user's shell would give it
_CLEARED = ("PREFECT_API_URL", "PREFECT_LOGGING_LEVEL", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK",
            "DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "EDITFLOW_PROGRESS",
            "PREFECT_LOGGING_TO_API_ENABLED", "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED")  # fmt: skip
_CI = ("APPVEYOR", "BITBUCKET_COMMIT", "BUDDY", "BUILDKITE", "CI", "CIRCLECI", "CI_NAME", "CODEBUILD_BUILD_ID", "DRONE",
       "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "SEMAPHORE", "TEAMCITY_VERSION", "TF_BUILD", "TRAVIS")  # fmt: skip


def _on_a_terminal(args: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
    """Run `python -m flows.cli ARGS` with stdout and stderr on a pseudo-terminal; (exit code, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(
        slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0)
    )  # 120 columns: tqdm sizes its bar to them
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
    code = proc.wait(timeout=60)
    os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_a_run_on_a_terminal_shows_no_third_party_noise_and_v_shows_editflows_log(
    flow_model, tmp_path
):
    images = scene_files(tmp_path, 2)
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(demo_rows(images, steps=2)[:5]), manifest)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED and k not in _CI}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "OMP_NUM_THREADS": "1",
    }  # a new user: no telemetry marker
    code, text = _on_a_terminal(
        ["run", str(manifest), "--out", str(out), "--model", flow_model, "--run-id", "q1"], env
    )
    assert code == 0, text
    assert "run q1: 5 succeeded, 0 failed, 0 skipped (of 5)" in text
    assert f"report: {out}/runs/q1/report.html" in text
    assert "5/5" in text and "edit/s" in text  # our own progress bar, with its rate
    # a line per stage, in order, each with the seconds since the start
    stages = ["checked the manifest's files, --out, the model and the device",
              "waiting for the temporary Prefect server", f"planning {manifest}",
              "planned 5 edit(s) (0 skipped: finished earlier), 2 source(s), 1 shard(s)",
              "loading the model", "inverting 2 source(s)", "editing 5 edit(s)", "writing 5 edit(s)",
              "writing the report", "run q1: 5 succeeded"]  # fmt: skip
    at = [text.find(stage) for stage in stages]
    assert -1 not in at and at == sorted(at), list(zip(stages, at))
    assert re.search(r"editflow +\d+\.\ds  loading the model ", text), text
    noisy = [line for line in text.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, noisy

    # one output deleted: the rerun redoes it (a complete run's rerun answers before any of this)
    next(iter(sorted((out / "assets").glob("*.png")))).unlink()
    code, text = _on_a_terminal(["-v", "rerun", f"{out}/runs/q1", "--model", flow_model], env)
    assert code == 0, text
    assert "INFO tasks.report: report of run q1" in text  # editflow's own log
    assert not [
        line for line in text.splitlines() if "accelerate" in line or "Prefect collects" in line
    ]
