"""Bad inputs: manifests, URIs, images, prompts, models and CLI arguments. Each gets its exact error
(problem column / error class), a message naming row, column and file, and the other rows succeed."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.cli import main
from tests.flows.conftest import STEPS, scene_png

from .helpers import cli_output, results, scene_files, write_rows

pytestmark = pytest.mark.bad_input

GOOD = {"image_uri": "a.png", "source_prompt": "a red circle on a gray background", "target_prompt": "a blue circle on a gray background",
        "method": "pnp", "seed": 0, "num_steps": STEPS, "guidance_scale": 7.5, "settings": None, "edit_id": "good", "negative_prompt": ""}  # fmt: skip


# ---- rows that validation refuses: (column, value, reason); row 1 is bad, row 0 good
ROW_CASES = {
    "image_uri null": ("image_uri", None, "is null"),
    "image_uri empty": ("image_uri", "", "is empty"),
    "image_uri http": ("image_uri", "http://x/a.png", "unsupported URI scheme 'http://'"),
    "image_uri ftp": ("image_uri", "ftp://x/a.png", "unsupported URI scheme 'ftp://'"),
    "image_uri bucket only": ("image_uri", "s3://bucket", "names no object"),
    "source_prompt null": ("source_prompt", None, "is null"),
    "source_prompt blank": ("source_prompt", "   ", "is empty"),
    "target_prompt null": ("target_prompt", None, "is null"),
    "method unknown": ("method", "magic", "unknown method 'magic'"),
    "num_steps 0": ("num_steps", 0, "num_steps must be in [1, 1000], got 0"),
    "num_steps 5000": ("num_steps", 5000, "got 5000"),
    "guidance low": ("guidance_scale", 0.5, "guidance_scale must be a number in [1, 30]"),
    "guidance nan": ("guidance_scale", float("nan"), "got nan"),
    "settings not json": ("settings", "not json", "not valid JSON"),
    "settings unknown key": ("settings", '{"bogus": 1}', "unknown pnp setting(s) ['bogus']"),
    "settings list": ("settings", "[1,2]", "must be a JSON object"),
    "settings out of range": ("settings", '{"feature_t": 2}', "feature_t must be a fraction"),
    "p2p kind": ("settings", '{"kind": "nope"}', "kind must be one of"),
    "negative prompt conflict": (
        "negative_prompt",
        "b",
        "disagrees with settings' negative_prompt",
    ),
    "edit_id traversal": ("edit_id", "../x", "is not key-safe"),
    "edit_id slash": ("edit_id", "a/b", "is not key-safe"),
    "edit_id control": ("edit_id", "a\x01b", "is not key-safe"),
    "edit_id bytes": ("edit_id", "\U0001f600" * 60, "240 bytes in UTF-8"),
}


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_row_refused_by_validation(tmp_path, capsys, case):
    column, value, reason = ROW_CASES[case]
    bad = dict(GOOD, edit_id="bad")
    bad[column] = value
    if case == "p2p kind":
        bad["method"] = "p2p"
    if case == "negative prompt conflict":
        bad["settings"] = '{"negative_prompt": "a"}'
    path = write_rows(tmp_path / "m.parquet", [GOOD, bad])
    code, text = cli_output(["validate", path, "--no-check-sources"], capsys)
    assert code == 2
    assert f"row 1, column '{column}'" in text and reason in text, text
    assert "row 0" not in text and path in text and "Traceback" not in text


# ---- manifest-level problems: (what, expected column or None, reason)
def _manifest(case: str, tmp_path: Path) -> str:
    if case == "column named twice":
        t = pa.Table.from_arrays([pa.array(["a.png"]), pa.array(["x"]), pa.array(["y"]), pa.array(["z"])],
                                 names=["image_uri", "source_prompt", "target_prompt", "target_prompt"])  # fmt: skip
    elif case == "required column missing":
        t = pa.table({"image_uri": ["a.png"], "source_prompt": ["x"]})
    elif case == "reserved column":
        t = pa.Table.from_pylist([dict(GOOD, status="done")])
    elif case == "wrong column type":
        t = pa.Table.from_pylist([dict(GOOD, seed="zero")])
    elif case == "no rows":
        t = pa.Table.from_pylist([GOOD]).slice(0, 0)
    elif case == "not parquet":
        p = tmp_path / "m.parquet"
        p.write_text("image_uri,source_prompt\n")
        return str(p)
    elif case == "missing file":
        return str(tmp_path / "nowhere.parquet")
    elif case == "files disagree":
        folder = tmp_path / "m"
        write_rows(folder / "a.parquet", [GOOD])
        write_rows(folder / "b.parquet", [{k: v for k, v in GOOD.items() if k != "seed"}])
        return str(folder)
    else:
        raise AssertionError(case)
    path = tmp_path / "m.parquet"
    pq.write_table(t, path)
    return str(path)


MANIFEST_CASES = {
    "column named twice": ("target_prompt", "column appears 2 times"),
    "required column missing": ("target_prompt", "required column is missing"),
    "reserved column": ("status", "reserved for the results table"),
    "wrong column type": ("seed", "seed"),
    "no rows": (None, "manifest is empty"),
    "not parquet": (None, "cannot read as Parquet"),
    "missing file": (None, "no manifest file or folder at"),
    "files disagree": (None, "manifest files disagree on columns"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_refused(tmp_path, capsys, case):
    column, reason = MANIFEST_CASES[case]
    path = _manifest(case, tmp_path)
    code, text = cli_output(["validate", path], capsys)
    assert code == 2 and reason in text and "Traceback" not in text, text
    assert path in text
    if column is not None:
        assert f"column '{column}'" in text


# ---- rows that fail at run time: their row fails with its class and reason, the others succeed
def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def _tiff(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="TIFF")
    return buf.getvalue()


RUNTIME_CASES = {  # name -> (file bytes or None for special, error substrings)
    "missing file": (None, ["image_uri: no such file: /"]),
    "text file": (b"hello, not an image", ["is not a readable image", "UnidentifiedImageError"]),
    "zero bytes": (b"", ["is not a readable image", "UnidentifiedImageError"]),
    "truncated png": (scene_png(0)[: len(scene_png(0)) // 2], ["is not a readable image"]),
    "decompression bomb": (
        _png_header_only(20000, 20000),
        ["is not a readable image", "DecompressionBombError"],
    ),
    "thin image": ("thin", ["UnsupportedImage", "aspect ratio"]),
    "folder": ("folder", ["image_uri: could not read", "is a folder"]),
    "float pixels out of range": (
        _tiff(np.full((16, 16), 1000.0, np.float32), "F"),
        ["UnsupportedImage", "0..1 or 0..255"],
    ),
    "float pixels nan": (
        _tiff(np.full((16, 16), np.nan, np.float32), "F"),
        ["UnsupportedImage", "NaN"],
    ),
    "negative int pixels": (
        _tiff(np.full((16, 16), -5, np.int32), "I"),
        ["UnsupportedImage", "integer pixels span -5..-5"],
    ),
    "bad crc png": ("badcrc", ["is not a readable image"]),
    "missing s3 object": ("s3-missing", ["image_uri: no object at s3://"]),
    "missing s3 bucket": (
        "s3-nobucket",
        ["image_uri: no object at s3://no-such-bucket-editflow/a.png"],
    ),
}


@pytest.fixture(scope="module")
def runtime_run(tmp_path_factory, prefect_server, flow_model, s3_server, s3_client):
    tmp = tmp_path_factory.mktemp("runtime")
    good = scene_files(tmp / "good", 2)
    bucket = "bad-inputs-images"
    s3_client.create_bucket(Bucket=bucket)
    rows, where = [], {}
    for name, (data, _) in RUNTIME_CASES.items():
        path = tmp / "bad" / f"{name.replace(' ', '-')}.img"
        path.parent.mkdir(exist_ok=True)
        if data is None:
            uri = str(path)
        elif data == "thin":
            Image.new("RGB", (1, 100), (100, 50, 20)).save(path, format="PNG")
            uri = str(path)
        elif data == "folder":
            path.mkdir()
            uri = str(path)
        elif data == "badcrc":
            b = bytearray(scene_png(1))
            b[29] ^= 0xFF  # inside the IHDR chunk's CRC
            path.write_bytes(bytes(b))
            uri = str(path)
        elif data == "s3-missing":
            uri = f"s3://{bucket}/missing.png"
        elif data == "s3-nobucket":
            uri = "s3://no-such-bucket-editflow/a.png"
        else:
            path.write_bytes(data)
            uri = str(path)
        where[name] = len(rows)
        rows.append(dict(GOOD, image_uri=uri, edit_id=f"bad-{len(rows)}"))
    first_good = len(rows)
    rows += [
        dict(GOOD, image_uri=good[0], edit_id="good-0"),
        dict(
            GOOD,
            image_uri=good[1],
            edit_id="good-1",
            target_prompt="a red square on a gray background",
        ),
    ]
    manifest = write_rows(tmp / "m.parquet", rows)
    out = tmp / "out"
    code = main(
        [
            "run",
            manifest,
            "--out",
            str(out),
            "--model",
            flow_model,
            "--run-id",
            "bad",
            "--s3-endpoint",
            s3_server,
        ]
    )
    return {
        "code": code,
        "rows": {r["row"]: r for r in results(out, "bad")},
        "where": where,
        "good": [first_good, first_good + 1],
    }


@pytest.mark.parametrize("case", list(RUNTIME_CASES))
def test_row_fails_at_run_time_alone(runtime_run, case):
    assert runtime_run["code"] == 1
    row = runtime_run["where"][case]
    r = runtime_run["rows"][row]
    assert r["status"] == "failed"
    assert r["error"].startswith(f"row {row}: image_uri"), r["error"]
    for part in RUNTIME_CASES[case][1]:
        assert part in r["error"], r["error"]
    assert all(runtime_run["rows"][g]["status"] == "succeeded" for g in runtime_run["good"])


# ---- command-line arguments: one line naming the argument, exit 2
def _pickle_only_model(tmp: Path, model: str) -> str:
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp / "pickled"
    if not folder.exists():
        shutil.copytree(model, folder)
        for st in list(folder.rglob("*.safetensors")):
            name = (
                "pytorch_model.bin"
                if st.name == "model.safetensors"
                else st.name.replace(".safetensors", ".bin")
            )
            torch.save(load_file(st), st.with_name(name))
            st.unlink()
    return str(folder)


ARG_CASES = {
    "shard-size 0": (["--shard-size", "0"], "--shard-size"),
    "shard-size negative": (["--shard-size", "-3"], "--shard-size"),
    "shard-size text": (["--shard-size", "many"], "--shard-size"),
    "max-batch 0": (["--max-batch", "0"], "--max-batch"),
    "out ftp": (["--out", "ftp://host/x"], "--out"),
    "out s3 without bucket": (["--out", "s3:///x"], "--out"),
    "cache ftp": (["--cache", "ftp://host/c"], "--cache"),
    "run-id traversal": (["--run-id", "../x"], "run_id"),
    "run-id slash": (["--run-id", "a/b"], "run_id"),
    "format bmp": (["--format", "bmp"], "--format"),
    "dtype int8": (["--dtype", "int8"], "--dtype"),
    "model missing": (["--model", "/no/such/model"], "--model /no/such/model"),
    "model not diffusers": (["--model", "EMPTY"], "no unet/ subfolder"),
    "model pickle only": (["--model", "PICKLED"], "pickle"),
}


@pytest.mark.parametrize("case", list(ARG_CASES))
def test_bad_argument_is_one_line(tmp_path, capsys, flow_model, case):
    extra, expect = ARG_CASES[case]
    extra = [
        str(tmp_path)
        if a == "EMPTY"
        else _pickle_only_model(tmp_path, flow_model)
        if a == "PICKLED"
        else a
        for a in extra
    ]
    manifest = write_rows(
        tmp_path / "m.parquet", [dict(GOOD, image_uri=scene_files(tmp_path / "img", 1)[0])]
    )
    argv = ["run", manifest, "--out", str(tmp_path / "out"), "--model", flow_model, *extra]
    code, text = cli_output(argv, capsys)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2 and expect in text and "Traceback" not in text, text
    assert len(lines) == 1, text
    assert not (tmp_path / "out" / "assets").exists()


def test_rerun_of_unknown_run_is_one_line(tmp_path, capsys):
    code, text = cli_output(["rerun", "nope", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "no run nope" in text and len(text.strip().splitlines()) == 1
