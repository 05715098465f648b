"""Reading annotation JSON files with one-line errors that name the file and the entry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qformer_cli.errors import DataError


def shown(path: str | Path) -> str:
    """A path as messages show it: relative to the working directory when it is inside it."""
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_json(path: str | Path) -> Any:
    """Parse a UTF-8 JSON file (a byte-order mark is allowed); a missing, undecodable or
    malformed file raises :class:`DataError` naming the position."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{shown(path)}: file not found") from None
    except OSError as error:
        raise DataError(f"{shown(path)}: cannot read file ({error.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        where = f"line {line} column {column}"
        byte = raw[error.start]
        raise DataError(f"{shown(path)}: not UTF-8 at {where} (byte 0x{byte:02x})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise DataError(f"{shown(path)}: malformed JSON at {where} ({error.msg})") from None
    except RecursionError:
        raise DataError(f"{shown(path)}: JSON nested too deeply") from None


def entry_label(path: str | Path, kind: str, index: int, entry: Any, id_field: str) -> str:
    """Where an entry sits, for messages: "file: annotation 3 (question_id 12)"."""
    label = f"{shown(path)}: {kind} {index}"
    if isinstance(entry, dict) and id_field in entry:
        label += f" ({id_field} {entry[id_field]})"
    return label


def require_field(entry: Any, name: str, where: str, kinds: type | tuple[type, ...]) -> Any:
    """``entry[name]``, checked to be of ``kinds``; otherwise a :class:`DataError` at ``where``."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    if name not in entry:
        raise DataError(f"{where}: missing field '{name}'")
    value = entry[name]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        expected = " or ".join(k.__name__ for k in _as_tuple(kinds))
        raise DataError(f"{where}: field '{name}' should be {expected}, got {type(value).__name__}")
    return value


def require_text(entry: Any, name: str, where: str) -> str:
    """A string field that is not empty or blank (a caption, a question)."""
    value = require_field(entry, name, where, str)
    if not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def check_unique_id(seen: dict[Any, str], value: Any, where: str, name: str) -> None:
    """Refuse an id met before in the same list; ``seen`` maps each id to where it was first."""
    if value in seen:
        raise DataError(f"{where}: duplicate {name} {value!r} (first at {seen[value]})")
    seen[value] = where.rpartition(": ")[2]


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def require_list(payload: Any, path: str | Path, key: str | None) -> list[Any]:
    """The top-level list of a file: ``payload`` itself (``key`` None) or ``payload[key]``."""
    if key is not None:
        payload = require_field(payload, key, shown(path), list)
    if not isinstance(payload, list):
        raise DataError(f"{shown(path)}: expected a JSON list, got {type(payload).__name__}")
    return payload
