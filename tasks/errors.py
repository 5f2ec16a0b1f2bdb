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
]


class RunError(ValueError):
    """A run cannot start or continue as asked; the message says why and what to do."""


class RunExists(RunError):
    """The run id is already taken under this output root (a run never replaces another's files)."""


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
