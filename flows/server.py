"""A temporary Prefect server tied to the CLI process (used when no PREFECT_API_URL is set).

Prefect would start its own temporary server, but in the CLI's process group and without a tie to
the CLI's life: a terminal's Ctrl-C then stopped the server first (the CLI spent a minute retrying
against it) and SIGTERM/SIGKILL left it running. This one runs the same uvicorn app in its own
session (Ctrl-C reaches only the CLI, which stops the server on its way out) and asks the kernel to
kill it when the CLI dies, whatever the signal (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

_SERVER: dict[str, subprocess.Popen] = {}


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (
        OSError,
        AttributeError,
    ):  # not Linux: stop() at exit and the signal handlers still apply
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_temporary_server(timeout: float = 60.0) -> str | None:
    """Start the server unless PREFECT_API_URL is set; sets PREFECT_API_URL; returns the URL (or None)."""
    if os.environ.get("PREFECT_API_URL") or _SERVER:
        return None
    import httpx
    import prefect

    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    args = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]  # fmt: skip
    proc = subprocess.Popen(args, env=env, start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509
    _SERVER["proc"] = proc
    atexit.register(stop_temporary_server)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the temporary Prefect server exited with status {proc.returncode} while starting"
                )
            try:
                if client.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            stop_temporary_server()
            raise RuntimeError(
                f"the temporary Prefect server did not answer on {url} within {timeout:.0f}s"
            )
    os.environ["PREFECT_API_URL"] = url
    if "prefect.context" in sys.modules:  # settings already read at import: take the new URL
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
    logger.info("temporary Prefect server on %s (pid %d)", url, proc.pid)
    return url


def stop_temporary_server() -> None:
    """Stop the temporary server if this process started one (idempotent)."""
    proc = _SERVER.pop("proc", None)
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# Prefect's failed-run records, and the flow's own records of a failed shard or summary (the CLI prints
# both itself: the failed shards after the summary, a summary that could not be written as its error line)
_FAILURE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "flows.bulk_edit")


class _NoFailures(logging.Filter):
    """Drops ERROR and worse records (Prefect's failed-run records with tracebacks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def quiet_prefect_failures() -> None:
    """Prefect logs a failed task or flow run with its traceback; the CLI reports failures itself (one
    line per failed row or shard, one line for a fatal error), so without -v those records are dropped."""
    for name in _FAILURE_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _NoFailures) for f in log.filters):
            log.addFilter(_NoFailures())
