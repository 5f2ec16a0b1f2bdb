"""The shard keeps the model busy (tasks.shard.run_shard, issue 21 item 6): sources are read ahead and
finished edits written behind in threads, the model lock is held for model work only, each chunk is
written as it finishes, outputs equal the sequential steps', and a failure in a reading or writing
thread fails its row or the shard, never lost and never hanging."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

import tasks.shard as shard_mod
from storage import keys
from storage.base import ObjectStore
from storage.cache import BlobCache
from storage.uri import open_store
from storage.writer import read_json
from tasks.shard import (
    edit_sources,
    judge_results,
    prepare_edits,
    prepare_sources,
    read_run_results,
    run_shard,
    write_jobs,
    write_outputs,
)
from tasks.worker import Behind, model_lock, read_ahead
from tests.tasks.conftest import row

WAIT = 60  # seconds a test waits for another thread before it fails (the machine may be loaded)


class Hooked(ObjectStore):
    """A store forwarding to `inner`, calling ``hook(op, key)`` before each get and put (the hook may
    block or raise); its children are hooked too."""

    def __init__(self, inner: ObjectStore, hook: Callable[[str, str], None]) -> None:
        self.inner, self.hook = inner, hook

    def get(self, key: str) -> bytes:
        self.hook("get", key)
        return self.inner.get(key)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        self.hook("put", key)
        return self.inner.put(key, data, if_absent=if_absent)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def uri(self, key: str = "") -> str:
        return self.inner.uri(key)

    def child(self, prefix: str) -> ObjectStore:
        return Hooked(self.inner.child(prefix), self.hook)


def hook_output(monkeypatch, run, hook: Callable[[str, str], None]) -> None:
    """run_shard's output store (and its cache, the output's child) hooked with `hook`."""
    real = shard_mod.open_store
    monkeypatch.setattr(
        shard_mod,
        "open_store",
        lambda uri, **kw: (
            Hooked(real(uri, **kw), hook) if uri == run.options.out else real(uri, **kw)
        ),
    )


def hook_reads(monkeypatch, hook: Callable[[str], None]) -> None:
    """``hook(uri)`` before each source read of the shard (it may block or raise)."""
    real = shard_mod.read_uri
    monkeypatch.setattr(shard_mod, "read_uri", lambda uri, **kw: hook(uri) or real(uri, **kw))


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict]:
    """`fn` started in a thread; its result or exception lands in the dict."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def lock_is_free(model) -> bool:
    """Whether this thread can take the model lock (within WAIT seconds); released at once."""
    lock = model_lock(model)
    if not lock.acquire(timeout=WAIT):
        return False
    lock.release()
    return True


# ---------------------------------------------------------------- the lock


@pytest.mark.parametrize("root", ["local"], indirect=True)
def test_the_model_lock_is_free_while_a_source_is_read_and_an_edit_is_written(
    model, make_run, root, monkeypatch
):
    run = make_run(root, [row("img:1"), row("img:2"), row("img:2", target="a green circle")])
    reading, read_go = threading.Event(), threading.Event()
    writing, write_go = threading.Event(), threading.Event()

    def slow_read(uri: str) -> None:
        if "img-2" in uri:
            reading.set()
            assert read_go.wait(WAIT)

    def slow_write(op: str, key: str) -> None:
        if op == "put" and key.startswith("assets/") and not writing.is_set():
            writing.set()
            assert write_go.wait(WAIT)

    hook_reads(monkeypatch, slow_read)
    hook_output(monkeypatch, run, slow_write)
    thread, box = in_thread(lambda: run_shard(run.options, run.run_id, 0))
    try:
        assert reading.wait(WAIT)
        assert lock_is_free(model)  # a source is being read: the model is not held for it
        read_go.set()
        assert writing.wait(WAIT)
        assert lock_is_free(model)  # an edit is being written (its put waits for us): same
    finally:
        read_go.set()
        write_go.set()
        thread.join(WAIT)
    assert not thread.is_alive() and "error" not in box
    assert (box["result"]["succeeded"], box["result"]["failed"]) == (3, 0)


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("root", ["local"], indirect=True)
def test_outputs_equal_the_sequential_steps_and_land_chunk_by_chunk(
    model, make_run, root, tmp_path, monkeypatch
):
    # 5 sources (two inversion batches: 4 + 1), PnP and P2P edits in chunks of 2
    rows = [row(f"img:{i}") for i in range(5)] + [
        row("img:0", target="a green circle", method="p2p"),
        row("img:1", target="a blue square"),
        row("img:3", target="a red square", method="p2p"),
    ]
    run = make_run(root, rows, max_batch=2)
    seq = make_run(str(tmp_path / "sequential"), rows, max_batch=2)
    # the sequential steps (the shard before the overlap): all sources, all edits, one judge, all writes
    cache = BlobCache(open_store(seq.options.cache_uri))
    todo = seq.shard().todo()
    sources = prepare_sources(model, todo, seq.options, cache).sources
    edits = prepare_edits(model, sources, seq.options, cache)
    edited = edit_sources(model, [g.group for g in edits.groups], seq.options)
    qa = judge_results(model, edits.groups, edited, seq.options)
    jobs, failed = write_jobs(model, seq.run_id, edits.groups, edited, seq.options, qa)
    assert not failed
    write_outputs(seq.out, "png", jobs)

    # the overlapped shard: edits are written while the engine still runs (before it returns)
    chunks: list[int] = []
    assets_when_edit_returned: list[int] = []
    real_edit = shard_mod.edit

    def edit_then_look(*args, on_chunk, **kwargs):
        out = real_edit(*args, on_chunk=lambda d: on_chunk(d) or chunks.append(d.targets), **kwargs)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not list(run.out.list("assets/")):
            time.sleep(0.01)
        assets_when_edit_returned.append(len(list(run.out.list("assets/"))))
        return out

    monkeypatch.setattr(shard_mod, "edit", edit_then_look)
    stats = run_shard(run.options, run.run_id, 0)
    assert (stats["succeeded"], stats["failed"]) == (8, 0)
    assert len(chunks) >= 4 and sum(chunks) == 8  # several chunks
    assert assets_when_edit_returned[0] >= 1  # written before the engine returned
    assert stats["inversions_computed"] == 5
    assert stats["qa_unet_evals"] == 8 * shard_mod.JUDGE.unet_evals()

    table = read_run_results(run.options, run.run_id)
    mine_rows = {r.edit_id: r for r in run.shard().rows}
    seq_rows = {(r.image_uri.rsplit("/", 1)[1], r.target_prompt): r for r in seq.shard().rows}
    for res in table.to_pylist():
        mine = mine_rows[res["edit_id"]]
        theirs = seq_rows[(mine.image_uri.rsplit("/", 1)[1], mine.target_prompt)]
        a = Image.open(run.out.uri(keys.asset_key(mine.edit_id, "png")))
        b = Image.open(seq.out.uri(keys.asset_key(theirs.edit_id, "png")))
        assert a.tobytes() == b.tobytes()  # pixel for pixel
        sa = read_json(run.out, keys.sidecar_key(mine.edit_id))
        sb = read_json(seq.out, keys.sidecar_key(theirs.edit_id))
        for k in ("unet_evals", "unet_evals_detail", "size", "inversion_cache_hit", "settings"):
            assert sa[k] == sb[k], k
        assert sa["qa"]["text"] == pytest.approx(sb["qa"]["text"], abs=1e-5)
        assert sa["qa"]["needs_review"] == sb["qa"]["needs_review"]


# ---------------------------------------------------------------- failures in the threads


@pytest.mark.parametrize("root", ["local"], indirect=True)
def test_a_failing_write_fails_its_edit_and_a_failing_read_its_source(
    model, make_run, root, monkeypatch
):
    rows = [row("img:1"), row("img:1", target="a green circle"), row("img:2"), row("img:3")]
    run = make_run(root, rows)
    bad_edit = run.shard().rows[1].edit_id

    def put_fails_once(op: str, key: str) -> None:
        if op == "put" and key == keys.asset_key(bad_edit, "png"):
            raise OSError("connection reset by peer")

    def read_fails(uri: str) -> None:
        if "img-3" in uri:
            raise ConnectionError("read timed out")

    hook_output(monkeypatch, run, put_fails_once)
    hook_reads(monkeypatch, read_fails)
    stats = run_shard(run.options, run.run_id, 0)
    assert (stats["succeeded"], stats["failed"]) == (2, 2)
    got = {r["edit_id"]: r for r in read_run_results(run.options, run.run_id).to_pylist()}
    assert got[bad_edit]["error"] == (
        "row 1: writing output failed: OSError: connection reset by peer"
    )
    third = run.shard().rows[3]
    assert got[third.edit_id]["error"].startswith(
        f"row 3: image_uri: could not read {third.image_uri}: ConnectionError: read timed out"
    )


@pytest.mark.parametrize("root", ["local"], indirect=True)
@pytest.mark.parametrize("where", ["cache put (written behind)", "cache get (read ahead)"])
def test_an_error_in_a_background_thread_fails_the_shard_without_hanging(
    model, make_run, root, monkeypatch, where
):
    run = make_run(root, [row("img:1"), row("img:2")])
    op = where.split()[1]

    def broken(o: str, key: str) -> None:
        if o == op and key.startswith("inversions/"):
            raise RuntimeError(f"cache {op} broke")

    hook_output(monkeypatch, run, broken)
    thread, box = in_thread(lambda: run_shard(run.options, run.run_id, 0))
    thread.join(WAIT)
    assert not thread.is_alive()
    assert isinstance(box.get("error"), RuntimeError) and str(box["error"]) == f"cache {op} broke"


# ---------------------------------------------------------------- the helpers


def test_behind_holds_back_the_producer_when_full_and_raises_a_jobs_error():
    gate = threading.Event()
    with Behind(threads=1, depth=2) as behind:
        behind.submit(gate.wait)
        behind.submit(lambda: None)
        third, box = in_thread(lambda: behind.submit(lambda: 1 / 0))
        time.sleep(0.2)
        assert third.is_alive()  # two jobs wait or run: the third submit waits for room
        gate.set()
        third.join(WAIT)
        assert not third.is_alive() and "error" not in box
        with pytest.raises(ZeroDivisionError):
            behind.drain()


def test_read_ahead_runs_at_most_depth_items_ahead_in_order():
    started: list[int] = []
    with ThreadPoolExecutor(4) as pool:
        jobs = read_ahead(pool, lambda i: started.append(i) or i * i, range(10), depth=3)
        first = next(jobs)
        assert first.result() == 0
        deadline = time.monotonic() + WAIT
        while len(started) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert sorted(started) == [0, 1, 2, 3]  # the taken one and 3 ahead, no more
        assert [j.result() for j in jobs] == [i * i for i in range(1, 10)]
