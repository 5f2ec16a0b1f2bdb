"""One failing-first test per defect of issue 9 (each failed on the code before its fix)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.cli import main

from .helpers import one_row, png_text, results, scene_files, write_rows

pytestmark = pytest.mark.fault


def _entries(out: Path) -> list[Path]:
    return sorted((out / "cache" / "inversions").rglob("*.safetensors"))


def _gradient(w: int = 64, h: int = 64) -> np.ndarray:
    """An 8-bit RGB gradient (a mid-grey mean, no clipping anywhere)."""
    x = np.linspace(40, 220, w)[None, :, None]
    y = np.linspace(0, 60, h)[:, None, None]
    return (
        np.clip(x + y * np.array([1.0, 0.0, -0.5]), 0, 255)
        .round()
        .astype(np.uint8)
        .repeat(h, 0)[:h]
    )


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out + cap.err


# ---- 1. the inversion cache trusts its payload
@pytest.mark.parametrize("damage", ["flip-sign-bits", "nan"])
def test_damaged_cache_entry_is_recomputed_and_replaced(
    prefect_server, flow_model, tmp_path, capsys, editflow_log, damage
):
    [img] = scene_files(tmp_path / "img", 1)
    clean, out = tmp_path / "clean", tmp_path / "out"
    m2 = write_rows(tmp_path / "m2.parquet", [one_row(img, "a red square on a gray background")])
    assert _run(["run", m2, "--out", str(clean), "--model", flow_model], capsys)[0] == 0
    reference = next((clean / "assets").glob("*.png")).read_bytes()
    m1 = write_rows(tmp_path / "m1.parquet", [one_row(img)])
    assert _run(["run", m1, "--out", str(out), "--model", flow_model], capsys)[0] == 0
    [entry] = _entries(out)
    data = bytearray(entry.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    start, end = header["latents"]["data_offsets"]
    body = 8 + n
    if damage == "flip-sign-bits":
        for i in range(
            body + start + 3, body + end, 4
        ):  # fp32 little-endian: the sign bit is in byte 3
            data[i] ^= 0x80
    else:
        data[body + start : body + start + 4] = np.float32(np.nan).tobytes()
    entry.write_bytes(bytes(data))
    code, text = _run(
        ["run", m2, "--out", str(out), "--model", flow_model, "--run-id", "after"], capsys
    )
    assert code == 0, text
    assert "inversions: 1 computed, 0 from cache" in text
    assert "corrupt" in editflow_log.text and "recomputing" in editflow_log.text
    [fixed] = _entries(out)
    assert fixed.read_bytes() != bytes(data)  # replaced
    [row] = results(out, "after")
    edited = Path(row["output_uri"]).read_bytes()
    a = np.asarray(Image.open(io.BytesIO(edited)), np.float64)
    b = np.asarray(Image.open(io.BytesIO(reference)), np.float64)
    assert np.abs(a - b).max() == 0  # the same edit as with a clean cache
    # the replaced entry is used as it is by the next run
    m3 = write_rows(tmp_path / "m3.parquet", [one_row(img, "a red circle on a white background")])
    assert (
        "inversions: 0 computed, 1 from cache"
        in _run(["run", m3, "--out", str(out), "--model", flow_model], capsys)[1]
    )


def test_nonfinite_cache_entry_with_a_valid_checksum_is_recomputed(
    prefect_server, flow_model, tmp_path, capsys, editflow_log
):
    import torch

    from editing.inversion import Inversion
    from storage.cache import seal

    [img] = scene_files(tmp_path / "img", 1)
    out = tmp_path / "out"
    m1 = write_rows(tmp_path / "m1.parquet", [one_row(img)])
    assert _run(["run", m1, "--out", str(out), "--model", flow_model], capsys)[0] == 0
    [entry] = _entries(out)
    inv = Inversion.from_bytes(entry.read_bytes())
    inv.corrections = inv.corrections.clone()
    inv.corrections[0].fill_(float("nan"))
    entry.write_bytes(seal(inv.to_bytes()))
    m2 = write_rows(tmp_path / "m2.parquet", [one_row(img, "a red square on a gray background")])
    code, text = _run(["run", m2, "--out", str(out), "--model", flow_model], capsys)
    assert code == 0, text
    assert "non-finite" in editflow_log.text
    assert torch.isfinite(Inversion.from_bytes(_entries(out)[0].read_bytes()).corrections).all()


# ---- 2. reusing --run-id replaced another run
def test_existing_run_id_is_refused_and_the_first_run_kept(
    prefect_server, flow_model, tmp_path, capsys
):
    [img] = scene_files(tmp_path / "img", 1)
    out = tmp_path / "out"
    m1 = write_rows(tmp_path / "m1.parquet", [one_row(img)])
    assert (
        _run(["run", m1, "--out", str(out), "--model", flow_model, "--run-id", "r1"], capsys)[0]
        == 0
    )
    before = {p: p.read_bytes() for p in (out / "runs" / "r1").rglob("*") if p.is_file()}
    m2 = write_rows(tmp_path / "m2.parquet", [one_row(img, "a red square on a gray background")])
    code, text = _run(
        ["run", m2, "--out", str(out), "--model", flow_model, "--run-id", "r1"], capsys
    )
    assert code == 2
    assert "run r1 already exists" in text and str(out) in text and "Traceback" not in text
    after = {p: p.read_bytes() for p in (out / "runs" / "r1").rglob("*") if p.is_file()}
    assert after == before


# ---- 3. an asset found without its sidecar was adopted unchecked
def test_orphan_asset_of_another_prompt_is_not_adopted(
    prefect_server, flow_model, tmp_path, capsys
):
    [img] = scene_files(tmp_path / "img", 1)
    out = tmp_path / "out"
    m1 = write_rows(tmp_path / "m1.parquet", [one_row(img, edit_id="e1")])
    assert _run(["run", m1, "--out", str(out), "--model", flow_model], capsys)[0] == 0
    (out / "assets" / "e1.json").unlink()  # a crash between the image write and the sidecar write
    m2 = write_rows(
        tmp_path / "m2.parquet", [one_row(img, "a red square on a gray background", edit_id="e1")]
    )
    assert _run(["run", m2, "--out", str(out), "--model", flow_model], capsys)[0] == 0
    side = json.loads((out / "assets" / "e1.json").read_text())
    data = (out / "assets" / "e1.png").read_bytes()
    assert side["target_prompt"] == "a red square on a gray background"
    assert json.loads(png_text(data)["editflow"])["target_prompt"] == side["target_prompt"]
    import hashlib

    assert side["output_sha256"] == hashlib.sha256(data).hexdigest()


def test_symlink_and_non_image_in_assets_are_not_adopted(
    prefect_server, flow_model, tmp_path, capsys
):
    [img] = scene_files(tmp_path / "img", 1)
    out = tmp_path / "out"
    (out / "assets").mkdir(parents=True)
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not yours")
    (out / "assets" / "e2.png").symlink_to(outside)
    (out / "assets" / "e3.png").write_text("hello")
    rows = [
        one_row(img, edit_id="e2"),
        one_row(img, "a red square on a gray background", edit_id="e3"),
    ]
    assert (
        _run(
            [
                "run",
                write_rows(tmp_path / "m.parquet", rows),
                "--out",
                str(out),
                "--model",
                flow_model,
            ],
            capsys,
        )[0]
        == 0
    )
    assert outside.read_bytes() == b"not yours"
    for e in ("e2", "e3"):
        p = out / "assets" / f"{e}.png"
        assert p.is_file() and not p.is_symlink()
        assert json.loads(png_text(p.read_bytes())["editflow"])["edit_id"] == e


# ---- 4. 16-bit PNGs were clipped to white
def test_16_bit_png_is_scaled_not_clipped(prefect_server, flow_model, tmp_path, capsys):
    g8 = _gradient()
    folder = tmp_path / "img"
    folder.mkdir()
    Image.fromarray(g8).save(folder / "rgb8.png")
    grey = g8.mean(axis=2).round().astype(np.uint8)
    Image.fromarray(grey).convert("RGB").save(folder / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "grey16.png")  # I;16
    assert Image.open(folder / "grey16.png").mode.startswith("I")
    rows = [
        one_row(str(folder / "grey8.png"), edit_id="g8"),
        one_row(str(folder / "grey16.png"), edit_id="g16"),
    ]
    assert (
        _run(
            [
                "run",
                write_rows(tmp_path / "m.parquet", rows),
                "--out",
                str(tmp_path / "out"),
                "--model",
                flow_model,
            ],
            capsys,
        )[0]
        == 0
    )
    a = np.asarray(Image.open(tmp_path / "out" / "assets" / "g8.png"), np.float64)
    b = np.asarray(Image.open(tmp_path / "out" / "assets" / "g16.png"), np.float64)
    assert np.abs(a - b).max() <= 2  # the same picture, not a white one


# ---- 5. rerun took model and allow_pickle from plan.json in the output storage
def test_rerun_does_not_take_model_or_allow_pickle_from_stored_plan(
    prefect_server, flow_model, tmp_path, capsys
):
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-model"
    shutil.copytree(flow_model, pickled)
    for st in list(pickled.rglob("*.safetensors")):  # the same weights as pickle files only
        name = (
            "pytorch_model.bin"
            if st.name == "model.safetensors"
            else st.name.replace(".safetensors", ".bin")
        )
        torch.save(load_file(st), st.with_name(name))
        st.unlink()
    assert not list(pickled.rglob("*.safetensors"))
    images = scene_files(tmp_path / "img", 1)
    missing = tmp_path / "img" / "later.png"
    rows = [one_row(images[0]), one_row(str(missing), "a red square on a gray background")]
    out = tmp_path / "out"
    assert (
        _run(
            [
                "run",
                write_rows(tmp_path / "m.parquet", rows),
                "--out",
                str(out),
                "--model",
                flow_model,
                "--run-id",
                "r1",
            ],
            capsys,
        )[0]
        == 1
    )
    plan_path = out / "runs" / "r1" / "plan.json"
    plan = json.loads(plan_path.read_text())
    plan["options"].update(model=str(pickled), allow_pickle=True)  # whoever can write the bucket
    plan_path.write_text(json.dumps(plan))
    missing.write_bytes(Path(images[0]).read_bytes())
    code, text = _run(["rerun", "r1", "--out", str(out), "--model", flow_model], capsys)
    assert code == 2 and "plan.json" in text and str(pickled) in text and "Traceback" not in text
    code, text = _run(["rerun", "r1", "--out", str(out), "--model", str(pickled)], capsys)
    assert (
        code == 2 and "pickle" in text and "Traceback" not in text
    )  # the plan's model, no --allow-pickle: refused
    for side in (out / "assets").glob("*.json"):
        assert json.loads(side.read_text())["model_id"] == flow_model


# ---- 6. output size had no upper bound for thin images
def test_thin_image_fails_its_row_with_a_clear_error(prefect_server, flow_model, tmp_path, capsys):
    [img] = scene_files(tmp_path / "img", 1)
    thin = tmp_path / "img" / "thin.png"
    Image.new("RGB", (1, 1000), (120, 60, 200)).save(thin)
    rows = [one_row(str(thin)), one_row(img, "a red square on a gray background")]
    out = tmp_path / "out"
    code, text = _run(
        [
            "run",
            write_rows(tmp_path / "m.parquet", rows),
            "--out",
            str(out),
            "--model",
            flow_model,
            "--run-id",
            "r",
        ],
        capsys,
    )
    assert code == 1
    by_row = {r["row"]: r for r in results(out, "r")}
    assert by_row[1]["status"] == "succeeded"
    assert by_row[0]["status"] == "failed"
    assert (
        "row 0: image_uri" in by_row[0]["error"]
        and "1x1000" in by_row[0]["error"]
        and "aspect ratio" in by_row[0]["error"]
    )


# ---- 7. validate counted edit-id characters, not bytes; a column named twice crashed it
def test_validate_counts_edit_id_bytes(tmp_path, capsys):
    path = write_rows(
        tmp_path / "m.parquet",
        [one_row("a.png", edit_id="\U0001f600" * 100), one_row("b.png", edit_id="x" * 200)],
    )
    code, text = _run(["validate", path, "--no-check-sources"], capsys)
    assert code == 2
    assert "row 0, column 'edit_id'" in text and "400 bytes" in text
    assert "row 1" not in text


def test_validate_reports_a_column_named_twice(tmp_path, capsys):
    t = pa.Table.from_arrays([pa.array(["a.png"]), pa.array(["x"]), pa.array(["y"]), pa.array(["z"])],
                             names=["image_uri", "source_prompt", "target_prompt", "target_prompt"])  # fmt: skip
    pq.write_table(t, tmp_path / "dup.parquet")
    code, text = _run(["validate", str(tmp_path / "dup.parquet")], capsys)
    assert code == 2
    assert "column 'target_prompt'" in text and "2 times" in text and "Traceback" not in text


# ---- 8. bad arguments and unreachable storage printed tracebacks and exited 1
@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--shard-size", "0"], "--shard-size"),
        (["--max-batch", "0"], "--max-batch"),
        (["--out", "ftp://host/x"], "ftp://"),
        (["--run-id", "../x"], "run_id"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, capsys, extra, expect):
    m = write_rows(tmp_path / "m.parquet", [one_row("a.png")])
    argv = ["run", m, "--out", str(tmp_path / "out"), *extra]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors exit 2 with usage and one error line
        code = exc.code
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert code == 2 and expect in text and "Traceback" not in text
    assert len([ln for ln in text.splitlines() if ln.strip()]) <= 2


def test_rerun_of_an_unknown_run_is_one_line(tmp_path, capsys):
    code, text = _run(["rerun", "nope", "--out", str(tmp_path / "out")], capsys)
    assert (
        code == 2
        and "no run nope" in text
        and "Traceback" not in text
        and len(text.strip().splitlines()) == 1
    )


def test_unreachable_s3_endpoint_is_one_line(tmp_path, capsys, aws_env):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    m = write_rows(tmp_path / "m.parquet", [one_row("a.png")])
    code, text = _run(
        ["run", m, "--out", "s3://bucket/out", "--s3-endpoint", f"http://127.0.0.1:{port}"], capsys
    )
    assert code == 3 and f"127.0.0.1:{port}" in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1
