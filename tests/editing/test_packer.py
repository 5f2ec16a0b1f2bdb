"""The engine's one packer (editing.methods.edit): every method's targets packed into chunks once, each
finished chunk reported through `on_chunk`, a failing chunk retried per source and then per target."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import editing.methods as methods_mod
from editing.configs import P2PConfig, PnPConfig
from editing.inversion import invert
from editing.methods import METHODS, ChunkDone, SourceGroup, Target, edit
from tests.editing.conftest import STEPS, make_image

POISON = "a photo of a hat"  # the prompt the failing method below refuses


@pytest.fixture(scope="module")
def car_inversion(tiny):
    return invert(tiny, make_image(7), "a photo of a car", num_steps=STEPS)


def _mixed_groups(cat_inversion, car_inversion, poison: bool = False) -> list[SourceGroup]:
    pnp_prompts = ["a photo of a dog", POISON if poison else "a photo of a red cat"]
    return [
        SourceGroup(
            cat_inversion,
            [Target(p, PnPConfig(), edit_id=f"cat-pnp{i}") for i, p in enumerate(pnp_prompts)]
            + [Target("a photo of a dog", P2PConfig(), edit_id="cat-p2p")],
        ),
        SourceGroup(
            car_inversion,
            [
                Target("a photo of a red car", P2PConfig(), edit_id="car-p2p"),
                Target("a photo of a blue car", PnPConfig(), edit_id="car-pnp"),
            ],
        ),
    ]


def _refusing(monkeypatch, name: str) -> list[list[str]]:
    """Make method `name` fail any chunk holding the POISON prompt; returns each call's edit ids."""
    real = METHODS[name]
    calls: list[list[str]] = []

    def edit_chunk(model, pieces, **options):
        ids = [p.group.targets[ti].edit_id for p in pieces for ti in p.target_indices]
        calls.append(ids)
        if any(p.group.targets[ti].prompt == POISON for p in pieces for ti in p.target_indices):
            raise RuntimeError("poisoned target")
        return real.edit_chunk(model, pieces, **options)

    monkeypatch.setitem(METHODS, name, dataclasses.replace(real, edit_chunk=edit_chunk))
    return calls


def test_every_method_is_packed_once_and_each_chunk_reported(tiny, cat_inversion, car_inversion):
    groups = _mixed_groups(cat_inversion, car_inversion)
    done: list[ChunkDone] = []
    out = edit(tiny, groups, max_batch=2, on_chunk=done.append)
    for g, res in zip(groups, out):
        assert [r.edit_id for r in res] == [t.edit_id for t in g.targets]
        assert [r.method for r in res] == [type(t.config).__name__[:3].lower() for t in g.targets]
    # PnP: cat's two targets fill a chunk, car's one its own; P2P: cat's and car's share one
    assert sorted((d.method, d.targets) for d in done) == [("p2p", 2), ("pnp", 1), ("pnp", 2)]
    assert all(d.failed == 0 and d.seconds > 0 for d in done)
    # the same edits as each source edited alone
    for g, res in zip(groups, out):
        for a, b in zip(res, edit(tiny, [g], max_batch=8)[0]):
            assert torch.allclose(a.latent, b.latent, rtol=1e-9, atol=1e-12)


def test_a_failing_chunk_is_retried_per_source_then_per_target(
    tiny, cat_inversion, car_inversion, monkeypatch
):
    calls = _refusing(monkeypatch, "pnp")
    groups = _mixed_groups(cat_inversion, car_inversion, poison=True)
    done: list[ChunkDone] = []
    out = edit(tiny, groups, max_batch=8, record_features=True, on_chunk=done.append)
    # the whole PnP chunk, then per source, then the failing source per target
    assert calls == [
        ["cat-pnp0", "cat-pnp1", "car-pnp"],
        ["cat-pnp0", "cat-pnp1"],
        ["cat-pnp0"],
        ["cat-pnp1"],
        ["car-pnp"],
    ]
    [cat_pnp0, poisoned, cat_p2p], [car_p2p, car_pnp] = out
    assert isinstance(poisoned, RuntimeError) and str(poisoned) == "poisoned target"
    for r in (cat_pnp0, cat_p2p, car_p2p, car_pnp):
        assert not isinstance(r, Exception)
    # the retries keep record_features: the sources' PnP features come back for the cache
    assert cat_pnp0.features is not None and car_pnp.features is not None
    assert sorted((d.method, d.targets, d.failed) for d in done) == [("p2p", 2, 0), ("pnp", 3, 1)]


def test_without_isolation_the_first_failure_is_raised(
    tiny, cat_inversion, car_inversion, monkeypatch
):
    calls = _refusing(monkeypatch, "pnp")
    groups = _mixed_groups(cat_inversion, car_inversion, poison=True)
    with pytest.raises(RuntimeError, match="poisoned target"):
        edit(tiny, groups, max_batch=8, isolate_failures=False)
    assert len(calls) == 1  # no retry


def test_a_single_failing_target_is_not_retried(tiny, cat_inversion, monkeypatch):
    calls = _refusing(monkeypatch, "pnp")
    [[res]] = edit(tiny, [SourceGroup(cat_inversion, [Target(POISON, PnPConfig(), edit_id="x")])])
    assert isinstance(res, RuntimeError) and calls == [["x"]]


def test_an_unknown_config_type_is_refused_before_any_edit(tiny, cat_inversion):
    @dataclasses.dataclass(frozen=True)
    class OtherConfig:
        guidance_scale: float = 7.5

    group = SourceGroup(cat_inversion, [Target("a photo of a dog", OtherConfig())])
    with pytest.raises(
        ValueError, match="group 0: target 'a photo of a dog' has an unknown config"
    ):
        edit(tiny, [group], isolate_failures=True)


def test_the_packer_lives_in_the_engine_only():
    """No second packer: the method modules and the shard hand whole groups to editing.methods.edit."""
    import editing.p2p
    import editing.pnp
    import tasks.shard

    for module in (editing.pnp, editing.p2p, tasks.shard, methods_mod):
        assert not hasattr(module, "_parts_of") and not hasattr(module, "_waves")
        assert not hasattr(module, "_edit_with_fallback")
    assert not hasattr(editing.pnp, "edit_pnp") and not hasattr(editing.p2p, "edit_p2p")
