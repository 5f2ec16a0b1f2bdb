"""Helpers of the reliability suite: manifests and images on disk, output digests, CLI subprocesses."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.flows.conftest import STEPS, demo_rows, scene_png

REPO = Path(__file__).resolve().parents[2]


def scene_files(folder: Path, n: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"scene-{i}.png"
        p.write_bytes(scene_png(i))
        paths.append(str(p))
    return paths


def cli_output(argv: list[str], capsys) -> tuple[int, str]:
    """`editflow ARGV` in this process: its exit status and everything it printed (out, then err)."""
    from flows.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def write_rows(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def one_row(image: str, target: str = "a blue circle on a gray background", **kw) -> dict:
    row = {
        "image_uri": image,
        "source_prompt": "a red circle on a gray background",
        "target_prompt": target,
        "num_steps": STEPS,
    }
    return row | kw


def demo_manifest(tmp: Path, n_images: int = 3) -> tuple[str, list[str]]:
    images = scene_files(tmp / "images", n_images)
    return write_rows(tmp / "m.parquet", demo_rows(images)), images


def digests(root: Path, sub: str = "assets") -> dict[str, tuple[str, int, int]]:
    """relative path -> (sha256, inode, mtime_ns) of every regular file below root/sub."""
    out = {}
    base = root / sub
    if not base.exists():
        return out
    for p in sorted(base.rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[str(p.relative_to(root))] = (
                hashlib.sha256(p.read_bytes()).hexdigest(),
                st.st_ino,
                st.st_mtime_ns,
            )
    return out


def results(out: Path, run_id: str) -> list[dict]:
    files = sorted((out / "runs" / run_id / "results").glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def png_text(data: bytes) -> dict:
    from PIL import Image

    return dict(Image.open(io.BytesIO(data)).text)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
            "PREFECT_HOME": extra.pop("PREFECT_HOME", ""),
        }
    )
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}


def start_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python -m flows.cli ARGS` in its own process group, output to `log`."""
    f = open(log, "wb")  # noqa: SIM115 - closed by the caller through the process
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def wait_for(pred, timeout: float, step: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def children(pid: int) -> list[int]:
    """Every descendant process id of `pid` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    todo, found = [pid], []
    while todo:
        for c in kids.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
