"""``qformer convert --to transformers``: the LLM's added ``<image>`` row and repeatability."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from tests.tiny_runs import invoke_json


def test_the_image_token_row_copies_the_pad_row_and_conversion_repeats(
    trained_stage2: Path, tmp_path: Path
) -> None:
    """transformers' BLIP-2 needs an ``<image>`` token id inside the LLM's embeddings; the row
    added for it is the pad row (never preferred over pad), not a random draw, so converting
    the same run twice writes the same bytes."""
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        invoke_json("convert", "--model", str(trained_stage2), str(out))
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    config = json.loads((first / "config.json").read_text())
    image_token, pad = config["image_token_index"], config["text_config"]["pad_token_id"]
    tensors = load_file(str(first / "model.safetensors"))
    for name in (
        "language_model.model.decoder.embed_tokens.weight",
        "language_model.lm_head.weight",
    ):
        if name in tensors:
            rows = tensors[name]
            assert rows.shape[0] == image_token + 1, name
            assert rows[image_token].equal(rows[pad]), name
