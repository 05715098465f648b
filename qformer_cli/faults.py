"""Fault injection for the reliability tests: fail like a lost node at a named point.

``QFORMER_FAULT=<point>[:<step>]`` arms one point from training step ``step`` on (default 1);
unset, every call here is a no-op. Tests only: nothing in normal use sets it.

Points (see RELIABILITY.md):

* ``mid_step`` -- die after backward, before the optimizer step;
* ``before_rename`` -- die after a checkpoint's temporary directory is complete, before the
  rename that publishes it;
* ``torn_metrics`` -- die halfway through writing a line of ``metrics.jsonl``;
* ``nan_loss`` -- do not die: every step's loss becomes NaN (a numerical fault).

``QFORMER_STOP_AFTER_STEP=<step>`` makes the training loop behave as if SIGTERM arrived during
that step (a signal's timing cannot be chosen from outside the process).

Dying is ``os._exit``: no ``finally`` blocks, no flushing, no atexit -- as if the node vanished.
"""

from __future__ import annotations

import os
from collections.abc import Callable

FAULT_ENV = "QFORMER_FAULT"
FAULT_EXIT_CODE = 97  # distinct from every exit code the CLI itself uses
POINTS = ("mid_step", "before_rename", "torn_metrics", "nan_loss")
STOP_AFTER_STEP_ENV = "QFORMER_STOP_AFTER_STEP"


def stop_requested(step: int) -> bool:
    """Whether ``QFORMER_STOP_AFTER_STEP`` asks the loop to stop as signalled at ``step``."""
    forced = os.environ.get(STOP_AFTER_STEP_ENV)
    return bool(forced) and step >= int(forced)


def fault_armed(point: str, step: int) -> bool:
    """Whether ``QFORMER_FAULT`` names ``point`` and training has reached its step."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    name, _, from_step = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"{FAULT_ENV}={spec}: unknown fault point (choose from {POINTS})")
    return name == point and step >= int(from_step or 1)


def maybe_fail(point: str, step: int, last_words: Callable[[], None] | None = None) -> None:
    """Exit at once, without any cleanup, when ``point`` is armed; ``last_words`` runs first
    (e.g. to leave half a line behind)."""
    if fault_armed(point, step):
        if last_words is not None:
            last_words()
        os._exit(FAULT_EXIT_CODE)
