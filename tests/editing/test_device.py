"""Device hygiene of the engine, checked on CPU: what would crash or stall on a GPU shows up here too.

- every tensor the processors and hooks read is placed on the UNet's device once per chunk (a state left
  elsewhere is refused before the loop);
- the denoising loop reads nothing back to the host (no `.item()`, `bool(tensor)`, `nonzero`, `.cpu()`);
- no getter or encode/decode call moves or re-casts a module; the VAE's precision is fixed at load.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from editing import attention
from editing.attention import ChunkPlan, ControlState, check_on_device, tensors_in
from editing.configs import P2PConfig, PnPConfig
from editing.methods import PnPFeatures, SourceGroup, Target, edit, edit_p2p, edit_pnp
from editing.model import EditModel, load_model, vae_precision

from .conftest import STEPS, make_image

# aten ops that read a tensor's value back to the host (item/bool/int/float all dispatch to
# _local_scalar_dense; nonzero's output size depends on the data, so it waits for the device)
HOST_READ_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::item"}
HOST_METHODS = ("cpu", "tolist", "numpy", "item")


class HostReads(TorchDispatchMode):
    """Counts host read-backs: the ops above, and copies from another device to the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in HOST_READ_OPS:
            self.seen[name] += 1
        elif (
            name == "aten::_to_copy"
            and str(kwargs.get("device", "")) == "cpu"
            and args[0].device.type != "cpu"
        ):
            self.seen["copy to cpu"] += 1
        return func(*args, **kwargs)


def _spy_loop(monkeypatch, on_enter=None):
    """Wrap the methods' controlled_unet (editing.pnp, editing.p2p): its body is exactly the denoising
    loop. Returns a dict that collects each chunk's state and the host reads counted inside the loop."""
    real = attention.controlled_unet
    seen: dict = {"states": [], "reads": Counter()}

    class Spy:
        def __init__(self, unet, state, **kw):
            self.ctx, self.state = real(unet, state, **kw), state

        def __enter__(self):
            names = self.ctx.__enter__()
            seen["states"].append(self.state)
            self.mode = HostReads()
            self.patches = {m: getattr(torch.Tensor, m) for m in HOST_METHODS}
            for m, orig in self.patches.items():
                setattr(torch.Tensor, m, _counting(m, orig, seen["reads"]))
            self.mode.__enter__()
            return names

        def __exit__(self, *exc):
            self.mode.__exit__(*exc)
            for m, orig in self.patches.items():
                setattr(torch.Tensor, m, orig)
            seen["reads"].update(self.mode.seen)
            return self.ctx.__exit__(*exc)

    for module in ("editing.pnp", "editing.p2p"):
        monkeypatch.setattr(f"{module}.controlled_unet", Spy)
    return seen


def _counting(name, orig, counter):
    def method(self, *args, **kwargs):
        counter[f"Tensor.{name}"] += 1
        return orig(self, *args, **kwargs)

    return method


P2P_KINDS = [
    Target("a photo of a dog", P2PConfig(kind="replace")),
    Target("a photo of a big cat", P2PConfig(kind="refine")),
    Target("a photo of a cat", P2PConfig(equalizer={"cat": 3.0})),
    Target(
        "a photo of a dog",
        P2PConfig(blend_source_words=("cat",), blend_target_words=("dog",), blend_fraction=1.0),
    ),
]


def test_no_host_round_trip_inside_the_denoising_loop(tiny, cat_inversion, monkeypatch):
    seen = _spy_loop(monkeypatch)
    pnp = [
        Target("a photo of a dog", PnPConfig()),
        Target("a photo of a red cat", PnPConfig(inject_uncond=True)),
    ]
    live = edit_pnp(tiny, [SourceGroup(cat_inversion, pnp)], record_features=True)[0]
    back = PnPFeatures.from_bytes(live[0].features.to_bytes())
    edit_pnp(tiny, [SourceGroup(cat_inversion, pnp, features=back)])
    edit_p2p(tiny, [SourceGroup(cat_inversion, P2P_KINDS)])
    # live PnP, replayed PnP, and two P2P chunks (the local-blend target's blend_fraction keys its own)
    assert len(seen["states"]) == 4
    # the same chunks at fixed (padded) batch shapes
    edit(tiny, [SourceGroup(cat_inversion, pnp + P2P_KINDS)], record_features=True, pad=True)
    edit(tiny, [SourceGroup(cat_inversion, pnp, features=back)], pad=True)
    assert len(seen["states"]) == 8  # live PnP, two P2P, replayed PnP again
    assert seen["reads"] == Counter(), (
        f"host reads inside the denoising loop: {dict(seen['reads'])}"
    )


def test_host_reads_are_detected(tiny, cat_inversion, monkeypatch):
    """The watcher itself: a read-back added inside the loop (here in a feature hook) is caught."""
    seen = _spy_loop(monkeypatch)
    real_hook = attention._feature_hook

    def reading_hook(name, state):
        hook = real_hook(name, state)

        def wrapped(module, args, output):
            float(output.abs().max())  # the kind of line this test exists to catch
            return hook(module, args, output)

        return wrapped

    monkeypatch.setattr(attention, "_feature_hook", reading_hook)
    edit_pnp(tiny, [SourceGroup(cat_inversion, [Target("a photo of a dog", PnPConfig())])])
    assert seen["reads"]["aten::_local_scalar_dense"] == STEPS


def test_control_state_lives_on_the_unet_device(tiny, cat_inversion, monkeypatch):
    seen = _spy_loop(monkeypatch)
    live = edit(
        tiny,
        [SourceGroup(cat_inversion, [Target("a photo of a dog", PnPConfig())] + P2P_KINDS)],
        record_features=True,
    )[0]
    back = PnPFeatures.from_bytes(live[0].features.to_bytes())
    edit_pnp(
        tiny, [SourceGroup(cat_inversion, [Target("a photo of a dog", PnPConfig())], features=back)]
    )
    device = tiny.unet.device
    for state in seen["states"]:
        tensors = tensors_in(state)
        assert tensors and all(t.device == device for t in tensors)
        assert state.plan.device == device
    p2p = next(s.plan for s in seen["states"] if s.plan.cross is not None)
    assert p2p.cross.mapper.dtype == tiny.dtype and len(p2p.cross.weight) == STEPS
    replayed = next(s.plan for s in seen["states"] if s.plan.replay is not None)
    # cast once per chunk, not per layer
    assert all(v.dtype == tiny.dtype for v in replayed.replay.values())


def test_the_chunk_plan_is_immutable_and_apart_from_the_outputs(tiny, cat_inversion, monkeypatch):
    """The loop changes the step only; the processors write to the outputs, never to the plan."""
    seen = _spy_loop(monkeypatch)
    edit(tiny, [SourceGroup(cat_inversion, P2P_KINDS[-1:])])  # local blend: the maps are outputs
    [state] = seen["states"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.plan.blend_positions = 0
    assert state.outputs.blend_count > 0 and state.outputs.acted


def _capturing_place(monkeypatch, after=None) -> list:
    """Wrap ChunkPlan.place: collect each call's arguments; `after(plan)` may replace the plan."""
    calls = []
    real = ChunkPlan.place.__func__

    def place(cls, rows, steps, device, dtype, **kw):
        calls.append((rows, steps, kw))
        plan = real(cls, rows, steps, device, dtype, **kw)
        return after(plan) if after else plan

    monkeypatch.setattr(ChunkPlan, "place", classmethod(place))
    return calls


def test_place_moves_every_tensor_of_the_plan(tiny, cat_inversion, monkeypatch):
    """Placing a real chunk's plan on another device (meta: no data) leaves no tensor behind, so a new
    field that place() forgets shows up here rather than as a device mismatch on a GPU."""
    captured = _capturing_place(monkeypatch)
    [[live]] = edit_pnp(
        tiny,
        [SourceGroup(cat_inversion, [Target("a photo of a dog", PnPConfig())])],
        record_features=True,
    )
    feats = PnPFeatures.from_bytes(live.features.to_bytes())
    edit_pnp(
        tiny,
        [SourceGroup(cat_inversion, [Target("a photo of a dog", PnPConfig())], features=feats)],
    )
    edit_p2p(tiny, [SourceGroup(cat_inversion, P2P_KINDS)])
    assert len(captured) == 4
    monkeypatch.undo()
    for rows, steps, kw in captured:
        plan = ChunkPlan.place(rows, steps, "meta", torch.float16, **kw)
        tensors = tensors_in(plan)
        assert tensors and all(t.device.type == "meta" for t in tensors)
        check_on_device(plan, "meta")
        with pytest.raises(ValueError, match="meta"):
            check_on_device(plan, "cpu")


def test_a_plan_off_the_unet_device_is_refused_before_the_loop(tiny, cat_inversion, monkeypatch):
    def misplace(plan):
        return dataclasses.replace(plan, replay={"stray": torch.zeros(1, device="meta")})

    _capturing_place(monkeypatch, after=misplace)
    with pytest.raises(ValueError, match=r"tensors on \['meta'\], the UNet is on cpu"):
        edit_pnp(tiny, [SourceGroup(cat_inversion, [Target("a photo of a dog", PnPConfig())])])
    unplaced = ControlState(plan=None)
    with pytest.raises(ValueError, match="place"):
        with attention.controlled_unet(tiny.unet, unplaced):
            pass


# ---------------------------------------------------------------- modules are never mutated by a getter


def _module_facts(model: EditModel) -> dict[str, tuple[torch.dtype, torch.device]]:
    return {
        f"{part}.{name}": (p.dtype, p.device)
        for part in ("unet", "vae", "text_encoder")
        for name, p in getattr(model, part).named_parameters()
    }


@pytest.fixture(scope="module")
def tiny16(tiny_dir):
    return load_model(tiny_dir, device="cpu", dtype=torch.float16)


def test_getters_and_encode_decode_leave_modules_as_loaded(tiny16):
    before = _module_facts(tiny16)
    assert {d for k, (d, _) in before.items() if k.startswith("vae.")} == {
        torch.float32
    }  # fixed at load
    assert {d for k, (d, _) in before.items() if k.startswith("unet.")} == {torch.float16}
    for name in (
        "vae_scale_factor",
        "native_size",
        "size_multiple",
        "prediction_type",
        "max_tokens",
        "latent_dtype",
    ):
        getattr(tiny16, name)
    tiny16.scheduler_facts()
    z = tiny16.encode_image(tiny16.prepare_image(make_image(0)))
    assert z.dtype == torch.float32 and bool(torch.isfinite(z).all())
    [image] = tiny16.decode_latents(z)
    assert image.size == (16, 16)
    assert tiny16.vae_dtype == torch.float32
    assert _module_facts(tiny16) == before


@pytest.mark.parametrize(
    "dtype, config, expected",
    [
        (torch.float16, {"force_upcast": True}, torch.float32),
        (torch.float16, {}, torch.float32),  # missing counts as set, as in diffusers
        (torch.float16, {"force_upcast": False}, torch.float16),
        (torch.bfloat16, {"force_upcast": True}, torch.bfloat16),
        (torch.float32, {"force_upcast": True}, torch.float32),
        (torch.float64, {"force_upcast": True}, torch.float64),
    ],
)
def test_vae_precision_rule(dtype, config, expected):
    assert vae_precision(dtype, config) == expected


def test_edit_model_refuses_a_vae_dtype_its_vae_does_not_have(tiny16):
    parts = {
        k: getattr(tiny16, k)
        for k in ("vae", "unet", "text_encoder", "tokenizer", "scheduler", "device", "dtype")
    }
    with pytest.raises(ValueError, match="vae_dtype is torch.float16"):
        EditModel(**parts, model_id="x", revision="y", vae_dtype=torch.float16)
    assert (
        EditModel(**parts, model_id="x", revision="y").vae_dtype == torch.float32
    )  # read, not cast
