"""Fixtures of the data tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="session")
def train_hard_negatives_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 300 train images of the synthetic world with hard_negatives_train.json, which
    is not shipped (``make_sample_data.py --train-hard-negatives``); their captions, scenes and
    questions are the shipped ones."""
    sys.path.insert(0, str(SCRIPTS))
    import make_sample_data

    out = tmp_path_factory.mktemp("train-negatives")
    world = ["--num-train", "300", "--num-val", "0", "--num-test", "0", "--train-hard-negatives"]
    make_sample_data.main(["--out", str(out), *world])
    return out
