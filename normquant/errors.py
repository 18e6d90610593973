"""The errors that mean "the user must change something", and their one-line rendering.

:data:`USER_ERRORS` are normquant's own error types; :func:`user_message` also recognizes the failures of the
environment a user can fix (a path that cannot be written, a full disk, too little memory, a value refused by a
validated option) and returns the one line to print, or None for an internal error (a bug: the CLI prints a
traceback with ``--debug``).
"""
from __future__ import annotations

import errno

from normquant.data.text import DataError
from normquant.export import ExportError
from normquant.io import DestinationError
from normquant.messages import one_line, show
from normquant.models.arch import UnsupportedArchitecture
from normquant.models.fold import FoldError
from normquant.models.loading import ModelLoadError
from normquant.pipeline.resume import ResumeError
from normquant.pipeline.step import StepError
from normquant.quant.primitives import QuantError
from normquant.recipe import RecipeError

USER_ERRORS = (RecipeError, StepError, ModelLoadError, DataError, QuantError, UnsupportedArchitecture, ExportError,
               FoldError, DestinationError, ResumeError, FileExistsError)

_OS_HINTS = {
    errno.ENOSPC: "no space left on the device; free some space or choose another location",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another location",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EACCES: "permission denied; choose a location you can write, or fix its permissions",
    errno.EPERM: "operation not permitted; choose a location you can write, or fix its permissions",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, a file was expected",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
}


def _validation_message(e) -> str:
    parts = []
    for err in e.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"]) or e.title
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')} (got {show(err.get('input'))})")
    return "; ".join(parts)


def user_message(e: BaseException) -> str | None:
    """The one line (without the ``normquant: error:`` prefix) for an error the user can fix, else None."""
    from pydantic import ValidationError

    if isinstance(e, USER_ERRORS):
        return one_line(e)
    if isinstance(e, ValidationError):  # an option validated by a schema (e.g. --windows 0 for eval)
        return one_line(_validation_message(e))
    if isinstance(e, OSError) and e.errno is not None:
        hint = _OS_HINTS.get(e.errno, e.strerror or "")
        target = e.filename if e.filename is not None else ""
        return one_line(f"{target}: {hint}" if target else hint)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return ("out of memory; lower calibration.samples / batch_size or evaluation.batch_size, use a smaller "
                "dtype, or a machine with more memory")
    if isinstance(e, FloatingPointError):  # non-finite loss or values
        return one_line(e)
    return None


__all__ = ["USER_ERRORS", "user_message"]
