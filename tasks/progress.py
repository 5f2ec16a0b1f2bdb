"""Edit-level progress of a run: shards publish how many of their edits are done; the flow adds them up.

A shard (:class:`ShardProgress`) publishes ``{"run_id", "shard", "done", "failed", "edits"}`` after its
sources are read and after every batch of edits. Where it goes depends on where the shard runs:

* in the flow's own process (the local thread-pool runner): straight to the listeners registered with
  :func:`listen` in this process;
* in a Dask worker process: as a Dask event (``Worker.log_event``) on the topic of the run, which the
  flow's Dask client receives through ``Client.subscribe_topic``.

A shard also publishes the stage it enters (:meth:`ShardProgress.stage`: ``{"run_id", "shard", "stage":
{"name": ..., facts}}``: loading the model, inverting, editing, writing), which the flow passes on as
``{"stage": ...}`` so that the CLI can say what is happening before the first edit is done.

Counts are cumulative per shard, so a repeated or late event (a retried shard, an event that arrives
after the shard's result) never counts twice: :class:`RunProgress` keeps the largest count per shard.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

TOPIC_PREFIX = "editflow-progress-"
Listener = Callable[[dict[str, Any]], None]
_LISTENERS: dict[str, list[Listener]] = {}  # run id -> listeners in this process
_LOCK = threading.Lock()


def topic(run_id: str) -> str:
    """The Dask event topic of run `run_id`."""
    return TOPIC_PREFIX + run_id


def publish(event: dict[str, Any]) -> None:
    """Send one shard progress event to this process's listeners, else (in a Dask worker) to the
    flow's Dask client; dropped (with a debug log) where neither is listening."""
    with _LOCK:
        listeners = list(_LISTENERS.get(event["run_id"], ()))
    if listeners:
        for fn in listeners:
            try:
                fn(event)
            except Exception as exc:  # noqa: BLE001 - progress display must never fail a shard
                logger.debug("progress listener failed: %s: %s", type(exc).__name__, exc)
        return
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not in a Dask worker, and no listener here
        logger.debug("progress event with no listener: %s", event)
        return
    try:
        worker.log_event(topic(event["run_id"]), event)
    except Exception as exc:  # noqa: BLE001
        logger.debug("could not send a progress event: %s: %s", type(exc).__name__, exc)


class ShardProgress:
    """The running count of one shard's finished edits (succeeded, skipped or failed), published as it grows."""

    def __init__(
        self, run_id: str, shard: int, edits: int, *, sink: Listener | None = None
    ) -> None:
        self.run_id, self.shard, self.edits = run_id, shard, edits
        self.done = self.failed = 0
        self._sink = sink or publish

    def set(self, done: int, failed: int | None = None) -> None:
        """`done` of the shard's edits are finished (`failed` of them failed)."""
        self.done = min(self.edits, max(self.done, done))
        if failed is not None:
            self.failed = max(self.failed, failed)
        self._emit()

    def add(self, n: int) -> None:
        """`n` more edits are finished."""
        self.set(self.done + n)

    def stage(self, name: str, **facts: Any) -> None:
        """The shard enters stage `name` (``model``, ``invert``, ``edit``, ``write``), with its facts."""
        self._sink({"run_id": self.run_id, "shard": self.shard, "stage": {"name": name, **facts}})

    def _emit(self) -> None:
        self._sink(
            {
                "run_id": self.run_id,
                "shard": self.shard,
                "done": self.done,
                "failed": self.failed,
                "edits": self.edits,
            }
        )


def dask_client_of(task_runner: Any) -> Any | None:
    """The Dask client of a prefect-dask task runner (None for any other runner)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        return None
    if isinstance(task_runner, DaskTaskRunner):
        return task_runner.client
    return None


@contextlib.contextmanager
def listen(run_id: str, fn: Listener, *, dask_client: Any | None = None) -> Iterator[None]:
    """Call `fn` with every progress event of `run_id` (from this process and, given a Dask client, from
    its workers) while the block runs."""
    with _LOCK:
        _LISTENERS.setdefault(run_id, []).append(fn)
    subscribed = False
    if dask_client is not None:
        try:
            dask_client.subscribe_topic(topic(run_id), lambda ev: fn(ev[1]))
            subscribed = True
        except Exception as exc:  # noqa: BLE001 - progress then moves per shard only
            logger.warning(
                "no per-edit progress from the Dask workers (%s: %s)", type(exc).__name__, exc
            )
    try:
        yield
    finally:
        with _LOCK:
            fns = _LISTENERS.get(run_id, [])
            if fn in fns:
                fns.remove(fn)
            if not fns:
                _LISTENERS.pop(run_id, None)
        if subscribed:
            with contextlib.suppress(Exception):
                dask_client.unsubscribe_topic(topic(run_id))


class RunProgress:
    """Edits done / total over a run's shards, with edits per second and an ETA; thread-safe."""

    def __init__(self, total: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self._done: dict[Any, int] = {}
        self._failed: dict[Any, int] = {}
        self._clock = clock
        self._t0 = clock()
        self._lock = threading.Lock()
        self.version = 0  # bumped on every change (pollers compare it)

    def update(self, event: dict[str, Any]) -> bool:
        """Take a shard event (``shard``, ``done``, optional ``failed``); returns whether the counts changed."""
        shard = event.get("shard")
        with self._lock:
            done = max(self._done.get(shard, 0), int(event.get("done", 0)))
            failed = max(self._failed.get(shard, 0), int(event.get("failed", 0)))
            if done == self._done.get(shard) and failed == self._failed.get(shard):
                return False
            self._done[shard], self._failed[shard] = done, failed
            self.version += 1
            return True

    def snapshot(self) -> dict[str, Any]:
        """``done``, ``total``, ``failed``, ``rate`` (edits/s since the start) and ``eta`` (s, None while unknown)."""
        with self._lock:
            done, failed = sum(self._done.values()), sum(self._failed.values())
        elapsed = max(1e-9, self._clock() - self._t0)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else None
        return {
            "done": done,
            "total": self.total,
            "failed": failed,
            "rate": rate,
            "eta": eta,
            "elapsed": elapsed,
        }


def describe(snap: dict[str, Any]) -> str:
    """One line for the progress artifact: ``5/9 edits (1 failed), 0.42 edits/s, ETA 10s``."""
    eta = snap.get("eta")
    eta_text = "ETA --" if eta is None else f"ETA {format_seconds(eta)}"
    failed = f" ({snap['failed']} failed)" if snap.get("failed") else ""
    return f"{snap['done']}/{snap['total']} edits{failed}, {snap['rate']:.2f} edits/s, {eta_text}"


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ArtifactUpdater:
    """Pushes a :class:`RunProgress` to a Prefect progress artifact from a background thread, at most
    every `interval` seconds and only when it changed (the flow's thread is busy waiting on shards)."""

    def __init__(self, progress: RunProgress, artifact_id: Any, *, interval: float = 2.0) -> None:
        import contextvars

        self.progress, self.artifact_id, self.interval = progress, artifact_id, interval
        self._stop = threading.Event()
        self._seen = -1
        ctx = (
            contextvars.copy_context()
        )  # the flow run's Prefect context (client settings) for the thread
        self._thread = threading.Thread(
            target=ctx.run, args=(self._loop,), name="editflow-progress", daemon=True
        )

    def __enter__(self) -> ArtifactUpdater:
        if self.artifact_id is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self.artifact_id is not None:
            self._push()  # the final count, from the flow's own thread

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._push()

    def _push(self) -> None:
        if self.progress.version == self._seen:
            return
        self._seen = self.progress.version
        snap = self.progress.snapshot()
        from prefect.artifacts import update_progress_artifact

        try:
            pct = 100.0 * snap["done"] / snap["total"] if snap["total"] else 100.0
            update_progress_artifact(self.artifact_id, min(100.0, pct), description=describe(snap))
        except Exception as exc:  # noqa: BLE001 - a progress artifact is informative only
            logger.debug("could not update the progress artifact: %s: %s", type(exc).__name__, exc)


class RunWatch:
    """The flow's side of a run's progress: listens to its shards (this process and Dask workers), keeps a
    :class:`RunProgress`, passes ``{"progress": snapshot}`` to `notify` on every change and keeps a Prefect
    progress artifact current. `shard_edits` maps the shards of this fan-out to the edits they do now;
    `standing`, a rerun's shards to their edits finished before (a shard counts them as done from its
    start: they are left out of this run's progress)."""

    def __init__(
        self,
        run_id: str,
        shard_edits: dict[int, int],
        notify: Listener,
        *,
        task_runner: Any = None,
        artifact_key: str | None = None,
        standing: dict[int, int] | None = None,
    ) -> None:
        self.run_id, self.shard_edits, self.notify = run_id, dict(shard_edits), notify
        self.standing = dict(standing or {})
        self.progress = RunProgress(sum(self.shard_edits.values()))
        self._task_runner, self._artifact_key = task_runner, artifact_key
        self._listening: contextlib.ExitStack | None = None

    def start(self) -> RunWatch:
        """Start listening (call before submitting the shards) and create the progress artifact."""
        stack = contextlib.ExitStack()
        stack.enter_context(
            listen(self.run_id, self._on_event, dask_client=_safe_client(self._task_runner))
        )
        if self._artifact_key and self.shard_edits:
            from prefect.artifacts import create_progress_artifact

            artifact_id = create_progress_artifact(
                0.0, key=self._artifact_key, description=f"edits of run {self.run_id}"
            )
            stack.enter_context(ArtifactUpdater(self.progress, artifact_id))
        self._listening = stack
        self.notify({"progress": self.progress.snapshot()})
        return self

    def shard_finished(self, stats: dict[str, Any]) -> None:
        """A shard's final stats (or ``{"shard", "error"}``: all its edits count as failed)."""
        shard = stats.get("shard")
        edits = self.shard_edits.get(shard, stats.get("edits", 0))
        failed = edits if "error" in stats else stats.get("failed", 0)
        # as the shard counts: with its standing edits (``_on_event`` takes them off again)
        self._on_event(
            {"shard": shard, "done": edits + self.standing.get(shard, 0), "failed": failed}
        )

    def close(self) -> None:
        if self._listening is not None:
            self._listening.close()
            self._listening = None

    def _on_event(self, event: dict[str, Any]) -> None:
        if "stage" in event:
            if event.get("shard") in self.shard_edits:
                self.notify({"stage": event["stage"]})
            return
        shard = event.get("shard")
        if shard not in self.shard_edits:
            return
        if "done" in event and self.standing.get(shard):
            event = {**event, "done": max(0, int(event["done"]) - self.standing[shard])}
        if self.progress.update(event):
            self.notify({"progress": self.progress.snapshot()})


def _safe_client(task_runner: Any) -> Any | None:
    try:
        return dask_client_of(task_runner)
    except Exception as exc:  # noqa: BLE001 - progress then moves per shard only
        logger.warning("no per-edit progress from Dask (%s: %s)", type(exc).__name__, exc)
        return None
