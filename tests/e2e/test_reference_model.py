"""The bundled reference model: loads through the ordinary path, is the CLI default, and edits well.

The fidelity smoke test scores a handful of edits against the procedural ground truth, with thresholds a
margin below the figures measured by ``python -m refmodel.evaluate`` (README: Reference model), so that a
regression in the engine fails CI.
"""

from __future__ import annotations

import pytest

from editing.model import load_model
from refmodel import REFERENCE_MODEL_DIR
from refmodel.evaluate import evaluate_edits
from tasks.options import RunOptions

SOURCES = 6  # drawn scenes; each gets a colour, shape and background swap and a restyle per method
STEPS = 50


@pytest.fixture(scope="module")
def ref_model():
    return load_model(REFERENCE_MODEL_DIR)


def test_bundled_model_is_the_default_and_records_its_layers(ref_model):
    assert RunOptions(out="x").model_ref == str(REFERENCE_MODEL_DIR)
    assert ref_model.native_size == 32
    names = {n for n, _ in ref_model.unet.named_modules()}
    for layer in ref_model.defaults["pnp_feature_layers"] + ref_model.defaults["pnp_attn_layers"]:
        assert layer in names
    assert len(ref_model.tokenizer.encode("turquoise", add_special_tokens=False)) == 2


@pytest.fixture(scope="module")
def metrics(ref_model):
    # only the edits a floor reads (the no-control baseline runs for every kind regardless)
    only = {(method, kind) for kind, (method, *_) in FLOORS.items()}
    m, _ = evaluate_edits(
        ref_model, SOURCES, STEPS, methods=sorted({m for m, _ in only}), only=only, sheet_rows=0
    )
    return m


def test_direct_inversion_reconstructs_as_well_as_the_vae(metrics):
    recon = metrics["reconstruction_psnr"]
    assert recon["direct_inversion"] >= recon["vae"] - 0.5
    assert recon["direct_inversion"] >= 32.0  # issue 10's target; measured 37.9 dB here
    assert recon["direct_inversion"] > recon["ddim_g7.5"] + 1.0  # plain DDIM with guidance drifts


# Each kind of edit with the method the README recommends for it, and floors a margin below what this
# test's 6 sources measured with shapes-v2 (2026-12-01): colour (pnp) 100% / IoU 0.81 / 48.7 dB, shape
# (p2p_swap) 100%, background (pnp) 100% / IoU 0.73, restyle (pnp, attn_t 0.8) 83% / IoU 0.80 / 43.1 dB;
# no control: colour IoU 0.45. (The 30-source evaluation in the README is the reference figure.)
FLOORS = {  # kind: (method, success, IoU or None, background PSNR or None)
    "colour": ("pnp", 0.8, 0.7, 40.0),
    "shape": ("p2p_swap", 0.8, None, 40.0),
    "background": ("pnp", 0.8, 0.6, None),
    "style": ("pnp_attn0.8", 0.6, 0.7, 38.0),
}


@pytest.mark.parametrize("kind", sorted(FLOORS))
def test_recommended_method_meets_its_floors(metrics, kind):
    method, success, iou, bg = FLOORS[kind]
    s = metrics["edits"][f"{method}/{kind}"]
    assert s["n"] == SOURCES, s
    assert s["success"] >= success, s
    if iou is not None:
        assert s["iou"] >= iou, s
        assert s["iou"] > metrics["edits"][f"none/{kind}"]["iou"] + 0.1, s  # clearly kept structure
    if bg is not None:
        assert s["bg_psnr"] >= bg, s


def test_evaluation_runs_only_the_edits_asked_for(ref_model):
    only = {("pnp", "colour"), ("p2p_swap", "shape")}
    m, sheet = evaluate_edits(ref_model, 1, 2, methods=["p2p_swap", "pnp"], only=only)
    ran = {key for key, s in m["edits"].items() if s["n"] > 0}
    assert ran == {"pnp/colour", "p2p_swap/shape"} | {f"none/{k}" for k in FLOORS}
    assert sheet.size == (1, 1)  # the sheet shows every method's colour edit: not all ran
    m, sheet = evaluate_edits(ref_model, 1, 2, methods=["pnp"])
    assert {key for key, s in m["edits"].items() if s["n"] > 0} == {
        f"{m}/{k}" for m in ("none", "pnp") for k in FLOORS
    }
    assert sheet.size != (1, 1)
