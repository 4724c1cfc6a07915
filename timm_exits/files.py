"""Writing files and folders whole or not at all, and one writer per output folder.

A reader (or a resumed run) always finds a complete version: the new one once it is complete,
the previous one until then. Files are written under a temporary name and renamed into place
(:func:`atomic_file`). Folders (checkpoints, exports) are written under a temporary name, marked
complete, then swapped in while the previous version waits aside (:func:`atomic_folder`); a kill
at any moment of the swap leaves a complete version that :func:`recover_folder` puts back.
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

__all__ = ["atomic_file", "atomic_folder", "recover_folder", "write_json", "OutputLock", "check_writable",
           "claim_fresh_folder"]


@contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write to; when the block ends without error it
    replaces ``path`` in one rename, otherwise it is removed and ``path`` is untouched."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj: Any, **dump_kwargs: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, **dump_kwargs)


def _aside(folder: str, kind: str) -> str:
    parent, name = os.path.split(os.path.abspath(folder))
    return os.path.join(parent, f".{name}.{kind}")


@contextmanager
def atomic_folder(folder: str) -> Iterator[str]:
    """Yield a new temporary folder beside ``folder`` to fill; when the block ends without error it
    takes ``folder``'s place. Order: the new folder is renamed ``.<name>.next`` (complete), the
    current one ``.<name>.previous``, then ``.next`` becomes ``folder`` and ``.previous`` is deleted."""
    parent, name = os.path.split(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    recover_folder(folder)
    tmp = tempfile.mkdtemp(prefix=f".{name}.new-", dir=parent)
    try:
        yield tmp
        complete, previous = _aside(folder, "next"), _aside(folder, "previous")
        os.replace(tmp, complete)
        if os.path.exists(folder):
            os.replace(folder, previous)
        os.replace(complete, folder)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_folder(folder: str) -> Optional[str]:
    """Put ``folder`` back in order after a writer was killed: if it is missing, the complete
    ``.next`` (else the ``.previous``) version takes its place; unfinished or superseded versions
    are deleted. Returns what was restored (a sentence), or None if nothing needed restoring."""
    parent, name = os.path.split(os.path.abspath(folder))
    if not os.path.isdir(parent):
        return None
    restored = None
    if not os.path.exists(folder):
        for kind, what in (("next", "the new version, complete when the writer stopped"),
                           ("previous", "the previous version; the new one was not complete")):
            if os.path.isdir(_aside(folder, kind)):
                os.replace(_aside(folder, kind), folder)
                restored = f"restored {folder} from {what}"
                break
    for entry in os.listdir(parent):
        if entry in (f".{name}.next", f".{name}.previous") or entry.startswith(f".{name}.new-"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    return restored


_HELD: set = set()  # the real paths of the folders this process has locked


class OutputLock:
    """An exclusive lock on an output folder (created if needed), taken on creation: a second run
    on the same folder, in this process or another, is refused instead of overwriting this one's
    files. :meth:`release` (or leaving a ``with`` block) releases it; the operating system releases
    it when the process ends, however it ends, even while processes it forked (data-loader workers)
    live on: a POSIX record lock belongs to its process, where a ``flock`` would stay held by every
    forked child until the last one noticed and exited."""

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.folder, self._key = folder, os.path.realpath(folder)
        if self._key in _HELD:  # POSIX locks do not conflict within a process
            raise self._in_use(f"process {os.getpid()}")
        self.file = open(os.path.join(folder, ".lock"), "a+")
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise self._in_use(owner) from None
        _HELD.add(self._key)
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()}")
        self.file.flush()

    def _in_use(self, owner: str) -> FileExistsError:
        return FileExistsError(f"{self.folder!r} is in use by another run ({owner}); wait for it to end or choose "
                               f"another output folder")

    def release(self) -> None:
        file = getattr(self, "file", None)  # absent when the lock was refused
        if file is not None and not file.closed:
            _HELD.discard(self._key)
            fcntl.lockf(file, fcntl.LOCK_UN)
            file.close()

    __del__ = release  # a lock dropped without release is released (closing its file would release it anyway)

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable(folder: str, need_bytes: int = 0) -> None:
    """Refuse an output folder that cannot be written (read-only, not a folder) or whose file
    system has less than ``need_bytes`` free, before any work is done."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"output folder {folder!r} is a file; expected a folder (or a path to create)")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write to output folder {folder!r} ({e.strerror}); choose a writable "
                              f"--output-dir") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise OSError(errno.ENOSPC, f"output folder {folder!r} has {free / 2 ** 20:.0f} MiB free, the run needs "
                                    f"about {need_bytes / 2 ** 20:.0f} MiB; free some space or choose another "
                                    f"--output-dir")

def claim_fresh_folder(wanted: str, taken: Callable[[str], bool]) -> OutputLock:
    """The lock (:class:`OutputLock`) of the output folder ``wanted``, or, when another process holds
    it or it holds earlier output (``taken(folder)``), of the first of ``<wanted>-1``, ``<wanted>-2``,
    ... that is free: earlier output is kept, never overwritten. Each candidate is checked writable."""
    for candidate in (wanted if i == 0 else f"{wanted}-{i}" for i in itertools.count()):
        check_writable(candidate)
        try:
            lock = OutputLock(candidate)
        except FileExistsError:
            continue
        if not taken(candidate):
            return lock
        lock.release()
