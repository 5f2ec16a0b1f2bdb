"""Shard packing (``tasks.planning.pack_shards``) and source grouping shared by planning and the shard."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.planning import GROUP_COLUMNS, pack_shards, source_key
from tasks.shard import group_sources
from tests.tasks.conftest import row


def shard_sizes(shard_of: np.ndarray) -> list[int]:
    return np.bincount(shard_of).tolist() if len(shard_of) else []


def codes_of(sizes: list[int]) -> np.ndarray:
    """Group codes of contiguous groups of the given sizes (numbered by first appearance)."""
    return np.repeat(np.arange(len(sizes)), sizes)


def check_invariants(codes: np.ndarray, shard_size: int) -> np.ndarray:
    shard_of = pack_shards(codes, shard_size)
    assert len(shard_of) == len(codes)
    if not len(codes):
        return shard_of
    sizes = shard_sizes(shard_of)
    assert all(0 < s <= shard_size for s in sizes), sizes  # no empty shard, none too big
    first = {}
    for i, g in enumerate(codes):
        first.setdefault(int(g), i)
    order = sorted(first, key=first.get)
    for g in order:
        rows = np.flatnonzero(codes == g)
        shards = shard_of[rows]
        if len(rows) <= shard_size:
            assert len(set(shards.tolist())) == 1, f"group {g} of {len(rows)} rows was split"
        else:  # split into consecutive shards, its rows in manifest order
            assert (np.diff(shards) >= 0).all() and (np.diff(shards) <= 1).all()
    # groups in order of first appearance never go to an earlier shard than the group before
    starts = [int(shard_of[codes == g].min()) for g in order]
    assert starts == sorted(starts)
    return shard_of


def test_empty_input_gives_no_shards():
    assert pack_shards(np.zeros(0, np.int64), 4).tolist() == []


@pytest.mark.parametrize("size", [0, -1])
def test_shard_size_below_one_is_refused(size):
    with pytest.raises(ValueError, match=f"shard_size must be >= 1, got {size}"):
        pack_shards(codes_of([1]), size)


@pytest.mark.parametrize(
    ("sizes", "shard_size", "want"),
    [
        ([2, 2], 4, [4]),  # groups filling a shard exactly share it
        ([3, 2], 4, [3, 2]),  # a group that does not fit starts the next shard: never split
        ([1, 1, 1, 1, 1], 2, [2, 2, 1]),
        ([10], 4, [4, 4, 2]),  # larger than a shard: split into full shards and a rest
        ([10, 1], 4, [4, 4, 3]),  # the next group joins the split group's last, partial shard
        ([1, 10], 4, [1, 4, 4, 2]),  # a big group after a partial shard starts a new one
        ([4, 4], 4, [4, 4]),
        ([5], 1, [1, 1, 1, 1, 1]),
    ],
)
def test_packing_of_contiguous_groups(sizes, shard_size, want):
    shard_of = check_invariants(codes_of(sizes), shard_size)
    assert shard_sizes(shard_of) == want
    assert (np.diff(shard_of) >= 0).all()  # contiguous groups: shards follow the manifest order


def test_interleaved_rows_of_a_group_share_its_shard():
    codes = np.array([0, 1, 0, 2, 1, 0])  # sources interleaved in the manifest
    shard_of = check_invariants(codes, 3)
    assert shard_of.tolist() == [0, 1, 0, 1, 1, 0]


def test_random_manifests_keep_the_invariants():
    rng = np.random.default_rng(0)
    for _ in range(200):
        groups = int(rng.integers(1, 12))
        sizes = rng.integers(1, 9, size=groups)
        codes = codes_of(sizes.tolist())
        if rng.random() < 0.5:  # shuffle rows, then renumber groups by first appearance
            codes = rng.permutation(codes)
            _, first = np.unique(codes, return_index=True)
            rank = np.argsort(np.argsort(first))
            codes = rank[codes]
        check_invariants(codes, int(rng.integers(1, 10)))


def test_rows_group_by_image_prompt_and_steps_in_first_appearance_order(make_run, local_root_uri):
    rows = [
        row("img:1"),
        row("img:2"),
        row("img:1", target="a red square"),
        row("img:1", num_steps=3),  # other steps: another inversion
        row("img:1", source="a red square"),  # other source prompt: another inversion
        row("img:2", target="a red square"),
    ]
    shard = make_run(local_root_uri, rows).shard(0)
    assert GROUP_COLUMNS == ("image_uri", "source_prompt", "num_steps")
    first = shard.rows[0]
    assert source_key(first) == (first.image_uri, "a red circle", 2)
    assert [[r.row for r in g] for g in group_sources(shard.rows)] == [[0, 2], [1, 5], [3], [4]]


def test_shard_groups_sources_as_planning_counted_them(make_run, local_root_uri):
    rows = [
        row("img:1", target="a blue circle"),
        row("img:2", target="a green circle"),
        row("img:1", target="a red square"),
        row("img:1", target="a red square", num_steps=3),  # same image, other steps: own source
        row("img:3", target="a blue square"),
        row("img:2", target="a yellow circle", source="a red square"),
    ]
    run = make_run(local_root_uri, rows, shard_size=3)
    planned = run.plan["shards"]
    assert sum(s["edits"] for s in planned) == len(rows)
    assert len(planned) > 1
    for s in planned:
        shard = run.shard(s["index"])
        assert len(shard.rows) == s["edits"]
        assert len(group_sources(shard.rows)) == s["sources"]
