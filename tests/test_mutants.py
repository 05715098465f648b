"""The mutation check (``scripts/mutants.py``, run by ``make mutants``) stays applicable.

Running the mutants takes minutes and stays outside ``make test``; these checks take
milliseconds: every mutant's old text is still in its file exactly once and every test it
names still exists, so editing the code a mutant breaks fails here instead of silently retiring
the mutant.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("mutants_script", ROOT / "scripts/mutants.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


mutants = _load_script()


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_every_mutant_still_applies_to_the_code(mutant) -> None:
    source = (ROOT / mutant.file).read_text()
    assert mutants.mutated_text(source, mutant) != source


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_every_targeted_test_exists(mutant) -> None:
    for target in mutant.tests:
        path, _, node = target.partition("::")
        assert (ROOT / path).is_file(), target
        if node:
            function = re.sub(r"\[.*\]$", "", node.split("::")[-1])
            assert f"def {function}(" in (ROOT / path).read_text(), target


def test_an_old_text_found_twice_or_not_at_all_is_refused() -> None:
    mutant = mutants.Mutant("m", "f.py", (("x = 1\n", "x = 2\n"),), ("tests/t.py",), "")
    assert mutants.mutated_text("x = 1\ny = 0\n", mutant) == "x = 2\ny = 0\n"
    for rotted in ("y = 0\n", "x = 1\nx = 1\n"):
        with pytest.raises(mutants.MutantRotted, match=r"f\.py"):
            mutants.mutated_text(rotted, mutant)
