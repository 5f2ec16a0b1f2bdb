"""A warm worker: one long-lived process with torch, diffusers, transformers and Prefect imported, which
runs each `editflow` command it is handed in a forked child (seconds of imports saved per command).

    editflow warm                     # foreground; Ctrl-C or SIGTERM stops it and removes its socket

The worker listens on a Unix socket (:func:`socket_path`: ``EDITFLOW_WARM_SOCKET``, else
``$PREFECT_HOME/editflow-warm.sock``, mode 0600). A command (:func:`hand_over`, called by the CLI before
any heavy import) sends its argv, working directory, environment and its three standard file
descriptors (``SCM_RIGHTS``); the worker forks a session process, which forks the command's process and
sends back its pid, then its exit status. The command's process takes the descriptors as 0/1/2, the
directory and the environment, and runs the ordinary CLI: the same checks, stage lines, exit statuses
and hints as a command started from scratch. A missing, stale or foreign socket, or
``EDITFLOW_WARM=0``, leaves the command to run in its own process as before.

Nothing here imports torch or Prefect at module level: the client side must stay cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import socket
import stat
import struct
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

SOCKET_NAME = "editflow-warm.sock"
# the request's header: a magic word and the JSON body's length in bytes
_MAGIC = b"EFW1"
_HEADER = struct.Struct("!4sI")
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # argv + cwd + environment; a larger request is refused
# the commands a warm worker runs: those that import torch (validate: the tokenizer) or Prefect
WARM_COMMANDS = ("run", "rerun", "restyle", "validate")
_FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
)  # from a command's client to its process
_CHILD = {"on": False}  # set in a command's process forked by the worker: never hand over again
# the modules a run needs, imported once by the worker (the CLI imports them lazily)
HEAVY_MODULES = (
    "torch",
    "diffusers",
    "transformers",
    "prefect",
    "flows.bulk_edit",
    "flows.runners",
    "tasks.units",
    "tasks.worker",
    "editing.model",
    "editing.model_forms",
    "editing.pnp",
    "editing.p2p",
    "editing.prompts",
)
# names the libraries load lazily on first use: resolved once by the worker
HEAVY_NAMES = {
    "diffusers": (
        "StableDiffusionPipeline",
        "DDIMScheduler",
        "UNet2DConditionModel",
        "AutoencoderKL",
    ),
    "transformers": ("CLIPTextModel", "CLIPTextConfig", "CLIPTokenizer"),
}


def prefect_home() -> Path:
    """Prefect's home folder: ``PREFECT_HOME``, else ~/.prefect (where editflow keeps its machine-wide
    records: the warm worker's socket, the `editflow serve` server's record)."""
    return Path(os.environ.get("PREFECT_HOME") or str(Path.home() / ".prefect")).expanduser()


def socket_path() -> Path:
    """``EDITFLOW_WARM_SOCKET``, else ``editflow-warm.sock`` in ``PREFECT_HOME`` (default ~/.prefect)."""
    explicit = os.environ.get("EDITFLOW_WARM_SOCKET")
    if explicit:
        return Path(explicit).expanduser()
    return prefect_home() / SOCKET_NAME


# ---------------------------------------------------------------- the command's side (cheap imports only)


def _command_name(argv: list[str]) -> str | None:
    """The subcommand in argv: its first word that is not an option (``-v`` may come first)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _say(verbose: bool, text: str) -> None:
    if verbose:
        print(f"editflow: {text}", file=sys.stderr, flush=True)


def _connect(path: Path, verbose: bool) -> socket.socket | None:
    """A connection to the worker at `path` if one answers there and the socket is this user's; else None."""
    try:
        info = os.lstat(path)
    except OSError:
        return None  # no worker: the usual case, nothing to say
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        _say(verbose, f"ignoring {path}: not a socket owned by this user; running here")
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        _say(verbose, f"no warm worker answers at {path} ({exc.strerror or exc}); running here")
        return None
    return sock


def hand_over(argv: list[str]) -> int | None:
    """Run `argv` in a warm worker's child if one answers; its exit status, or None to run here."""
    verbose = any(a in ("-v", "--verbose") for a in argv)
    if _CHILD["on"] or os.environ.get("EDITFLOW_WARM", "").strip() == "0":
        return None
    if _command_name(argv) not in WARM_COMMANDS:
        return None
    try:
        path = socket_path()
    except RuntimeError:  # no home directory to look in
        return None
    sock = _connect(path, verbose)
    if sock is None:
        return None
    # a signal from here on goes to the command's process; one that comes before its pid is held
    target: dict[str, int] = {}
    held: list[int] = []

    def forward(signum, frame) -> None:  # noqa: ARG001
        if "pid" not in target:
            held.append(signum)
            return
        with contextlib.suppress(OSError):
            os.kill(target["pid"], signum)

    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED}
    with sock:
        body = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        try:
            socket.send_fds(sock, [_HEADER.pack(_MAGIC, len(body))], [0, 1, 2])
            sock.sendall(body)
            reader = sock.makefile("rb")
            first = reader.readline().split()
        except OSError as exc:  # a closed standard descriptor, a worker that went away
            first, problem = [], f"did not take the command ({exc})"
        else:
            problem = "refused the command"
        if len(first) != 3 or first[0] != b"pid":
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if held:  # stopped before anything ran
                print("editflow: interrupted", file=sys.stderr)
                return 128 + held[0]
            _say(verbose, f"the warm worker at {path} {problem}; running here")
            return None
        pid, worker = int(first[1]), int(first[2])
        target["pid"] = pid
        for signum in held:
            forward(signum, None)
        _say(verbose, f"warm worker {worker} at {path} runs this command in process {pid}")
        line = reader.readline().split()  # PEP 475: a forwarded signal does not interrupt the wait
        if len(line) == 2 and line[0] == b"exit":
            return int(line[1])
        print(
            f"editflow: error: the warm worker {worker} ended before the command (process {pid}) did",
            file=sys.stderr,
        )
        return 1


# ---------------------------------------------------------------- the worker's side


def _recv_exact(conn: socket.socket, n: int, data: bytes = b"") -> bytes:
    while len(data) < n:
        chunk = conn.recv(min(n - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError("the command closed the connection mid-request")
        data += chunk
    return data


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 3)
    data = _recv_exact(conn, _HEADER.size, data)
    magic, length = _HEADER.unpack(data)
    if magic != _MAGIC or length > MAX_REQUEST_BYTES or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("not an editflow warm request")
    request = json.loads(_recv_exact(conn, length))
    return request, fds


def _peer_uid(conn: socket.socket) -> int | None:
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _pid, uid, _gid = struct.unpack(
        "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    )
    return uid


def _become_the_command(request: dict, fds: list[int], server_url: str | None) -> None:
    """In the command's process: take the command's descriptors, directory and environment, run the CLI
    as the program (it ends the process itself)."""
    code = 1
    try:
        # each received descriptor moved above 2 first, so that one received as 0-2 (a worker started
        # with a standard stream closed) is neither closed nor overwritten before it is placed
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3) for fd in fds]
        for fd in fds:
            os.close(fd)
        for target, fd in enumerate(moved):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if server_url and not os.environ.get("PREFECT_API_URL"):
            os.environ["PREFECT_API_URL"] = server_url  # the worker's server, instead of a new one
        # standard streams as a fresh interpreter makes them: stdout line-buffered only on a terminal
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.argv = ["editflow", *request["argv"]]
        _CHILD["on"] = True
        from flows import server

        server._SERVER.clear()  # the worker's server is not this process's to stop
        server._URL.clear()
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()  # Prefect's settings from the command's environment
        from flows.cli import EDITFLOW_LOGGERS, main

        # logging as a fresh interpreter has it: the worker's handlers and levels (an `editflow -v warm`)
        # are not the command's, which configures its own (flows.cli._configure_logging)
        logging.root.handlers.clear()
        for name in EDITFLOW_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)

        # blocked since the fork (see _session)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
        code = main()  # as the program: ends the process itself
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:  # forwarded before the CLI's own handling began
        code = 130
        with contextlib.suppress(Exception):
            print("editflow: interrupted", file=sys.stderr)
    except BaseException as exc:  # noqa: BLE001 - whatever happens, the process must end here
        with contextlib.suppress(Exception):
            print(f"editflow: error: the warm worker's process failed: {exc!r}", file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _session(conn: socket.socket, server_url: str | None, worker: int) -> None:
    """In a process forked for one connection: read the request, fork the command's process, report its
    pid and then its exit status; a command whose client went away is sent SIGTERM."""
    code = 0
    try:
        os.setsid()  # the worker's terminal signals (its Ctrl-C) do not reach the commands it runs
        request, fds = _read_request(conn)
        # the command's pid goes to its client, which may forward a signal at once: held until the CLI runs
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        pid = os.fork()
        if pid == 0:
            conn.close()
            _become_the_command(request, fds, server_url)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
        for fd in fds:
            os.close(fd)
        conn.sendall(f"pid {pid} {worker}\n".encode())
        # wake when the command ends (its pidfd on Linux, else a poll every 0.1 s) or its client does
        pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
        watched = [conn] if pidfd is None else [conn, pidfd]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            ready, _, _ = select.select(watched, [], [], None if pidfd is not None else 0.1)
            if conn in ready and not conn.recv(
                1
            ):  # the command's client ended: so does the command
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
                _, status = os.waitpid(pid, 0)
                break
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code < 0:  # killed by a signal: the shell's convention
            exit_code = 128 - exit_code
        with contextlib.suppress(OSError):
            conn.sendall(f"exit {exit_code}\n".encode())
    except BaseException as exc:  # noqa: BLE001
        code = 1
        with contextlib.suppress(Exception):
            logger.warning("warm worker: a command's session failed: %r", exc)
    finally:
        os._exit(code)


def _bind(path: Path) -> socket.socket:
    """Listen at `path` (mode 0600). A socket there that answers is another worker's: refused; one owned
    by another user, or anything but a socket: refused; a dead one is replaced."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None:
        if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
            raise ValueError(f"{path} exists and is not a socket of this user: not replaced")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            os.unlink(path)  # stale: its worker is gone
        else:
            raise ValueError(f"a warm worker already listens at {path}")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    except OSError as exc:
        listener.close()
        raise ValueError(f"cannot listen at {path}: {exc}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    listener.listen(16)
    return listener


def load_heavy_modules() -> None:
    """Import what a command needs (no torch op runs, no thread starts: a fork must find none)."""
    import importlib

    for name in HEAVY_MODULES:
        importlib.import_module(name)
    for name, attributes in HEAVY_NAMES.items():
        module = importlib.import_module(name)
        for attribute in attributes:
            getattr(module, attribute)
    _check_no_threads("importing")


def _check_no_threads(during: str) -> None:
    import threading

    extra = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    # (native threads are not counted: pyarrow's jemalloc starts a background thread at import, which
    # jemalloc itself handles across a fork)
    if extra:
        raise RuntimeError(
            f"threads started while {during} ({', '.join(extra)}): a fork would break them"
        )


class _Stop(BaseException):
    """SIGTERM at the worker: stop like Ctrl-C."""


def _stop(signum, frame) -> None:  # noqa: ARG001
    raise _Stop()


def serve(path: Path, *, keep_server: bool = True) -> int:
    """`editflow warm`: import the heavy modules, keep a Prefect server unless told not to (or
    PREFECT_API_URL is set), listen at `path` until Ctrl-C or SIGTERM; 0 when stopped."""
    import time

    t0 = time.monotonic()
    load_heavy_modules()
    server_url = os.environ.get("PREFECT_API_URL") or None
    if keep_server and not server_url:
        from flows.server import launch_temporary_server, wait_for_server

        launch_temporary_server()
        server_url = wait_for_server()
        _check_no_threads("starting the Prefect server")
    listener = _bind(path)
    inode = os.lstat(path).st_ino
    signal.signal(signal.SIGTERM, _stop)
    worker = os.getpid()
    where = f"Prefect server {server_url}" if server_url else "no Prefect server kept"
    print(
        f"editflow warm: ready in {time.monotonic() - t0:.1f}s on {path} (pid {worker}, {where}); "
        "Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    listener.settimeout(1.0)
    try:
        while True:
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0]:  # reap finished sessions
                    pass
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                uid = _peer_uid(conn)
                if uid is not None and uid != os.getuid():
                    logger.warning("warm worker: refused a connection from uid %d", uid)
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                if os.fork() == 0:
                    listener.close()
                    conn.settimeout(None)
                    _session(conn, server_url, worker)
    except (KeyboardInterrupt, _Stop):
        print("editflow warm: stopped", file=sys.stderr, flush=True)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            if os.lstat(path).st_ino == inode:
                os.unlink(path)
        from flows.server import stop_temporary_server

        stop_temporary_server()
    return 0
