"""The README's commands, run as written, so that the README cannot drift from the code.

Convention (README.md, and any fenced block added to it later):

* A fenced ```bash block is run, line by line (``\\`` continuations joined, ``#`` comment lines
  skipped), unless the line just above its fence (blank lines aside) is
  ``<!-- docs-test: skip (why) -->``: use that for what needs a GPU, the network, S3, a real
  checkpoint, a cluster or a long-running server, and say why.
* A command's expected exit status is 0, or N when it ends with a comment ``# exits N: ...``.
* A fenced ```python block is run only when marked ``<!-- docs-test: run -->``; ``RUN_ID`` in it is
  replaced by the run id of the last ``editflow run`` before it.
* Everything runs in README order in one scratch folder holding a copy of ``manifests/`` (the
  commands use paths relative to the repository root), so outputs such as ``out/demo`` never land
  in the checkout; once a session (``readme_run`` in tests/flows/conftest.py), whose outputs the
  restyle demo test scores too. ``editflow ...`` commands run in this process through ``flows.cli.main``, against
  the session's Prefect test server (no temporary server start per command); other commands run
  with ``bash -c``. ``EDITFLOW_THREADS=1`` keeps the runs polite on a shared machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARK = re.compile(r"^<!--\s*docs-test:\s*(skip|run)\b.*-->\s*$")
_EXITS = re.compile(r"#\s*exits\s+(\d+)\b")


@dataclass
class Block:
    lang: str
    mark: str | None  # "skip", "run" or None
    body: str
    line: int  # 1-based line of the opening fence


def readme_blocks(text: str) -> list[Block]:
    """Fenced blocks with the docs-test mark (if any) on the closest non-blank line above the fence."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        mark = _MARK.match(lines[j]) if j >= 0 else None
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        blocks.append(
            Block(m.group(1), mark.group(1) if mark else None, "\n".join(lines[i + 1 : end]), i + 1)
        )
        i = end + 1
    return blocks


def shell_commands(body: str) -> list[tuple[str, int]]:
    """(command, expected exit status) per logical line of a bash block."""
    out, pending = [], ""
    for raw in body.splitlines():
        line = raw.rstrip()
        if pending:
            line = line.lstrip()
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line, pending = pending + line, ""
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _EXITS.search(line)
        out.append(
            (line.split(" #")[0].strip() if m else line.strip(), int(m.group(1)) if m else 0)
        )
    return out


def runnable(blocks: list[Block]) -> list[tuple[str, object]]:
    """The steps the test runs: ("sh", (command, expected status)) and ("py", code), in order."""
    steps: list[tuple[str, object]] = []
    for b in blocks:
        if b.lang in ("bash", "sh") and b.mark != "skip":
            steps += [("sh", c) for c in shell_commands(b.body)]
        elif b.lang == "python" and b.mark == "run":
            steps.append(("py", b.body))
    return steps


def test_the_convention_reads_marks_exits_and_continuations():
    text = (
        "<!-- docs-test: skip (network) -->\n```bash\npip install x\n```\n\n"
        "```bash\n# a comment\nfoo a \\\n  --b c   # exits 2: why\nbar\n```\n"
        "```python\nprint(1)\n```\n<!-- docs-test: run -->\n\n```python\nprint(2)\n```\n"
    )
    assert runnable(readme_blocks(text)) == [
        ("sh", ("foo a --b c", 2)),
        ("sh", ("bar", 0)),
        ("py", "print(2)"),
    ]


def test_every_readme_block_that_can_run_here_is_run(readme_run):
    steps = runnable(readme_blocks(README.read_text()))
    commands = [s[1][0] for s in steps if s[0] == "sh"]
    # the commands a new user runs first must stay in the runnable set (not silently skipped)
    for expected in (
        "editflow run manifests/examples/demo.parquet --out out/demo",
        "editflow validate manifests/examples/demo.parquet",
        "editflow validate manifests/examples/bad.parquet",
    ):
        assert expected in commands, f"{expected!r} is no longer a runnable README command"
    # every step ran (the session's `readme_run` stops at the first unexpected exit status)
    assert readme_run.failure is None, readme_run.failure
    assert len(readme_run.steps) == len(steps)
    # what the README says those commands leave behind
    scratch = readme_run.scratch
    assert len(list((scratch / "out" / "demo" / "assets").glob("*.png"))) == 9
    assert (scratch / "out" / "purple.png").is_file()
    assert not (REPO / "purple.png").exists()


# ---- the README's restyle demo, scored (in this file so that one pytest-xdist worker runs the README once)
# The README's restyle demo: the example catalog x the bundled model's styles, with the defaults.
#
# Scores the README's own run of ``editflow restyle manifests/examples/catalog.csv --style ... --settings
# '{"attn_t": 0.8}' --out out/restyle`` (the session's ``readme_run``: bundled reference model, CPU, Prefect's
# test server, run once for this test and the README test): every row succeeds, and each restyled image,
# scored with the domain's pixel scorers, draws the requested style and keeps the object's silhouette.

STYLES = ("striped", "outlined", "dotted")
CATALOG = "manifests/examples/catalog.csv"
SETTINGS = '{"attn_t": 0.8}'  # the README's recommendation for restyling (Reference model)
# A margin below what the demo measured with the bundled model (README: Reference model).
MIN_STYLE_SUCCESS = 5 / 9  # measured 6/9 (2026-12-01, shapes-v2)
MIN_SHAPE_IOU = 0.7  # measured 0.81


def test_restyle_demo_succeeds_and_draws_the_styles(readme_run) -> None:
    import numpy as np
    import pandas as pd
    from PIL import Image

    from refmodel import domain

    command = " ".join(
        ["editflow restyle", CATALOG, *(f"--style {s}" for s in STYLES), f"--settings '{SETTINGS}'"]
        + ["--out out/restyle"]
    )
    ran = [s for s in readme_run.steps if s.get("command") == command]
    assert ran, f"the README no longer runs {command!r}"
    assert ran[0]["status"] == 0, ran[0]["out"][-3000:]
    m = re.search(r"^run (\S+): 9 succeeded, 0 failed, 0 skipped \(of 9\)", ran[0]["out"], re.M)
    assert m, ran[0]["out"][-3000:]

    out = readme_run.scratch / "out" / "restyle"
    results = pd.read_parquet(out / "runs" / m.group(1) / "results")
    catalog = pd.read_csv(readme_run.scratch / CATALOG)
    assert sorted(results["style"]) == sorted(STYLES * len(catalog))
    hits, ious = [], []
    for row in results.itertuples():
        source = np.asarray(
            Image.open(
                readme_run.scratch / catalog.image_uri[catalog.sku == row.sku].item()
            ).convert("RGB")
        )
        edited = np.asarray(Image.open(row.output_uri.removeprefix("file://")).convert("RGB"))
        mask = domain.segment(edited)
        hits.append(domain.classify_style(edited, mask) == row.style)
        ious.append(domain.mask_iou(domain.segment(source), mask))
    assert np.mean(hits) >= MIN_STYLE_SUCCESS, (hits, ious)
    assert np.mean(ious) >= MIN_SHAPE_IOU, (hits, ious)
