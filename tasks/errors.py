"""Errors about a run as a whole, phrased for the user in one line (what, where, what to do).

The CLI prints them without a traceback and exits with 2 (bad arguments or stored state), or 3 for
:class:`StorageUnusable`.
"""

from __future__ import annotations

__all__ = [
    "RunError",
    "RunExists",
    "RunNotFound",
    "RunMismatch",
    "RunIncomplete",
    "RunDamaged",
    "StorageUnusable",
    "rerun_command",
]


def rerun_command(run_id: str, out: str, s3_endpoint: str | None = None) -> str:
    """The full command that finishes run `run_id` under `out` (with the endpoint it was reached at)."""
    import shlex

    endpoint = f" --s3-endpoint {shlex.quote(s3_endpoint)}" if s3_endpoint else ""
    return f"editflow rerun {shlex.quote(run_id)} --out {shlex.quote(out)}{endpoint}"


class RunError(ValueError):
    """A run cannot start or continue as asked; the message says why and what to do."""


class RunExists(RunError):
    """The run id is already taken under this output root (a run never replaces another's files)."""

    @classmethod
    def of(cls, run_id: str, out: str, plan_uri: str, s3_endpoint: str | None = None) -> RunExists:
        """The error for `run_id` under `out`, its hint the full rerun command (with `s3_endpoint`)."""
        return cls(
            f"run {run_id} already exists under {out} ({plan_uri}); choose another --run-id, "
            f"or finish that run with `{rerun_command(run_id, out, s3_endpoint)}`"
        )


class RunNotFound(RunError):
    """No run with this id under this output root."""


class RunMismatch(RunError):
    """A rerun's command-line options disagree with what the stored plan recorded."""


class RunIncomplete(RunError):
    """The stored plan is a placeholder: planning of that run was interrupted."""


class RunDamaged(RunError):
    """The stored plan does not parse, or holds values no run writes (an image format or shard index
    that would make keys outside the run); nothing is read or written from it."""


class StorageUnusable(Exception):
    """A location given on the command line (--out, --cache) cannot be written: found by a probe before
    the run starts; the CLI exits with 3 (storage), not 2."""
