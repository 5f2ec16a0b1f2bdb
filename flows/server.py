"""A temporary Prefect server tied to the CLI process (used when no PREFECT_API_URL is set).

Prefect would start its own temporary server, but in the CLI's process group and without a tie to
the CLI's life: a terminal's Ctrl-C then stopped the server first (the CLI spent a minute retrying
against it) and SIGTERM/SIGKILL left it running. This one runs the same uvicorn app in its own
session (Ctrl-C reaches only the CLI, which stops the server on its way out) and asks the kernel to
kill it when the CLI dies, whatever the signal (Linux ``PR_SET_PDEATHSIG``).

It is launched in the background (:func:`launch_temporary_server`) once the CLI's cheap checks have
passed, and waited for (:func:`wait_for_server`) just before the flow, so that its start (seconds of
imports and migrations) overlaps the model check and the flow's imports. Prefect 3.9's own ephemeral
mode runs the same kind of subprocess server, started at the first API call with nothing overlapped.
`editflow serve` records its server (:func:`register_server`); other commands on the machine use it
(:func:`use_running_server`) instead of starting one.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

_SERVER: dict[str, subprocess.Popen] = {}
_URL: dict[str, str] = {}  # the launched server's API URL; 'registered': its record's path


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


def launch_temporary_server() -> bool:
    """Start the temporary server's process without waiting for it (it takes seconds to import and
    migrate: the CLI checks its arguments and loads its modules meanwhile); :func:`wait_for_server`
    waits. False (nothing started) when PREFECT_API_URL is set or one is already launched."""
    if os.environ.get("PREFECT_API_URL") or _SERVER:
        return False
    import importlib.util

    spec = importlib.util.find_spec(
        "prefect"
    )  # where prefect lives, without importing it (seconds)
    app_dir = Path(spec.origin).parent.parent if spec and spec.origin else Path(sys.prefix)
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    args = [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]  # fmt: skip
    proc = subprocess.Popen(args, env=env, start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509
    _SERVER["proc"] = proc
    _URL["url"] = f"http://127.0.0.1:{port}/api"
    atexit.register(stop_temporary_server)
    return True


def server_launched() -> bool:
    """Whether a temporary server was launched and is not yet waited for."""
    return "proc" in _SERVER and os.environ.get("PREFECT_API_URL") != _URL.get("url")


def wait_for_server(timeout: float = 60.0) -> str | None:
    """Wait until the launched temporary server answers, then point Prefect at it (PREFECT_API_URL);
    returns its URL (None when none was launched)."""
    proc, url = _SERVER.get("proc"), _URL.get("url")
    if proc is None or url is None or os.environ.get("PREFECT_API_URL") == url:
        return None
    import httpx

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
            time.sleep(0.05)
        else:
            stop_temporary_server()
            raise RuntimeError(
                f"the temporary Prefect server did not answer on {url} within {timeout:.0f}s"
            )
    _use(url)
    logger.info("temporary Prefect server on %s (pid %d)", url, proc.pid)
    return url


def _use(url: str) -> None:
    os.environ["PREFECT_API_URL"] = url
    if "prefect.context" in sys.modules:  # settings already read at import: take the new URL
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


def start_temporary_server(timeout: float = 60.0) -> str | None:
    """Start the server unless PREFECT_API_URL is set; sets PREFECT_API_URL; returns the URL (or None)."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    launch_temporary_server()
    return wait_for_server(timeout)


def own_server_in_use() -> bool:
    """Whether Prefect points at the temporary server this process launched (and waited for)."""
    url = _URL.get("url")
    return "proc" in _SERVER and url is not None and os.environ.get("PREFECT_API_URL") == url


@contextlib.contextmanager
def flow_run_settings() -> Iterator[None]:
    """Prefect settings for the CLI's flow runs. On the CLI's own temporary server, no flow-run
    heartbeats: they let a long-lived server mark crashed runs, but this server dies with the CLI, and
    Prefect's heartbeat thread sleeps in 1 s steps that the end of every flow run waits for (up to 1 s
    per flow). On any other server (PREFECT_API_URL, `editflow serve`'s) Prefect's settings apply."""
    if not own_server_in_use():
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


# ---------------------------------------------------------------- a server already running here

# `editflow serve` (without PREFECT_API_URL) records its temporary server here; runs on this machine use
# it instead of starting their own (seconds saved per command).
REGISTRY_NAME = "editflow-server.json"


def _registry() -> Path:
    from flows.warm import prefect_home  # standard library only

    return prefect_home() / REGISTRY_NAME


def register_server() -> None:
    """Record the launched temporary server (URL, pid) for other editflow commands on this machine;
    the record is removed when this process stops the server."""
    proc, url = _SERVER.get("proc"), _URL.get("url")
    if proc is None or url is None:
        return
    path = _registry()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"url": url, "pid": proc.pid, "owner": os.getpid()}))
        os.replace(tmp, path)
        _URL["registered"] = str(path)
    except OSError as exc:  # the server still serves this process
        logger.warning("could not record the Prefect server in %s: %s", path, exc)


def running_server(timeout: float = 0.5) -> str | None:
    """The URL of a server `editflow serve` recorded on this machine, if its process lives and it
    answers within `timeout` seconds; else None (a stale record is ignored)."""
    try:
        record = json.loads(_registry().read_text())
        url, pid = str(record["url"]), int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process: not ours to use
        return None
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:  # noqa: S310
            return url if response.status == 200 else None
    except (OSError, ValueError):
        return None


def use_running_server() -> str | None:
    """Point Prefect at the server `editflow serve` runs here (see :func:`running_server`), unless
    PREFECT_API_URL is set; returns its URL or None."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    url = running_server()
    if url is not None:
        _use(url)
        logger.info("using the editflow server on %s", url)
    return url


def stop_temporary_server() -> None:
    """Stop the temporary server if this process started one (idempotent)."""
    registered = _URL.pop("registered", None)
    if registered:
        with contextlib.suppress(OSError):
            os.remove(registered)
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
