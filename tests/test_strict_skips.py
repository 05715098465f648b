"""CI cannot go green by skipping: with ``QFORMER_NO_SKIPS=1`` or ``CI=true`` a skip fails."""

from __future__ import annotations

import pytest

from tests.strict_skips import NO_SKIPS_VARIABLE

pytest_plugins = ["pytester"]

SKIPPING_TESTS = """
import shutil
import pytest

@pytest.mark.skipif(shutil.which("no-such-program-here") is None, reason="needs a program")
def test_marked():
    pass

def test_imperative():
    pytest.skip("needs a Java runtime")

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False

def test_plain():
    pass
"""


def run_skipping_tests(pytester: pytest.Pytester) -> pytest.RunResult:
    pytester.makepyfile(test_skipping=SKIPPING_TESTS)
    return pytester.runpytest_inprocess("-p", "tests.strict_skips", "-rA")


@pytest.mark.parametrize("variable, value", [(NO_SKIPS_VARIABLE, "1"), ("CI", "true")])
def test_skips_fail_when_no_skips_are_allowed(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.delenv(NO_SKIPS_VARIABLE, raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv(variable, value)
    result = run_skipping_tests(pytester)
    # a skipif marker skips in setup, so pytest reports that one as an error: not a pass either
    result.assert_outcomes(passed=1, failed=1, errors=1, xfailed=1)
    result.stdout.fnmatch_lines(
        ["*CI allows no skips*needs a program*", "*CI allows no skips*needs a Java runtime*"]
    )


def test_skips_stay_skips_otherwise(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(NO_SKIPS_VARIABLE, raising=False)
    monkeypatch.delenv("CI", raising=False)
    result = run_skipping_tests(pytester)
    result.assert_outcomes(passed=1, skipped=2, xfailed=1)
