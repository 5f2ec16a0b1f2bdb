"""A local-folder object store: keys are files below a root directory.

Writes go to a hidden temporary file in the target's folder first and are then published
atomically (``os.replace``, or ``os.link`` for ``if_absent``), so a reader never sees a
partial file and two racing ``if_absent`` writers produce exactly one winner.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

from storage.base import NotFound, ObjectStore, check_key

__all__ = ["LocalStore"]

logger = logging.getLogger(__name__)

_TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")  # our in-flight temporary files


class LocalStore(ObjectStore):
    """Objects as files below `root` (created on first write)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(str(path)) from None

    def _check_inside(self, path: Path) -> None:
        """Refuse a write whose folder resolves outside the root (a symlinked folder inside it)."""
        root = self.root.resolve()
        real = path.parent.resolve()
        if real != root and root not in real.parents:
            raise PermissionError(
                errno.EACCES,
                f"refusing to write outside the store root {root}: {path.parent} resolves to {real}",
                str(path),
            )

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        path = self._path(key)
        self._check_inside(path)
        if path.is_symlink():  # never made by a store write: not an object, and never followed
            logger.warning("replacing the symbolic link %s (not written by editflow)", path)
            path.unlink()
        elif if_absent and path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        try:
            with open(
                tmp, "wb"
            ) as f:  # inside the try: a full disk leaves no temporary file behind
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                try:
                    os.link(tmp, path)  # fails if `path` exists: one winner, never a partial file
                except FileExistsError:
                    logger.debug("not overwriting existing %s", path)
                    return False
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise
                    return self._put_exclusive(path, data)  # file system without hard links
            else:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    @staticmethod
    def _put_exclusive(path: Path, data: bytes) -> bool:
        # Fallback for file systems without hard links: O_EXCL still gives one winner, but a
        # reader racing the writer could see a short file.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        check_key(prefix, allow_empty=True)
        # Walk the deepest folder that the prefix names fully, then filter by string prefix
        # (S3 semantics: 'runs/ab' matches 'runs/abc/x' too).
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root / folder if folder else self.root
        keys = []
        for dirpath, _dirnames, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            rel = "" if rel == "." else rel + "/"
            for name in filenames:
                if _TMP_RE.match(name):
                    continue
                key = rel + name
                if key.startswith(prefix):
                    keys.append(key)
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def uri(self, key: str = "") -> str:
        return str(self.root / check_key(key)) if key else str(self.root)

    def child(self, prefix: str) -> LocalStore:
        prefix = check_key(prefix.strip("/"), allow_empty=True)
        return LocalStore(self.root / prefix) if prefix else LocalStore(self.root)
