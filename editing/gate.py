"""The edit-QA review gate: thresholds on an edit's judge scores (editing.judge), read from a spec such as
``"text>=0.14,contrast>=0.016"``. No torch here: the CLI and RunOptions check a gate before anything heavy
is imported.

``text`` is the judge's margin of every judged edit; ``contrast`` is the same margin of an edit judged
with contrast prompts (a manifest's ``qa_contrast``), whose margins are lower (against the closest of
more alternatives); ``derived`` the same of an edit judged with contrast prompts derived from its prompt
pair (editing.contrasts). A gate with ``contrast`` (``derived``) rules holds those edits to them instead
of its ``text`` rules; other edits skip them. ``clip`` is CLIP's directional
similarity of the edit (editing.clip_judge), with ``--qa-model``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# the scores a gate rule may name; "clip": CLIP directional similarity (editing.clip_judge), scored only
# when the run names a CLIP model (--qa-model)
GATE_METRICS = ("text", "contrast", "derived", "clip")
# the margins of an edit judged with contrast prompts, by where they came from (a row's own first): an
# edit that has one of these and a gate with its rules is held to them instead of its text rules
_PROMPT_SET_METRICS = ("contrast", "derived")
_OPS = {
    ">=": lambda v, x: v >= x,
    ">": lambda v, x: v > x,
    "<=": lambda v, x: v <= x,
    "<": lambda v, x: v < x,
}
_RULE = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class GateRule:
    """One threshold: the edit passes when `metric op threshold` holds."""

    metric: str  # one of GATE_METRICS
    op: str  # >=, >, <= or <
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclass(frozen=True)
class Gate:
    """Review thresholds on an edit's scores; no rules = off (every edit passes)."""

    rules: tuple[GateRule, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    @property
    def spec(self) -> str:
        """The canonical spec string (what :func:`parse_gate` reads back)."""
        return ",".join(str(r) for r in self.rules) if self.rules else "off"

    def check(self, scores: Any) -> list[str]:
        """Why one edit needs review, one reason per failed rule ([] = it passes). `scores`: a mapping of
        metric to value, or an object with ``as_dict()`` (editing.judge.JudgeScore). ``contrast`` rules
        apply to edits that have a ``contrast`` score, and replace the ``text`` rules there."""
        values: Mapping[str, float] = scores.as_dict() if hasattr(scores, "as_dict") else scores
        ruled = {r.metric for r in self.rules}
        # the prompt set the edit was judged with whose rules apply: a row's contrasts, else derived ones
        own = next((m for m in _PROMPT_SET_METRICS if m in values and m in ruled), "text")
        reasons = []
        for rule in self.rules:
            if rule.metric in (*_PROMPT_SET_METRICS, "text") and rule.metric != own:
                continue  # another prompt set's rule (text: judged against the source prompt alone)
            value = values.get(rule.metric)
            if value is None:
                reasons.append(f"no {rule.metric} score")
            elif not math.isfinite(value):
                reasons.append(f"{rule.metric} is {value}")
            elif not _OPS[rule.op](value, rule.threshold):
                reasons.append(f"{rule.metric} {value:.4f} fails {rule}")
        return reasons


def parse_gate(spec: str) -> Gate:
    """A gate from its spec: ``"text>=0.02"``, several rules joined by commas, or ``"off"``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"QA gate spec must be a non-empty string like 'text>=0.02' or 'off', got {spec!r}"
        )
    if spec.strip().lower() == "off":
        return Gate()
    rules = []
    for part in spec.split(","):
        m = _RULE.match(part)
        if not m:
            raise ValueError(
                f"QA gate spec {spec!r}: cannot read {part.strip()!r}; expected METRIC OP NUMBER "
                f"like 'text>=0.02' (OP one of >=, >, <=, <), rules joined by ',', or 'off'"
            )
        metric, op, number = m.groups()
        if metric not in GATE_METRICS:
            raise ValueError(
                f"QA gate spec {spec!r}: unknown metric {metric!r}; known: {', '.join(GATE_METRICS)}"
            )
        try:
            threshold = float(number)
        except ValueError:
            raise ValueError(f"QA gate spec {spec!r}: {number!r} is not a number") from None
        if not math.isfinite(threshold):
            raise ValueError(f"QA gate spec {spec!r}: the threshold must be finite, got {number!r}")
        rules.append(GateRule(metric, op, threshold))
    return Gate(tuple(rules))


# The default review gate: with the default JudgeConfig on the bundled model, the thresholds flagging at
# most 12% of the good calibration edits of each of colour, background and all kinds, judged against the
# source prompt (text) and against every other value of the changed attribute (contrast) (README: Edit
# QA; `python -m refmodel.evaluate --gate 48 48`). Another checkpoint needs its own calibration.
DEFAULT_GATE = "text>=0.1412,contrast>=0.01644"

# The rule for edits judged with contrast prompts derived from their prompt pair (JudgeConfig.derived_contrasts,
# a run's --qa-derived): 1 derived contrast's threshold chosen on calibration edits of the bundled model
# (`python -m refmodel.evaluate --gate-derived 16 16`; README: Edit QA). Added to the default gate when a run
# derives contrasts and gives no gate of its own.
DERIVED_RULE = "derived>=-0.04132"
