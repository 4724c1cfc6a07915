"""Writing files and folders whole or not at all, one writer per output folder, and reading back
JSON and weights files as untrusted input (bounded, typed errors that name the file).

A reader (or a resumed run) always finds a complete version: the new one once it is complete,
the previous one until then. Files are written under a temporary name and renamed into place
(:func:`atomic_file`). Folders (checkpoints, exports) are written under a temporary name, flushed
to disk and marked complete (a marker file written last), then swapped in while the previous
version waits aside (:func:`atomic_folder`); a kill at any moment of the swap leaves a complete
version that :func:`recover_folder` puts back. A folder writer replaces only what it wrote itself
(the marker names the kind of output) or an empty folder: never a user's files.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import pickle
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from timm.models import load_state_dict as timm_load_state_dict

__all__ = ["atomic_file", "atomic_folder", "recover_folder", "write_json", "read_json", "parse_json", "write_weights",
           "read_weights", "OutputLock", "check_writable", "claim_fresh_folder"]

MAX_JSON_NESTING = 64  # json, and whatever walks what it returns, would recurse past Python's limit on deeper input


def nests_deeper_than(obj: Any, levels: int) -> bool:
    """Whether parsed JSON nests too deeply (never recursing further than that).

    Args:
        obj: parsed JSON.
        levels: the nesting allowed (0: a scalar; 1: a list or mapping of scalars).

    Returns:
        True if ``obj`` nests more than ``levels`` deep.
    """
    if levels < 0:
        return True
    inside = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    return any(nests_deeper_than(v, levels - 1) for v in inside)


def nested_too_deeply(what: str) -> ValueError:
    return ValueError(f"{what} is nested too deeply (more than {MAX_JSON_NESTING} levels of JSON; what timm-exits "
                      f"writes needs fewer than 20)")


def parse_json(data: Union[bytes, str], what: str) -> Any:
    """JSON parsed, nested at most ``MAX_JSON_NESTING`` deep (for deeper nesting json itself
    raises RecursionError).

    Args:
        data: the JSON text.
        what: what the error calls it (a file name).

    Returns:
        The parsed value.

    Raises:
        ValueError: invalid or too deeply nested JSON; it names ``what``.
    """
    try:
        obj = json.loads(data)
    except RecursionError:
        raise nested_too_deeply(what) from None
    except ValueError as e:
        raise ValueError(f"{what} is not valid JSON ({e}), e.g. truncated or not a JSON file") from None
    if nests_deeper_than(obj, MAX_JSON_NESTING):
        raise nested_too_deeply(what)
    return obj


def read_json(path: str, max_bytes: int = 1 << 20) -> Any:
    """The JSON in a regular file, checked by :func:`parse_json`.

    Args:
        path: the file.
        max_bytes: larger files are refused unread (the files timm-exits writes have a few
            thousand bytes).

    Returns:
        The parsed value.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a folder, a special file, an oversized or malformed file; it names ``path``.
    """
    if not os.path.isfile(path):
        if not os.path.lexists(path):
            raise FileNotFoundError(f"{path} not found")
        raise ValueError(f"{path} is not a regular file (a folder or a special file); expected a JSON file")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} has more than {max_bytes} bytes, more than a JSON file of timm-exits ever holds: "
                         f"not one of its files")
    return parse_json(data, path)


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
    """Write ``obj`` as indented JSON to ``path`` atomically.

    Args:
        path: the file to write.
        obj: the value.
        **dump_kwargs: further ``json.dump`` arguments (e.g. ``default=str``).
    """
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, **dump_kwargs)


MARKER = ".timm-exits"  # written last into every folder atomic_folder writes: what it holds, file by file
_MARKER_LIMIT = 2 ** 24  # bytes read of a marker at most (ours list file names and sizes)


def _aside(folder: str, kind: str) -> str:
    parent, name = os.path.split(os.path.abspath(folder))
    return os.path.join(parent, f".{name}.{kind}")


def _fsync(path: str) -> None:
    """Flush a file's or a folder's (its entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mark_complete(folder: str, kind: str) -> None:
    """Flush every file of ``folder`` and the folder itself, then write the marker (and flush it):
    a version whose marker is missing, or whose files differ from the sizes it lists, is not complete."""
    files = {}
    for where, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(where, name)
            _fsync(path)
            files[os.path.relpath(path, folder)] = os.path.getsize(path)
        _fsync(where)
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump({"kind": kind, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync(folder)


def _marker(folder: str) -> Optional[Dict[str, Any]]:
    """The marker of a folder :func:`atomic_folder` wrote (``kind`` and ``files``), or None."""
    try:
        with open(os.path.join(folder, MARKER), "rb") as f:
            marker = json.loads(f.read(_MARKER_LIMIT + 1)[:_MARKER_LIMIT])
    except (OSError, ValueError, RecursionError):
        return None
    ok = isinstance(marker, dict) and isinstance(marker.get("kind"), str) and isinstance(marker.get("files"), dict)
    return marker if ok else None


def _complete(folder: str) -> bool:
    """Whether ``folder`` is a complete version: marked, with every listed file at its listed size."""
    marker = _marker(folder) if os.path.isdir(folder) and not os.path.islink(folder) else None
    return marker is not None and all(
        os.path.isfile(path := os.path.join(folder, name)) and os.path.getsize(path) == size
        for name, size in marker["files"].items())


def _files_in(folder: str) -> List[str]:
    """Every file under ``folder``, as a path relative to it."""
    return [os.path.relpath(os.path.join(where, name), folder) for where, _, names in os.walk(folder) for name in names]


def _shown(names: List[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _check_replaceable(folder: str, kind: str, legacy: Optional[Callable[[str], bool]]) -> None:
    """Refuse to replace a folder this package did not write as a ``kind`` (its marker says so, or
    ``legacy`` recognises one an older version wrote) unless it is empty or missing (a file or a
    link in its place is refused by :func:`recover_folder`, called first)."""
    if not os.path.lexists(folder):
        return
    entries = sorted(os.listdir(folder))
    marker = _marker(folder)
    if not entries or (marker is None and legacy is not None and legacy(folder)):
        return
    if marker is not None and marker["kind"] == kind:
        added = sorted(set(_files_in(folder)) - set(marker["files"]) - {MARKER})
        if not added:
            return
        raise FileExistsError(f"{folder!r} is a timm-exits {kind} with files added since it was written "
                              f"({_shown(added)}): it is not replaced, which would delete them; move them out or "
                              f"choose another folder")
    if marker is not None:
        raise FileExistsError(f"{folder!r} holds another kind of timm-exits output ({marker['kind']}; this writes a "
                              f"{kind}): it is not replaced; choose another folder, or remove it first")
    raise FileExistsError(f"{folder!r} is not empty ({_shown(entries)}) and was not written by timm-exits as a {kind}: it is "
                          f"not replaced; choose a new or empty folder, or remove this one first")


@contextmanager
def atomic_folder(folder: str, kind: str = "folder", legacy: Optional[Callable[[str], bool]] = None) -> Iterator[str]:
    """Yield a new temporary folder beside ``folder`` to fill; when the block ends without error it
    takes ``folder``'s place. Order: the new folder's files are flushed and its marker written last,
    it is renamed ``.<name>.next`` (complete), the current one ``.<name>.previous``, then ``.next``
    becomes ``folder``, the parent is flushed and ``.previous`` is deleted.

    Args:
        folder: the folder to write. Only a missing or empty folder, or one written here as the
            same ``kind`` (its marker says so), is replaced.
        kind: what the folder holds (``'checkpoint'``), recorded in its marker.
        legacy: a test recognising a folder of this kind an older version wrote, unmarked.

    Raises:
        FileExistsError: ``folder`` holds anything else; raised before the block runs.
    """
    parent, name = os.path.split(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    recover_folder(folder)
    _check_replaceable(folder, kind, legacy)
    tmp = tempfile.mkdtemp(prefix=f".{name}.new-", dir=parent)
    try:
        yield tmp
        _mark_complete(tmp, kind)
        complete, previous = _aside(folder, "next"), _aside(folder, "previous")
        os.replace(tmp, complete)
        if os.path.exists(folder):
            os.replace(folder, previous)
        os.replace(complete, folder)
        _fsync(parent)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_folder(folder: str) -> Optional[str]:
    """Put ``folder`` back in order after a writer was killed: the newest complete version of
    ``.next``, ``folder`` and ``.previous`` stays (or takes ``folder``'s place); unfinished and
    superseded versions are deleted. A version is complete when its marker, written last, says so;
    an unmarked ``folder`` in place (an older version's) counts as complete. If no version is
    complete, nothing is deleted and the leftovers are named (FileNotFoundError). Returns what was
    restored (a sentence), or None if nothing needed restoring."""
    parent, name = os.path.split(os.path.abspath(folder))
    folder = os.path.join(parent, name)
    if os.path.lexists(folder) and (os.path.islink(folder) or not os.path.isdir(folder)):
        raise FileExistsError(f"{folder!r} is not a folder; a folder belongs there: move it away, or choose "
                              f"another folder")
    if not os.path.isdir(parent):
        return None
    for entry in os.listdir(parent):  # never complete: a new version is renamed .next once it is
        if entry.startswith(f".{name}.new-"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    nxt, previous = _aside(folder, "next"), _aside(folder, "previous")
    leftovers = [p for p in (nxt, previous) if os.path.lexists(p)]
    if not leftovers:
        return None
    in_place = os.path.isdir(folder) and _marker(folder) is None
    newest = next((p for p in (nxt, folder, previous) if _complete(p) or (p == folder and in_place)), None)
    if newest is None:
        raise FileNotFoundError(f"no complete version of {folder!r}: {' and '.join(leftovers)} are not marked "
                                f"complete (a writer was stopped before it finished); if one of them is good, "
                                f"rename it to {name!r}, otherwise remove them")
    restored = None
    if newest == nxt:  # finish the swap the writer began
        if os.path.isdir(folder):
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(folder, previous)
        os.replace(nxt, folder)
        restored = f"restored {folder} from the new version, complete when the writer stopped"
    elif newest == previous:
        if os.path.isdir(folder):  # marked but incomplete: out of the way first, deleted below
            os.replace(folder, tempfile.mkdtemp(prefix=f".{name}.new-", dir=parent))
        os.replace(previous, folder)
        restored = f"restored {folder} from the previous version; the new one was not complete"
    _fsync(parent)
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
    forked child until the last one noticed and exited.

    Args:
        folder: the output folder (created if needed).
        created: the folder was made for this lock (:meth:`abandon` removes it).

    Raises:
        FileExistsError: another run holds the folder, or its ``.lock`` is not a file.
    """

    def __init__(self, folder: str, created: bool = False):
        os.makedirs(folder, exist_ok=True)
        self.folder, self._key, self.created = folder, os.path.realpath(folder), created
        self.found = set(os.listdir(folder))  # what the folder held before this lock's owner wrote to it
        if self._key in _HELD:  # POSIX locks do not conflict within a process
            raise self._in_use(f"process {os.getpid()}")
        path = os.path.join(folder, ".lock")
        if os.path.lexists(path) and not os.path.isfile(path):
            raise FileExistsError(f"{path!r} is not a file; the run's lock file belongs there: remove it, or choose "
                                  f"another output folder")
        self.file = open(path, "a+", errors="replace")  # what another run wrote is shown, never decoded strictly
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.file.seek(0)
            owner = self.file.read(200).strip() or "another process"
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

    def abandon(self) -> None:
        """Undo the start of a run that failed before it saved anything worth keeping: remove what was
        added to the folder since it was locked, the lock file, and the folder if it was made for this
        lock and is left empty; then release the lock. A user's files found there are kept. It runs
        while an error is on its way to the user, so what cannot be removed is left, silently."""
        added = set()
        with contextlib.suppress(OSError):
            added = set(os.listdir(self.folder)) - self.found - {".lock"}
        for name in [*added, ".lock"]:  # the lock file last, while it is held
            path = os.path.join(self.folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)
        self.release()
        if self.created:
            with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                os.rmdir(self.folder)

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


def check_writable(folder: str, need_bytes: int = 0) -> bool:
    """Refuse an output folder that cannot be written, before any work is done (created if needed).

    Args:
        folder: the output folder.
        need_bytes: the free space its file system must have.

    Returns:
        Whether it created the folder.

    Raises:
        FileExistsError: ``folder`` is a file.
        PermissionError: it cannot be written.
        OSError: its file system has less than ``need_bytes`` free (``errno.ENOSPC``).
    """
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"output folder {folder!r} is a file; expected a folder (or a path to create)")
    created = not os.path.isdir(folder)
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
    return created


def claim_fresh_folder(wanted: str, taken: Callable[[str], bool]) -> OutputLock:
    """Lock a fresh output folder: earlier output is kept, never overwritten. Each candidate is
    checked writable.

    Args:
        wanted: the output folder wanted.
        taken: whether a folder holds earlier output.

    Returns:
        The lock (:class:`OutputLock`) of ``wanted``, or, when another process holds it or it holds
        earlier output, of the first of ``<wanted>-1``, ``<wanted>-2``, ... that is free.
    """
    for candidate in (wanted if i == 0 else f"{wanted}-{i}" for i in itertools.count()):
        created = check_writable(candidate)
        try:
            lock = OutputLock(candidate, created)
        except FileExistsError:
            continue
        if not taken(candidate):
            return lock
        lock.release()


def write_weights(weights: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """safetensors' ``save_file``; a failed write (a full disk) is an OSError with its error number,
    as Python's own writes raise it, instead of safetensors' own error type.

    Args:
        weights: the state dict (contiguous tensors).
        path: the file to write.
        metadata: the file's string metadata (e.g. ``{'format': 'pt'}``).
    """
    try:
        save_file(weights, path, metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), f"cannot write {path}: {os.strerror(int(code.group(1)))}") from None


def read_weights(path: str) -> Dict[str, torch.Tensor]:
    """The state dict in a weights file: ``.safetensors``, or a PyTorch file read without unpickling
    code (timm's loader, ``weights_only``). A file that cannot be read so is a ValueError naming it."""
    if not os.path.isfile(path):
        if not os.path.lexists(path):
            raise FileNotFoundError(f"weights file not found: {path!r}")
        raise ValueError(f"{path!r} is not a regular file (a folder or a special file); expected a weights file")
    try:
        return timm_load_state_dict(path)
    except pickle.UnpicklingError:  # PyTorch's own message is a page of advice on allowing unsafe globals
        problem = "it holds pickled Python objects, which are never loaded, or is no PyTorch file at all"
    except (OSError, RuntimeError, EOFError, ValueError, SafetensorError) as e:
        problem = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    raise ValueError(f"{path!r} cannot be read as weights ({problem}): damaged, truncated or not a weights file; "
                     f"restore it from a copy or save the model again")
