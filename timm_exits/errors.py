"""What counts as a user's mistake: the exceptions that the command lines (``timm-exits``, the
recipes) print as one ``error: ...`` line with exit code 2 instead of a traceback. Everything the
package refuses is raised as one of these, with a message that says what was expected."""
from __future__ import annotations

import errno

__all__ = ["USER_ERRORS", "AnotherProcessStopped", "is_user_error"]


class AnotherProcessStopped(Exception):
    """This process of a multi-process run stops because another one refused the input; that one
    prints the ``error:`` line, this one exits with the same code without a second message."""

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError)
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES)  # full, read-only, forbidden


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (bad input, a full disk) rather than a bug to report."""
    return (isinstance(error, (*USER_ERRORS, AnotherProcessStopped))
            or (isinstance(error, OSError) and error.errno in DISK_ERRORS))
