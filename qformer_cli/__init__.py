"""qformer: train, evaluate and export BLIP-2 Q-Formers.

The Python API (see :mod:`qformer_cli.api`): ``load_model``, ``caption``, ``answer``,
``retrieve``. They load on first use, so ``import qformer_cli`` (and the command line) stays
quick.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Model", "answer", "caption", "load_model", "retrieve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from qformer_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'qformer_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
