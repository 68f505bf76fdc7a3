"""Which failures are the user's to fix, and how an entry point reports every failure.

A *known user error* — a bad config, an unknown ref, a file that cannot be imported, a table that
breaks its data contract, a store problem — is reported as one line, ``error: …``, saying what is
wrong and how to fix it (exit code 2). Anything else is a bug: it is reported as
``internal error: <type>: <message>`` with the path of a file holding the full traceback (exit
code 1), so a bug never hides behind a one-line message and a user error never drowns in a
traceback.

:class:`UserError` is the base for project code that detects a user's mistake and has no more
specific class; it is a ``ValueError``, so code that caught ``ValueError`` still does. The named
project errors listed in :func:`user_error_types` count as user errors too. An ``OSError`` that
describes the machine rather than the code (no permission, read-only or full disk) is also
reported in one line, with what to change.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
import traceback
from pathlib import Path

USER_ERROR_EXIT = 2
INTERNAL_ERROR_EXIT = 1

# OSErrors that describe the machine (permissions, space), with what to do about them.
_ENVIRONMENT_ERRNOS = {
    errno.EACCES: "check the permissions of that path, or choose another one (--store, --out)",
    errno.EPERM: "check the permissions of that path, or choose another one (--store, --out)",
    errno.EROFS: "the file system is read-only: choose a writable location (--store, --out)",
    errno.ENOSPC: "the disk is full: free space, or choose a location on another disk (--store, --out)",
    errno.EDQUOT: "the disk quota is exhausted: free space, or choose a location on another disk (--store, --out)",
}


class UserError(ValueError):
    """A mistake the user can fix (input, option, file); the message says what is wrong and how to fix it."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception classes whose messages are written for the user (imported lazily: the CLI starts fast)."""
    from pydantic import ValidationError

    from prefloop.config import ConfigFileError
    from prefloop.datasets_spec import ContractError
    from prefloop.stage import StageInputError
    from prefloop.storage import StoreError
    from prefloop.tasks.common.models import UnsafeModelError
    from prefloop.tasks.importing.sources import SourceImportError

    return (UserError, ConfigFileError, ValidationError, StoreError, ContractError, StageInputError,
            SourceImportError, UnsafeModelError)


def is_user_error(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
        return True
    return isinstance(error, user_error_types())


def describe_user_error(error: BaseException) -> str:
    """The message of a user error, with a pydantic validation error folded into one line."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in error.errors())
        return f"invalid {error.title}: {problems}"
    if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
        where = f" {error.filename}" if error.filename else ""
        return f"cannot use{where}: {error.strerror or error}; {_ENVIRONMENT_ERRNOS[error.errno]}"
    return str(error)


def log_directory(store_root: str | None) -> Path:
    """Where tracebacks go: ``logs/`` beside a local store (``.prefloop/logs`` for the default one)."""
    from prefloop.storage.layout import DEFAULT_STORE

    root = store_root or os.environ.get("PREFLOOP_STORE") or DEFAULT_STORE
    if "://" in root and not root.startswith("file://"):
        return Path(tempfile.gettempdir()) / "prefloop-logs"
    return Path(root.removeprefix("file://")).expanduser().resolve().parent / "logs"


def write_traceback(error: BaseException, store_root: str | None = None) -> Path:
    """Write ``error``'s full traceback to a new file and return its path (a temp dir when the log dir is not writable)."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    for directory in (log_directory(store_root), Path(tempfile.gettempdir()) / "prefloop-logs"):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / name
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    handle, fallback = tempfile.mkstemp(prefix="prefloop-error-", suffix=".txt")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
    return Path(fallback)
