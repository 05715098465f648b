"""Weights both ways with transformers' Blip2ForConditionalGeneration: the same greedy captions.

Tiny randomly initialized models built from configs (no network): a Blip2VisionModel encoder and
an OPT LM with the shipped sample tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2VisionConfig,
    Blip2VisionModel,
    BlipImageProcessor,
    OPTConfig,
    OPTForCausalLM,
)
from typer.testing import CliRunner

from qformer_cli.cli import app
from qformer_cli.data import sample_backbone_dir, sample_split_files
from qformer_cli.generate import GenerationSettings, generate_text, stop_token_ids
from qformer_cli.pretrained import load_stage2
from qformer_cli.train.common import image_features
from tests.conftest import TINY_VISION

GREEDY = GenerationSettings(num_beams=1, max_new_tokens=6, min_new_tokens=0)
PROMPT = "a photo of"


def _images(count: int = 3) -> list[Image.Image]:
    folder = sample_split_files("val").image_dir
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))[:count]]


def _image_processor() -> BlipImageProcessor:
    return BlipImageProcessor(size={"height": 32, "width": 32})


def _opt_config(vocab: int) -> OPTConfig:
    return OPTConfig(
        vocab_size=vocab, hidden_size=40, num_hidden_layers=2, num_attention_heads=4, ffn_dim=80,
        word_embed_proj_dim=40, max_position_embeddings=64, bos_token_id=0, eos_token_id=2,
        pad_token_id=1,
    )  # fmt: skip


def _transformers_captions(directory: Path, images: list[Image.Image]) -> list[str]:
    model = Blip2ForConditionalGeneration.from_pretrained(directory).eval()
    processor = Blip2Processor.from_pretrained(directory)
    inputs = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt")
    with torch.no_grad():
        output = model.generate(
            **inputs,
            do_sample=False,
            num_beams=1,
            max_new_tokens=GREEDY.max_new_tokens,
            eos_token_id=stop_token_ids(processor.tokenizer),
        )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [
        t.strip() for t in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    ]


def _our_captions(model_path: Path, images: list[Image.Image]) -> list[str]:
    pipeline = load_stage2(model_path, torch.device("cpu"))
    processor = _image_processor()
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    features = image_features(pipeline.vision, pixels, torch.device("cpu"), "fp32")
    return generate_text(
        pipeline.bridge, pipeline.llm, pipeline.tokenizer, features, [PROMPT] * len(images), GREEDY
    )


def test_a_transformers_blip2_directory_captions_like_transformers(tmp_path: Path):
    tokenizer = AutoTokenizer.from_pretrained(sample_backbone_dir("opt"))
    processor = Blip2Processor(_image_processor(), tokenizer, num_query_tokens=8)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    config = Blip2Config(
        vision_config=TINY_VISION,
        qformer_config=dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            encoder_hidden_size=TINY_VISION["hidden_size"],
        ),
        text_config=_opt_config(len(processor.tokenizer)).to_dict(),
        num_query_tokens=8,
        image_token_index=image_token,
    )  # fmt: skip
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    images = _images()
    expected = _transformers_captions(tmp_path, images)
    assert any(expected)  # random weights still produce tokens
    assert _our_captions(tmp_path, images) == expected


@pytest.mark.slow
def test_our_checkpoint_converts_to_transformers_with_the_same_captions(tmp_path: Path):
    vision_dir, llm_dir = tmp_path / "vision", tmp_path / "opt"
    torch.manual_seed(0)
    Blip2VisionModel(Blip2VisionConfig(**TINY_VISION)).save_pretrained(vision_dir)
    _image_processor().save_pretrained(vision_dir)
    tokenizer = AutoTokenizer.from_pretrained(sample_backbone_dir("opt"))
    OPTForCausalLM(_opt_config(len(tokenizer))).save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)

    runner = CliRunner()
    run = tmp_path / "run"
    trained = runner.invoke(
        app,
        [
            "pretrain-stage2", "--max-steps", "2", "--batch-size", "4", "--out", str(run),
            "--set", f"model.vision.model={vision_dir}", "--set", f"model.llm.model={llm_dir}",
            "--set", "model.qformer.num_layers=2", "--set", "train.warmup_steps=1",
            "--set", "train.lr=1e-2",
        ],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    converted = runner.invoke(app, ["convert", str(tmp_path / "hf"), "--model", str(run)])
    assert converted.exit_code == 0, converted.output

    _, info = Blip2ForConditionalGeneration.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    images = _images()
    ours = _our_captions(run, images)
    assert any(ours)
    assert ours == _transformers_captions(tmp_path / "hf", images)
