"""A local-folder object store: keys are files below a root directory.

Writes go to a hidden temporary file in the target's folder first and are then published
atomically (``os.replace``, or ``os.link`` for ``if_absent``), so a reader never sees a
partial file and two racing ``if_absent`` writers produce exactly one winner.

No symbolic link below the root is followed, for reading or writing: each folder of a key is
opened relative to its parent's descriptor with ``O_NOFOLLOW`` (``openat`` style), so a link
planted anywhere below the root (``assets``, ``cache``, a sidecar) cannot redirect an operation,
not even one swapped in between a check and the use. Such a folder link raises
:class:`~storage.base.UnsafePath`; a link in an object's own place is no object (``exists`` is
False, ``list`` skips it, ``put`` replaces the link itself, ``get`` refuses it). The root
itself and the folders above it are the caller's choice (``--out``, ``--cache``) and may be
links. ``follow_links=True`` gives the plain behaviour, for stores that read inputs (manifests).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

from storage.base import (
    MissingFile,
    NotFound,
    NotRegularFile,
    ObjectStore,
    TooLarge,
    UnsafePath,
    check_key,
    file_kind,
)

__all__ = ["LocalStore", "read_file"]

logger = logging.getLogger(__name__)

_TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")  # our in-flight temporary files
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOCTTY: a terminal never becomes ours.
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | _CLOEXEC
_CHUNK = 1 << 20  # bytes per read() call


def _read_fd(fd: int, shown: str, max_bytes: int | None) -> bytes:
    """The bytes of the open regular file `fd` (at most ``max_bytes``, else :class:`TooLarge`)."""
    st = os.fstat(fd)
    if max_bytes is not None and st.st_size > max_bytes:
        raise TooLarge(shown, max_bytes, st.st_size)
    limit = None if max_bytes is None else max_bytes + 1  # one byte past the cap tells it grew
    chunks, total = [], 0
    while limit is None or total < limit:
        want = max(st.st_size + 1 - total, _CHUNK) if limit is None else limit - total
        chunk = os.read(fd, min(want, 1 << 30))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if max_bytes is not None and total > max_bytes:
        raise TooLarge(shown, max_bytes)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_file(path: str, *, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file at `path` (links followed: an input such as a source image).

    Opened without blocking and checked on the open descriptor (no race): a FIFO, device, socket
    or folder raises :class:`NotRegularFile`; more than ``max_bytes`` raises :class:`TooLarge`
    after reading at most ``max_bytes + 1``. A missing file raises :class:`MissingFile` (a
    :class:`NotFound` naming the absolute path).
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        raise MissingFile(os.path.abspath(path)) from None
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: a socket (or a device with no driver)
            raise
        raise NotRegularFile(path, file_kind(os.stat(path).st_mode)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, file_kind(mode))
        return _read_fd(fd, path, max_bytes)
    finally:
        os.close(fd)


class LocalStore(ObjectStore):
    """Objects as files below `root` (created on first write).

    ``below`` is a key prefix under `root` (what :meth:`child` makes): its folders are checked
    like a key's, so ``LocalStore(out).child("cache")`` never follows a link at ``out/cache``.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, below: str = "", follow_links: bool = False
    ) -> None:
        self.anchor = Path(root).expanduser().absolute()
        below = check_key(below.strip("/"), allow_empty=True)
        self._below = tuple(below.split("/")) if below else ()
        self.root = self.anchor.joinpath(*self._below)
        self.follow_links = follow_links

    def _parts(self, key: str) -> tuple[str, ...]:
        return (*self._below, *check_key(key).split("/"))

    # ------------------------------------------------------------ walking without links

    def _refuse_link(self, parts: tuple[str, ...]) -> UnsafePath:
        path = str(self.anchor.joinpath(*parts))
        return UnsafePath(
            path,
            f"refusing the symbolic link {path}: links below the store root {self.anchor} are "
            "never followed (one could lead outside the store root); remove it",
        )

    @contextlib.contextmanager
    def _folder(self, parts: tuple[str, ...], *, create: bool) -> Iterator[int | None]:
        """A descriptor of the folder `parts` below the anchor, each level opened without following
        a link; None when it does not exist (and ``create`` is False). ``UnsafePath`` for a link."""
        fd = self._open_folder(parts, create=create)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def _open_folder(self, parts: tuple[str, ...], *, create: bool) -> int | None:
        try:
            fd = os.open(self.anchor, _DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            if not create:
                return None
            self.anchor.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.anchor, _DIR_FLAGS)
        try:
            for i, name in enumerate(parts):
                sub = self._open_sub(fd, name, parts[: i + 1], create=create)
                os.close(fd)
                fd = sub
                if fd is None:
                    return None
            return fd
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise

    def _open_sub(self, fd: int, name: str, parts: tuple[str, ...], *, create: bool) -> int | None:
        """The folder `name` in the open folder `fd` (made when ``create``), not through a link."""
        flags = _DIR_FLAGS | (0 if self.follow_links else os.O_NOFOLLOW)
        for attempt in range(2):
            try:
                return os.open(name, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                if attempt:  # made, then removed again before it could be opened
                    raise
            except OSError as exc:
                # O_DIRECTORY|O_NOFOLLOW on a link: ENOTDIR (Linux) or ELOOP
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode) and not self.follow_links:
                    raise self._refuse_link(parts) from None
                if not create:  # a file where a folder would be: no object below it
                    return None
                raise
            with contextlib.suppress(FileExistsError):  # a racing writer may make it first
                os.mkdir(name, dir_fd=fd)
        raise AssertionError("unreachable")  # pragma: no cover

    def _lstat(self, fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=self.follow_links)
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------ the interface

    def get(self, key: str) -> bytes:
        parts = self._parts(key)
        shown = str(self.anchor.joinpath(*parts))
        flags = _READ_FLAGS | (0 if self.follow_links else os.O_NOFOLLOW)
        with self._folder(parts[:-1], create=False) as folder:
            if folder is None:
                raise NotFound(shown)
            try:
                fd = os.open(parts[-1], flags, dir_fd=folder)
            except (FileNotFoundError, NotADirectoryError):
                raise NotFound(shown) from None
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENXIO):
                    raise
                st = self._lstat(folder, parts[-1])
                if st is not None and stat.S_ISLNK(st.st_mode):
                    raise self._refuse_link(parts) from None
                raise UnsafePath(shown, f"{shown} is {file_kind(st.st_mode if st else 0)}, "
                                        "not a regular file; remove it") from None  # fmt: skip
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):  # a folder is a prefix, not an object
                raise NotFound(shown)
            if not stat.S_ISREG(mode):
                raise UnsafePath(
                    shown, f"{shown} is {file_kind(mode)}, not a regular file; remove it"
                )
            return _read_fd(fd, shown, None)
        finally:
            os.close(fd)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        parts = self._parts(key)
        name = parts[-1]
        shown = str(self.anchor.joinpath(*parts))
        with self._folder(parts[:-1], create=True) as folder:
            assert folder is not None
            st = self._lstat(folder, name)
            if st is not None and stat.S_ISLNK(st.st_mode):
                # never made by a store write: not an object; the link itself goes, never its target
                logger.warning("replacing the symbolic link %s (not written by editflow)", shown)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=folder)
            elif if_absent and st is not None:
                return False
            tmp = f".{name}.tmp-{uuid.uuid4().hex}"
            try:  # inside the try: a full disk leaves no temporary file behind
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC,
                             0o666, dir_fd=folder)  # fmt: skip
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if if_absent:
                    try:  # fails if `name` exists: one winner, never a partial file
                        os.link(
                            tmp, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False
                        )
                    except FileExistsError:
                        logger.debug("not overwriting existing %s", shown)
                        return False
                    except OSError as exc:
                        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                            raise
                        return self._put_exclusive(folder, name, data)  # no hard links here
                else:
                    os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=folder)
        return True

    @staticmethod
    def _put_exclusive(folder: int, name: str, data: bytes) -> bool:
        # Fallback for file systems without hard links: O_EXCL still gives one winner, but a
        # reader racing the writer could see a short file.
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC,
                         0o644, dir_fd=folder)  # fmt: skip
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def exists(self, key: str) -> bool:
        parts = self._parts(key)
        with self._folder(parts[:-1], create=False) as folder:
            st = None if folder is None else self._lstat(folder, parts[-1])
        return st is not None and stat.S_ISREG(st.st_mode)

    def list(self, prefix: str = "") -> Iterator[str]:
        check_key(prefix, allow_empty=True)
        # Walk the deepest folder that the prefix names fully, then filter by string prefix
        # (S3 semantics: 'runs/ab' matches 'runs/abc/x' too).
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        keys: list[str] = []
        start = tuple(folder.split("/")) if folder else ()
        try:
            fd = self._open_folder((*self._below, *start), create=False)
        except UnsafePath as exc:  # a link is no folder of this store: nothing in it is listed
            logger.warning("not listing below %s", exc)
            fd = None
        if fd is not None:
            try:
                self._walk(fd, folder + "/" if folder else "", prefix, keys)
            finally:
                os.close(fd)
        yield from sorted(keys)

    def folders(self, prefix: str) -> Iterator[str]:
        check_key(prefix, allow_empty=True)
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"a folder listing takes a prefix ending in '/', got {prefix!r}")
        start = tuple(prefix.rstrip("/").split("/")) if prefix else ()
        try:
            with self._folder((*self._below, *start), create=False) as fd:
                if fd is None:
                    return
                with os.scandir(fd) as entries:  # one level; links are not followed (as list)
                    names = [e.name for e in entries if e.is_dir(follow_symlinks=self.follow_links)]
        except UnsafePath as exc:
            logger.warning("not listing below %s", exc)
            return
        yield from sorted(names)

    def _walk(self, fd: int, rel: str, prefix: str, keys: list[str]) -> None:
        """Append to `keys` the objects below the open folder `fd` (key prefix `rel`) that start with
        `prefix`; links are skipped (and logged), never followed."""
        with os.scandir(fd) as entries:
            found = list(entries)
        for entry in found:
            key = rel + entry.name
            if not self.follow_links and entry.is_symlink():
                logger.warning("not listing %s: a symbolic link (not followed)", self.root / key)
                continue
            if entry.is_dir(follow_symlinks=self.follow_links):
                if not (key + "/").startswith(prefix) and not prefix.startswith(key + "/"):
                    continue  # nothing below can match
                flags = _DIR_FLAGS | (0 if self.follow_links else os.O_NOFOLLOW)
                try:
                    sub = os.open(entry.name, flags, dir_fd=fd)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # removed or replaced since the scan
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
                    continue
                try:
                    self._walk(sub, key + "/", prefix, keys)
                finally:
                    os.close(sub)
            elif entry.is_file(follow_symlinks=self.follow_links):
                if not _TMP_RE.match(entry.name) and key.startswith(prefix):
                    keys.append(key)

    def delete(self, key: str) -> None:
        parts = self._parts(key)
        with self._folder(parts[:-1], create=False) as folder:
            if folder is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(parts[-1], dir_fd=folder)  # a link itself goes, never its target

    def uri(self, key: str = "") -> str:
        return str(self.root / check_key(key)) if key else str(self.root)

    def child(self, prefix: str) -> LocalStore:
        prefix = check_key(prefix.strip("/"), allow_empty=True)
        below = "/".join(self._below + ((prefix,) if prefix else ()))
        return LocalStore(self.anchor, below=below, follow_links=self.follow_links)
