"""What counts as a user's mistake: the exceptions that the command lines (``timm-exits``, the
recipes) print as one ``error: ...`` line with exit code 2 instead of a traceback. Everything the
package refuses is raised as one of these, with a message that says what was expected."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from typing import List

__all__ = ["USER_ERRORS", "AnotherProcessStopped", "is_user_error", "report_user_error", "launch"]


class AnotherProcessStopped(Exception):
    """This process of a multi-process run stops because another one refused the input; that one
    prints the ``error:`` line, this one exits with the same code without a second message."""

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError)
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES)  # full, read-only, forbidden
ERROR_FILE = "TIMM_EXITS_ERROR_FILE"  # set by `timm-exits launch`: where its processes leave a user's mistake


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (bad input, a full disk) rather than a bug to report."""
    return (isinstance(error, (*USER_ERRORS, AnotherProcessStopped))
            or (isinstance(error, OSError) and error.errno in DISK_ERRORS))


def report_user_error(error: BaseException) -> None:
    """Show a user's mistake as one ``error: ...`` line on stderr; under :func:`launch`, leave it to the
    launcher instead (the first process to fail reports, the others' copies are dropped), which prints
    it once, after the launcher's own report of the failed processes."""
    path = os.environ.get(ERROR_FILE)
    if not path:
        print(f"error: {error}", file=sys.stderr)
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(str(error))


def launch(argv: List[str]) -> int:
    """``accelerate launch --quiet ARGV`` (``timm-exits launch``) that ends with the run's mistake: the
    launcher adds no traceback of its own, and a user's error (see :func:`report_user_error`) is the
    last line printed, once; returns 2 for it, else the launcher's exit code."""
    with tempfile.TemporaryDirectory(prefix="timm-exits-launch-") as folder:
        path = os.path.join(folder, "error")
        code = subprocess.call([sys.executable, "-m", "accelerate.commands.launch", "--quiet", *argv],
                               env={**os.environ, ERROR_FILE: path})
        if os.path.isfile(path):
            with open(path, errors="replace") as f:
                print(f"error: {f.read()}", file=sys.stderr)
            return 2
    return code
