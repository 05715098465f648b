"""Shared fixtures: tiny transformers configs built from scratch (no network, random weights)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see cli.main

import pytest
import torch
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

pytest_plugins = ["tests.strict_skips"]

# No test writes into the source tree. Hypothesis would write .hypothesis/ into the working
# directory: its example database (off: every run draws afresh, and a failure prints its example)
# and its cache of the constants found in the code under test (moved to the temp directory).
settings.register_profile("qformer", database=None)
settings.load_profile("qformer")
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "qformer-hypothesis")

TINY_QFORMER = dict(
    vocab_size=99,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=96,
    encoder_hidden_size=48,
    max_position_embeddings=40,
    cross_attention_frequency=2,
)
TINY_VISION = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
TINY_OPT = dict(
    model_type="opt",
    hidden_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    ffn_dim=80,
    vocab_size=120,
    word_embed_proj_dim=40,
    max_position_embeddings=64,
)
NUM_QUERIES = 8


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def our_config(hf_qformer: dict, **extra):
    """Our QFormerConfig with the same sizes as a transformers Blip2QFormerConfig dict."""
    from qformer_cli.models.config import QFormerConfig

    return QFormerConfig(
        hidden_size=hf_qformer["hidden_size"],
        num_layers=hf_qformer["num_hidden_layers"],
        num_heads=hf_qformer["num_attention_heads"],
        intermediate_size=hf_qformer["intermediate_size"],
        encoder_width=hf_qformer["encoder_hidden_size"],
        vocab_size=hf_qformer["vocab_size"],
        max_position_embeddings=hf_qformer["max_position_embeddings"],
        cross_attention_freq=hf_qformer.get("cross_attention_frequency", 2),
        **extra,
    )


# Tiny trained runs shared by every test file that needs one (each costs tens of seconds on
# the CPU): the embedded default's recipe, small batches, a metrics row per step
# (tests/tiny_runs.py: TRAINED_STAGE1_STEPS, TRAINED_STAGE2_STEPS, SMALL_RUN).


@pytest.fixture(scope="session")
def trained_stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage-1 run of the tiny default, ``TRAINED_STAGE1_STEPS`` steps."""
    from tests.tiny_runs import SMALL_RUN, TRAINED_STAGE1_STEPS, invoke_json

    out = tmp_path_factory.mktemp("trained") / "stage1"
    steps = ("--max-steps", str(TRAINED_STAGE1_STEPS))
    invoke_json("pretrain-stage1", "--out", str(out), *steps, *SMALL_RUN)
    return out


@pytest.fixture(scope="session")
def trained_stage2(trained_stage1: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage-2 run (frozen tiny OPT) from ``trained_stage1``, ``TRAINED_STAGE2_STEPS`` steps."""
    from tests.tiny_runs import SMALL_RUN, TRAINED_STAGE2_STEPS, invoke_json

    out = tmp_path_factory.mktemp("trained") / "stage2"
    steps = ("--max-steps", str(TRAINED_STAGE2_STEPS))
    invoke_json(
        "pretrain-stage2", "--out", str(out), "--init", str(trained_stage1), *steps, *SMALL_RUN
    )
    return out
