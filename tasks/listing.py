"""The runs under an output root, newest first: what ``editflow runs`` prints and what ``latest`` names.

A run is a ``runs/{run_id}/plan.json`` (a placeholder while it plans); its ``summary.json`` says it
finished. No Prefect, no model: plain reads of the run folders.
"""

from __future__ import annotations

from typing import Any

from storage import keys
from storage.base import NotFound, ObjectStore
from storage.writer import read_json
from tasks.errors import RunError

_PLAN = "plan.json"


class NoRuns(RunError):
    """`latest` was asked of an output root that holds no run."""


def run_ids(store: ObjectStore) -> list[str]:
    """The ids of the runs under `store`: the folders of ``runs/`` (one delimiter listing, not every key
    of every run), sorted; :func:`run_entry` leaves out a folder without a ``plan.json``."""
    return list(store.folders("runs/"))


def run_entry(store: ObjectStore, run_id: str) -> dict[str, Any] | None:
    """One run's line: id, start, status, counts and wall time (what its plan and summary say); None
    when the folder holds no plan.json."""
    try:
        plan = read_json(store, keys.plan_key(run_id))
    except NotFound:  # a folder under runs/ that holds no run
        return None
    except Exception:  # noqa: BLE001 - a damaged plan is listed as such, the rest still are
        plan = None
    if not isinstance(plan, dict):
        return {"run_id": run_id, "start": "", "status": "damaged", "rows": None}
    entry: dict[str, Any] = {
        "run_id": run_id,
        "start": str(plan.get("created") or ""),
        "rows": plan.get("rows"),
        "counts": None,
        "seconds": None,
    }
    if plan.get("state") == "planning":
        entry["status"] = "planning"
        return entry
    try:  # one request: a missing or damaged summary is an interrupted run
        summary = read_json(store, keys.summary_key(run_id))
    except Exception:  # noqa: BLE001
        summary = None
    if isinstance(summary, dict) and isinstance(summary.get("counts"), dict):
        counts = summary["counts"]
        entry["counts"] = counts
        entry["seconds"] = (summary.get("seconds") or {}).get("wall")
        entry["status"] = "failed edits" if counts.get("failed") else "finished"
    else:
        entry["status"] = "interrupted"
    return entry


def list_runs(store: ObjectStore, limit: int = 0) -> list[dict[str, Any]]:
    """The runs under `store`, newest first (by start time, then id); the first `limit` (0 = all)."""
    entries = [e for run_id in run_ids(store) if (e := run_entry(store, run_id)) is not None]
    entries.sort(key=lambda e: (e["start"], e["run_id"]), reverse=True)
    return entries if limit <= 0 else entries[:limit]


def latest_run(store: ObjectStore) -> str:
    """The id of the newest run under `store` (``NoRuns`` when there is none)."""
    newest = list_runs(store, limit=1)
    if not newest:
        raise NoRuns(f"no runs under {store.uri()} (no {store.uri('runs/')}RUN_ID/{_PLAN})")
    return newest[0]["run_id"]


def format_runs(entries: list[dict[str, Any]]) -> str:
    """A table: run id, start (UTC), status, succeeded / failed / skipped of the rows, wall time."""
    header = ("RUN", "START (UTC)", "STATUS", "SUCCEEDED", "FAILED", "SKIPPED", "ROWS", "TIME")
    rows = [header]
    for e in entries:
        c = e.get("counts") or {}
        secs = e.get("seconds")
        rows.append(
            (
                e["run_id"],
                e["start"][:19].replace("T", " "),
                e["status"],
                *(str(c[k]) if k in c else "-" for k in ("succeeded", "failed", "skipped")),
                "-" if e.get("rows") is None else str(e["rows"]),
                "-" if secs is None else f"{secs:.1f}s",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)
