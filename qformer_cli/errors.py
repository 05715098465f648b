"""Error types the CLI turns into one-line messages and exit codes.

Library code raises these; only ``cli.py`` catches them. Anything else that escapes is a bug and
is reported with exit code 1 (with a traceback under ``--debug``).
"""

from __future__ import annotations


class QformerError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    exit_code = 1
    label = "error"  # how the CLI's one line starts


class UsageError(QformerError):
    """Bad options or configuration (unknown key, wrong type, conflicting flags): exit code 2."""

    exit_code = 2


class DataError(QformerError):
    """Unreadable or malformed input data; the message names the file and the entry: exit code 1."""

    exit_code = 1


class Interrupted(QformerError):
    """Stopped by the user (Ctrl-C) or a signal, after saving what there was to save: exit 130."""

    exit_code = 130
    label = "stopped"


class CheckpointError(QformerError):
    """A checkpoint or weight file that cannot be used (missing, corrupt, bad keys): exit 1."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """An exception's message reduced to its first line (its type name when it has none): what a
    library's multi-line error contributes to our one-line messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
