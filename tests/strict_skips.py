"""``QFORMER_NO_SKIPS=1`` (set by ``.ci/run``) or ``CI=true`` (set by CI services) turns every
skipped test into a failure.

A test that skips because the machine lacks something (Java for pycocoevalcap's tokenizer and
METEOR, say) is not a pass: in CI the machine must have it, so the skip is reported as the
failure it hides. Expected failures (xfail) are left as they are.
"""

from __future__ import annotations

import os

import pytest

NO_SKIPS_VARIABLE = "QFORMER_NO_SKIPS"


def skips_forbidden() -> bool:
    """True under ``.ci/run`` or any CI service that sets ``CI=true``."""
    return os.environ.get(NO_SKIPS_VARIABLE) == "1" or os.environ.get("CI", "").strip().lower() in (
        "true",
        "1",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not skips_forbidden():
        return
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, but CI allows no skips: {reason}"
