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
