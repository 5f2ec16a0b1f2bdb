"""Hostile models (issue 23): a corrupt or truncated single-file checkpoint, a LoRA that does not fit the
UNet, pickle files without --allow-pickle, a hub id that is not cached: each is one line, exit 2, before
any run id is claimed (nothing under --out/runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.editing.test_model_forms import fake_hub_cache, make_lora

from .helpers import cli_output, scene_files, write_rows
from .test_bad_inputs import GOOD


def _single_file(tmp: Path) -> Path:
    """A safetensors file in the original SD key layout (its values do not matter to the checks)."""
    path = tmp / "model.safetensors"
    tensors = {f"{p}w{i}": torch.randn(64, 64) for i, p in enumerate(
        ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))}  # fmt: skip
    save_file(tensors, path)
    return path


def _truncated(tmp: Path) -> str:
    data = _single_file(tmp).read_bytes()
    path = tmp / "truncated.safetensors"
    path.write_bytes(data[: len(data) - 5000])
    return str(path)


def _corrupt(tmp: Path) -> str:
    path = tmp / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    return str(path)


def _unet_only(tmp: Path, model: str) -> str:
    path = tmp / "unet-only.safetensors"
    shutil.copy(Path(model) / "unet" / "diffusion_pytorch_model.safetensors", path)
    return str(path)


def _pickle_ckpt(tmp: Path) -> str:
    path = tmp / "model.ckpt"
    torch.save({"state_dict": {}}, path)
    return str(path)


def _mismatched_lora(tmp: Path, model: str) -> str:
    """The model's own LoRA with one layer's A widened: its shape does not fit that UNet layer."""
    good = make_lora(Path(model), tmp / "lora-good")
    state = load_file(good)
    key = next(k for k in state if "lora_A" in k)
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 3)
    path = tmp / "mismatched.safetensors"
    save_file(state, path)
    return str(path)


def _foreign_lora(tmp: Path, model: str) -> str:
    """A LoRA for a layer this UNet does not have."""
    state = load_file(make_lora(Path(model), tmp / "lora-foreign"))
    renamed = {k.replace("down_blocks.0", "down_blocks.7"): v for k, v in state.items()}
    path = tmp / "foreign.safetensors"
    save_file(renamed, path)
    return str(path)


def _pickle_lora(tmp: Path, model: str) -> str:
    path = tmp / "style.bin"
    torch.save(load_file(make_lora(Path(model), tmp / "lora-pickle")), path)
    return str(path)


CASES = {
    "single file truncated": (lambda t, m: ["--model", _truncated(t)], "truncated or corrupt"),
    "single file corrupt": (lambda t, m: ["--model", _corrupt(t)], "truncated or corrupt"),
    "single file not a whole SD": (lambda t, m: ["--model", _unet_only(t, m)], "not a single-file Stable Diffusion checkpoint"),
    "single file pickle": (lambda t, m: ["--model", _pickle_ckpt(t)], "pickle checkpoint"),
    "lora shape mismatch": (lambda t, m: ["--lora", _mismatched_lora(t, m) + "@0.5"], "the adapter was trained for another model"),
    "lora unknown layer": (lambda t, m: ["--lora", _foreign_lora(t, m)], "does not exist in this model's unet"),
    "lora pickle": (lambda t, m: ["--lora", _pickle_lora(t, m)], "pickle LoRA"),
    "lora missing": (lambda t, m: ["--lora", str(t / "nope.safetensors")], "no such file, folder or cached hub id"),
    "lora bad scale": (lambda t, m: ["--lora", "x.safetensors@nan"], "the scale must be a number"),
    "model config missing": (lambda t, m: ["--model", str(_single_file(t)), "--model-config", str(t / "none")], "is not a diffusers config folder"),
    "model path missing": (lambda t, m: ["--model", str(t / "gone.safetensors")], "does not exist (no such folder or file, and not a hub id)"),
    "hub id not cached": (lambda t, m: ["--model", "acme/absent"], "add --download to fetch it once"),
    "hub revision not cached": (lambda t, m: ["--model", "acme/tiny-sd", "--revision", "c" * 40], "--revision " + "c" * 40),
    "download offline": (lambda t, m: ["--model", "acme/absent", "--download"], "could not download 'acme/absent'"),
}  # fmt: skip


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_model_is_one_line_before_any_run(tmp_path, capsys, flow_model, monkeypatch, case):
    import huggingface_hub.constants as hc

    monkeypatch.setenv(
        "HF_HUB_CACHE", str(fake_hub_cache(tmp_path / "hub", "acme/tiny-sd", Path(flow_model)))
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # read at import: nothing may reach the network
    make, expect = CASES[case]
    extra = make(tmp_path, flow_model)
    manifest = write_rows(
        tmp_path / "m.parquet", [dict(GOOD, image_uri=scene_files(tmp_path / "img", 1)[0])]
    )
    argv = ["run", manifest, "--out", str(tmp_path / "out"), "--model", flow_model, *extra]
    code, text = cli_output(argv, capsys)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2 and expect in text and "Traceback" not in text, text
    assert len(lines) == 1, text
    assert not (tmp_path / "out" / "runs").exists()  # no run id claimed


@pytest.mark.filterwarnings("ignore")
def test_run_records_revision_and_lora(tmp_path, capsys, prefect_server, flow_model, monkeypatch):
    """A hub id run at a pinned commit, then at main with another LoRA scale: the plan pins each run's
    commit, and every sidecar and inversion key records the commit and the adapter's scale."""
    import huggingface_hub.constants as hc

    from tests.editing.test_model_forms import COMMITS

    from .helpers import results

    monkeypatch.setenv(
        "HF_HUB_CACHE", str(fake_hub_cache(tmp_path / "hub", "acme/tiny-sd", Path(flow_model)))
    )
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    lora = make_lora(Path(flow_model), tmp_path / "lora")
    manifest = write_rows(
        tmp_path / "m.parquet", [dict(GOOD, image_uri=scene_files(tmp_path / "img", 1)[0])]
    )
    seen = {}
    for run_id, extra in (("pinned", ["--revision", COMMITS[0], "--lora", f"{lora}@0.5"]),
                          ("main", ["--lora", f"{lora}@1"])):  # fmt: skip
        out = tmp_path / run_id  # one output root each: an edit id is finished once per root
        argv = ["run", manifest, "--out", str(out), "--cache", str(tmp_path / "cache"),
                "--model", "acme/tiny-sd", "--run-id", run_id, *extra]  # fmt: skip
        code, text = cli_output(argv, capsys)
        assert code == 0, text
        plan = json.loads((out / "runs" / run_id / "plan.json").read_text())
        [row] = results(out, run_id)
        side = json.loads(Path(row["metadata_uri"]).read_text())
        seen[run_id] = (plan["options"], side)
    (p_opts, p_side), (m_opts, m_side) = seen["pinned"], seen["main"]
    assert p_opts["revision"] == COMMITS[0] and m_opts["revision"] == COMMITS[1]  # main, resolved
    assert p_opts["loras"] == [f"{lora}@0.5"] and m_opts["loras"] == [f"{lora}@1"]
    assert p_side["model_id"] == "acme/tiny-sd"
    p_rev, m_rev = p_side["model_revision"], m_side["model_revision"]
    assert p_rev.startswith(COMMITS[0] + "+lora-") and p_rev.endswith("@0.5")
    assert m_rev.startswith(COMMITS[1] + "+lora-") and m_rev.endswith("@1")
    assert p_side["inversion_key"] != m_side["inversion_key"]
    assert not p_side["inversion_cache_hit"] and not m_side["inversion_cache_hit"]


def test_run_of_a_single_file_records_its_hash(tmp_path, capsys, prefect_server):
    """The bundled model as one .safetensors file runs through the CLI with the default --model-config
    (the bundled folder); sidecars record the file's hash as the model revision."""
    from editing.model_forms import file_sha256
    from refmodel import REFERENCE_MODEL_DIR
    from tests.editing.test_model_forms import save_single_file

    from .helpers import results

    single = save_single_file(Path(REFERENCE_MODEL_DIR), tmp_path / "shapes-v2.safetensors")
    manifest = write_rows(
        tmp_path / "m.parquet", [dict(GOOD, image_uri=scene_files(tmp_path / "img", 1)[0])]
    )
    out = tmp_path / "out"
    argv = ["run", manifest, "--out", str(out), "--model", str(single), "--run-id", "single"]
    code, text = cli_output(argv, capsys)
    assert code == 0, text
    [row] = results(out, "single")
    side = json.loads(Path(row["metadata_uri"]).read_text())
    assert side["model_id"] == str(single)
    assert side["model_revision"] == "sha256-" + file_sha256(single)[:16]
