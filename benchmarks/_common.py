"""Shared helpers of the benchmark scripts: machine facts, tables, JSON results, toy models, images, moto.

Nothing here is timed itself; every script imports it first (it also pins torch to one thread unless
BENCH_THREADS says otherwise, so that a benchmark does not oversubscribe a busy machine).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/NAME.py` from the repository root
    sys.path.insert(0, str(REPO_ROOT))

from storage.testing import CLEARED_AWS_ENV, FAKE_AWS_ENV  # noqa: E402

RESULTS_DIR = Path(
    os.environ.get("BENCH_RESULTS_DIR") or REPO_ROOT / "benchmarks" / "results"
)  # override for scratch runs

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
if os.environ.get("BENCH_POLICY_MODE") != "1":  # cpu_threads' policy workers start as editflow's do
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    os.environ.setdefault("MKL_NUM_THREADS", str(THREADS))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def setup_torch() -> None:
    """One intra-op thread (or BENCH_THREADS), quiet diffusers/transformers loading."""
    import torch

    torch.set_num_threads(THREADS)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_facts() -> dict[str, Any]:
    """Where and with what a result was measured (date, machine, versions, load at the start)."""
    import torch

    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        nproc = os.cpu_count() or 0
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = None
    facts: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "nproc": nproc,
        "cpu_count": os.cpu_count(),
        "mem_total_gb": _mem_total_gb(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "loadavg_at_start": load,
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    for pkg in ("diffusers", "transformers", "prefect", "pyarrow"):
        try:
            from importlib.metadata import version

            facts[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            pass
    return facts


def write_result(
    name: str, payload: dict[str, Any], *, facts: dict[str, Any] | None = None
) -> Path:
    """Write ``benchmarks/results/{name}.json`` with the machine facts and the payload."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "machine": facts or machine_facts(), **payload}
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    print(f"\nwrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return path


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: thousands separators for big numbers, a few significant digits for small ones."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        a = abs(value)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{value:,.0f}"
        if a >= 10:
            return f"{value:.1f}"
        if a >= 0.01:
            return f"{value:.{digits}f}"
        return f"{value:.{digits}g}"
    return str(value)


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    title: str | None = None,
    digits: int = 3,
) -> str:
    """A GitHub-markdown table (printed, and returned)."""
    cells = [[fmt(c, digits) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    lines = []
    if title:
        lines.append(f"\n### {title}\n")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for raw, r in zip(rows, cells):
        just = [
            c.rjust(w) if isinstance(v, (int, float)) or v is None else c.ljust(w)
            for v, c, w in zip(raw, r, widths)
        ]
        lines.append("| " + " | ".join(just) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def print_machine(facts: dict[str, Any]) -> None:
    print(
        f"# {facts['date']}  {facts['cpu']} x{facts['nproc']}  torch {facts['torch']} "
        f"({facts['torch_threads']} thread(s))  load {facts['loadavg_at_start']}  commit {facts['git_commit']}"
    )


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """``with timer() as t: ...`` then ``t['s']`` is the elapsed wall time in seconds."""
    box: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - start


# ---------------------------------------------------------------- models and images


def build_toy(folder: str | Path, spec_name: str = "TINY", seed: int = 0) -> Path:
    """A random-weight SD-shaped pipeline folder (refmodel.toy) built once under `folder`."""
    from refmodel import toy

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    return toy.build_toy_pipeline(folder, getattr(toy, spec_name), seed=seed)


def smooth_image(seed: int, size: int):
    """A smooth random RGB image (random-weight models make any content equally fine)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- counting UNet image-evaluations


class UNetCounter:
    """Counts UNet image-evaluations (batch rows) and calls through a forward pre-hook, plus the wall
    time spent inside the UNet's forward."""

    def __init__(self, unet) -> None:
        self.unet = unet
        self.rows = 0
        self.calls = 0
        self.seconds = 0.0
        self._start = 0.0
        self._handles: list[Any] = []

    def __enter__(self) -> UNetCounter:
        def pre(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            self.rows += int(sample.shape[0])
            self.calls += 1
            self._start = time.perf_counter()

        def post(module, args, kwargs, output):
            self.seconds += time.perf_counter() - self._start

        self._handles = [
            self.unet.register_forward_pre_hook(pre, with_kwargs=True),
            self.unet.register_forward_hook(post, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        self.rows, self.calls, self.seconds = 0, 0, 0.0


# ---------------------------------------------------------------- S3 (moto server)


@contextmanager
def moto_s3(tmp: str | Path) -> Iterator[str]:
    """A moto S3 server on a free localhost port with fake credentials; yields its endpoint URL.

    Numbers measured against it are a local HTTP server in the same process (the GIL is shared with
    the benchmark), not AWS: they bound the client-side cost, not a real network's latency.
    """
    from moto.server import ThreadedMotoServer

    saved = {
        k: os.environ.get(k)
        for k in (*FAKE_AWS_ENV, *CLEARED_AWS_ENV, "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
    }
    os.environ.update(FAKE_AWS_ENV)
    for k in CLEARED_AWS_ENV:
        os.environ.pop(k, None)
    empty = Path(tmp) / "aws-none"
    empty.write_text("")
    os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(empty)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_bucket(endpoint: str, name: str) -> str:
    from storage.s3 import get_s3_client

    get_s3_client(endpoint).create_bucket(Bucket=name)
    return name
