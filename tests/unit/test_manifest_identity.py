"""Edit identity (manifests.identity): derived edit ids are deterministic, sensitive to every input
that shapes the edit, and unchanged byte for byte by the move out of storage.keys."""

from __future__ import annotations

import pytest

from manifests import identity
from storage import keys

EDIT = dict(
    image_uri="s3://b/img.png",
    source_prompt="a cat",
    target_prompt="a dog",
    method="pnp",
    settings={"feature_t": 0.8, "attn_t": 0.5},
    seed=0,
    num_steps=50,
    guidance_scale=7.5,
    negative_prompt="",
)


def test_derive_edit_id_deterministic() -> None:
    eid = identity.derive_edit_id(**EDIT)
    assert len(eid) == 32 and eid == identity.derive_edit_id(**EDIT)
    reordered = {**EDIT, "settings": {"attn_t": 0.5, "feature_t": 0.8}}
    assert identity.derive_edit_id(**reordered) == eid
    assert identity.derive_edit_id(**{**EDIT, "guidance_scale": 7.5}) == identity.derive_edit_id(
        **{**EDIT, "guidance_scale": 7.50}
    )
    assert identity.derive_edit_id(**{**EDIT, "num_steps": 50.0}) == eid  # numeric types normalised


@pytest.mark.parametrize(
    "change",
    [
        {"image_uri": "s3://b/img2.png"},
        {"source_prompt": "a cat "},
        {"target_prompt": "a fox"},
        {"method": "p2p"},
        {"settings": {"feature_t": 0.7, "attn_t": 0.5}},
        {"seed": 1},
        {"num_steps": 49},
        {"guidance_scale": 7.0},
        {"negative_prompt": "blurry"},
    ],
)
def test_derive_edit_id_sensitive(change: dict) -> None:
    assert identity.derive_edit_id(**{**EDIT, **change}) != identity.derive_edit_id(**EDIT)


def test_derive_edit_id_fast_path_matches_canonical_json() -> None:
    """derive_edit_id_json spells out canonical_json; the two must never drift apart."""
    values = ['s3://b/"q".png', "café ✓", "tab\there", "pnp", 2**62, 7, 7.25, "ünï\\"]
    settings = {"b": [1, 2], "a": "x"}
    text = (
        f"edit-v1\n{keys.canonical_json(values[:4] + values[4:])}\n{keys.canonical_json(settings)}"
    )
    expected = keys.sha256_hex(text.encode())[:32]
    assert identity.derive_edit_id(*values[:4], settings, *values[4:]) == expected
    with pytest.raises(ValueError, match="finite"):
        identity.derive_edit_id(*values[:4], settings, 1, 50, float("inf"))


def test_derived_ids_are_pinned() -> None:
    """Values computed with storage.keys.derive_edit_id before the move (commit 2de34c3): a change
    here would re-derive every id, so finished edits would no longer be found on a rerun."""
    eid = identity.derive_edit_id(**EDIT)
    assert eid == "ba5eab653e54ba5dcc4b83341bc8e5c8"
    other = identity.derive_edit_id(
        '/data/ünï "q".png', "a cat\t", "a dög", "p2p", {"kind": "replace", "b": [1, 2]},
        2**62, 7, 7.25, "blurry\\",
    )  # fmt: skip
    assert other == "118cf96cfa8b667832b367a83160557a"
    assert (
        identity.derive_edit_id_json(
            *EDIT_VALUES[:4], keys.canonical_json(EDIT["settings"]), *EDIT_VALUES[4:]
        )
        == eid
    )


EDIT_VALUES = [EDIT[k] for k in ("image_uri", "source_prompt", "target_prompt", "method", "seed",
                                 "num_steps", "guidance_scale", "negative_prompt")]  # fmt: skip


def test_storage_keys_no_longer_derives_ids() -> None:
    """Identity is the manifests' job; storage.keys keeps key safety only."""
    assert not hasattr(keys, "derive_edit_id") and not hasattr(keys, "derive_edit_id_json")
    assert keys.check_id("ba5eab653e54ba5dcc4b83341bc8e5c8")


def test_derive_edit_ids_equals_derive_edit_id_json_row_by_row() -> None:
    import random

    import numpy as np
    import pyarrow as pa

    from manifests.identity import derive_edit_id_json, derive_edit_ids

    rng = random.Random(1)
    alphabet = ["a", " ", '"', "\\", "\n", "\x00", "\x1f", "\x7f", "é", "猫", "\u2028", "😀", ","]

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))

    n = 500
    cols = [[text() for _ in range(n)] for _ in range(5)]
    seed = np.array([rng.choice([0, -1, 2**63 - 1, -(2**63), 42]) for _ in range(n)], np.int64)
    steps = np.array([rng.choice([1, 50, 1000]) for _ in range(n)], np.int64)
    guidance = np.array([rng.choice([7.5, 1e-05, 1 / 3, 1e16, 2.5e-310, -0.0]) for _ in range(n)])
    settings = [rng.choice(["{}", '{"a":1}', '{"w":"\\"x\\""}']) for _ in range(n)]
    fast = derive_edit_ids(
        *(pa.array(c) for c in cols[:4]), pa.array(settings), seed, steps, guidance,
        pa.array(cols[4]),
    )  # fmt: skip
    slow = [
        derive_edit_id_json(
            *(c[i] for c in cols[:4]),
            settings[i],
            int(seed[i]),
            int(steps[i]),
            float(guidance[i]),
            cols[4][i],
        )  # fmt: skip
        for i in range(n)
    ]
    assert fast == slow
