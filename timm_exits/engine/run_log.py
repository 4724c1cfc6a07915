"""The run folder's log.txt."""
from __future__ import annotations

from typing import Any




class RunLog:
    """The run folder's ``log.txt``: what the main process prints (as a ``sys.stdout`` that also writes
    to ``stream``), appended line by line, so a resumed run continues it. Kept in memory until
    :meth:`open` (the run's first checkpoint, or its end): a run that stops before it has files of its
    own, or a refused resume, leaves no log behind and changes none.

    Args:
        path: the ``log.txt`` to append to.
        stream: where every write goes too (the real ``sys.stdout``).
    """

    def __init__(self, path: str, stream: Any):
        self.path, self.stream, self.file, self.pending = path, stream, None, []

    def write(self, text: str) -> int:
        self.stream.write(text)
        if self.file is None:
            self.pending.append(text)
        else:
            self.file.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        if self.file is not None:
            self.file.flush()

    def open(self) -> None:
        """Append what was printed so far to the file, and from now on every line as it is printed."""
        if self.file is None:
            self.file = open(self.path, "a", buffering=1)  # line-buffered: a killed run loses no line
            self.file.write("".join(self.pending))
            self.pending.clear()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno, ...: the stream's
        return getattr(self.stream, name)
