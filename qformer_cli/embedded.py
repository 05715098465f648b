"""Where the embedded default's files are: ``sample_data/`` (the synthetic world and its tiny
backbones) and ``configs/`` (the shipped run configs), wherever the package runs from.

Lookup order for ``sample_data/``: ``$QFORMER_SAMPLE_DATA`` when set; else the copy installed
with the package (a wheel holds it as ``qformer_cli/_embedded/sample_data``, pyproject.toml);
else the source tree's top-level ``sample_data/`` (a checkout, or an editable install of one).
``configs/`` is found the same way, without an environment override.

This module imports nothing heavy: the config loader uses it before torch is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

SAMPLE_DATA = "sample_data"
CONFIGS = "configs"

_PACKAGE_DIR = Path(__file__).resolve().parent  # .../qformer_cli


def _shipped_folder(name: str) -> Path:
    """The installed copy (inside the package) if there is one, else the source tree's."""
    installed = _PACKAGE_DIR / "_embedded" / name
    if installed.is_dir():
        return installed
    return _PACKAGE_DIR.parent / name


def sample_data_dir() -> Path:
    override = os.environ.get("QFORMER_SAMPLE_DATA")
    if override:
        return Path(override).expanduser()
    return _shipped_folder(SAMPLE_DATA)


def configs_dir() -> Path:
    return _shipped_folder(CONFIGS)


def resolve_embedded_path(path: str) -> Path:
    """A path as the user means it.

    A path that exists as given (relative to the current directory, or absolute) is the user's
    own file. Otherwise a relative path starting with ``sample_data/`` or ``configs/`` (as the
    shipped configs and the built-in defaults write them) names a file of the embedded default,
    found as :func:`sample_data_dir` / :func:`configs_dir` say. Anything else is returned as
    given (a hub id, or a missing file for the caller to report).
    """
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute() or not given.parts:
        return given
    first, *rest = given.parts
    if first == SAMPLE_DATA:
        return sample_data_dir().joinpath(*rest)
    if first == CONFIGS:
        return configs_dir().joinpath(*rest)
    return given
