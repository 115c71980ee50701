"""Errors that are the user's to fix: bad input, a missing file, a busy run folder. ``gmpi`` prints them as one line
(their messages name the file or field and what to do); any other exception is a bug and shows its traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class InputError(ValueError):
    """A value, file content or combination of options that cannot work; the message says which and what to do."""


class RunFolderBusy(RuntimeError):
    """Another live run holds this run folder (:mod:`gmpi_lightning.lock`)."""


USER_ERRORS = (InputError, FileNotFoundError, FileExistsError, RunFolderBusy)


def warner(prog: str) -> Callable[[str], None]:
    """A ``warn(msg)`` that prints ``PROG: warning: MSG`` to stderr (the commands' non-fatal notices)."""
    return lambda msg: print(f"{prog}: warning: {msg}", file=sys.stderr)
