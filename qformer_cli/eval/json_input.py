"""Reading evaluation input files (ground truth, results) with one-line errors naming the entry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qformer_cli.errors import DataError


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read JSON: {error}") from error


def json_entries(path: Path, data: Any, key: str | None) -> list[Any]:
    """The list of entries of a file: ``data[key]``, or ``data`` itself when ``key`` is None."""
    if key is None:
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
        return data
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f'{path}: expected a JSON object with a "{key}" list')
    return data[key]


def entry_field(path: Path, where: str, entry: Any, name: str, kinds: tuple[type, ...]) -> Any:
    """``entry[name]``, checked to be one of ``kinds`` (bools are never accepted as ids)."""
    if not isinstance(entry, dict):
        raise DataError(f"{path}: {where}: expected an object, got {type(entry).__name__}")
    if name not in entry:
        raise DataError(f'{path}: {where}: missing "{name}"')
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, kinds):
        wanted = " or ".join(kind.__name__ for kind in kinds)
        raise DataError(f'{path}: {where}: "{name}" must be {wanted}, got {type(value).__name__}')
    return value
