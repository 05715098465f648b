"""transformers' Blip2ForConditionalGeneration and ``qformer caption``: the same greedy captions.

Directories are written by the installed transformers (``save_pretrained``), and our side goes
through the command line, image loading and transform included. transformers 5 writes a
``Blip2Processor``'s image processor inside ``processor_config.json`` (no
``preprocessor_config.json``); the models here use a non-224 image size, so reading the wrong
file, or falling back to 224 px, fails. Tiny random models are built from configs (no network).
"""

from __future__ import annotations

import json
import logging
import shutil
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
    BlipImageProcessor,
    OPTConfig,
)
from typer.testing import CliRunner

from qformer_cli.cli import app
from qformer_cli.data import (
    ImageTransformConfig,
    load_transform_config,
    sample_backbone_dir,
    sample_split_files,
)
from qformer_cli.inference.generate import stop_token_ids
from tests.conftest import TINY_VISION

runner = CliRunner()
PROMPT = "a photo of"
MAX_NEW_TOKENS = 6
IMAGE_SIZE = 48  # not 224 (the default) and not 64 (the sample images' own size)
# Weights drawn wider than transformers' 0.02, so that random models' captions depend on the
# image (at 0.02 every image gets "of of of ..."), and a wrong transform shows in the words.
INIT_STD = 0.3


def _image_folder(tmp_path: Path, count: int = 4) -> Path:
    """The first ``count`` sample val images (64 px PNGs), copied to their own folder."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(sample_split_files("val").image_dir.glob("*.png"))[:count]:
        shutil.copy(path, folder / path.name)
    return folder


def _images(folder: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


def _opt_config(vocab: int) -> OPTConfig:
    return OPTConfig(
        vocab_size=vocab, hidden_size=40, num_hidden_layers=2, num_attention_heads=4, ffn_dim=80,
        word_embed_proj_dim=40, max_position_embeddings=64, bos_token_id=0, eos_token_id=2,
        pad_token_id=1, init_std=INIT_STD,
    )  # fmt: skip


def transformers_captions(
    directory: Path,
    images: list[Image.Image],
    processor: Blip2Processor | None = None,
    **search: float,
) -> list[str]:
    """Captions from transformers alone: its model and (by default) its processor, both loaded
    from ``directory``; greedy unless ``search`` gives ``generate`` other settings."""
    model = Blip2ForConditionalGeneration.from_pretrained(directory).eval()
    processor = processor or Blip2Processor.from_pretrained(directory)
    inputs = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt")
    with torch.no_grad():
        output = model.generate(
            **inputs,
            do_sample=False,
            eos_token_id=stop_token_ids(processor.tokenizer),
            **{"num_beams": 1, "max_new_tokens": MAX_NEW_TOKENS, **search},
        )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    texts = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [text.strip() for text in texts]


def cli_captions(model: Path, images: Path, out: Path, *options: str) -> list[str]:
    """``qformer caption --model MODEL --images FOLDER``, greedy unless ``options`` say otherwise,
    in file-name order."""
    result = runner.invoke(
        app,
        [
            "caption", "--model", str(model), "--images", str(images), "--prompt", PROMPT,
            "--num-beams", "1", "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--min-new-tokens", "0", "--out", str(out), "--json", *options,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    captions = json.loads(Path(json.loads(result.stdout)["captions"]).read_text())
    return [row["caption"] for row in captions]


def vqa_subset(tmp_path: Path, count: int = 12) -> tuple[Path, Path]:
    """The first ``count`` sample val questions and their annotations, as VQAv2 files."""
    files = sample_split_files("val")
    questions = json.loads(files.vqa_questions.read_text())
    questions["questions"] = questions["questions"][:count]
    kept = {q["question_id"] for q in questions["questions"]}
    annotations = json.loads(files.vqa_annotations.read_text())
    annotations["annotations"] = [a for a in annotations["annotations"] if a["question_id"] in kept]
    paths = tmp_path / "questions.json", tmp_path / "annotations.json"
    for path, content in zip(paths, (questions, annotations), strict=True):
        path.write_text(json.dumps(content))
    return paths


def cli_vqa_answers(model: Path, questions: Path, annotations: Path, out: Path) -> list[dict]:
    """``qformer eval-vqa --model MODEL`` on the sample val images, greedy."""
    result = runner.invoke(
        app,
        [
            "eval-vqa", "--model", str(model), "--questions", str(questions),
            "--annotations", str(annotations), "--images", str(sample_split_files("val").image_dir),
            "--num-beams", "1", "--out", str(out), "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(Path(json.loads(result.stdout)["results"]).read_text())


def tiny_blip2_settings(processor, image_size: int, **qformer: object) -> dict:
    """Config arguments of a random tiny BLIP-2 (or InstructBLIP) over ``processor``'s
    tokenizer: a ``image_size`` px vision tower, a 2-layer Q-Former (``qformer`` added to its
    settings) and an OPT, all drawn wider than transformers' 0.02 (``INIT_STD``)."""
    return dict(
        vision_config={**TINY_VISION, "image_size": image_size, "initializer_range": INIT_STD},
        qformer_config=dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            encoder_hidden_size=TINY_VISION["hidden_size"], initializer_range=INIT_STD, **qformer,
        ),
        text_config=_opt_config(len(processor.tokenizer)).to_dict(),
        num_query_tokens=8,
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=INIT_STD,
    )  # fmt: skip


def _save_blip2(directory: Path, image_size: int, **image_processor: object) -> Blip2Processor:
    """A random tiny Blip2ForConditionalGeneration (vision ``image_size`` px, an OPT with the
    shipped tokenizer) and its Blip2Processor (BlipImageProcessor defaults updated with
    ``image_processor``), saved by transformers; returns the processor."""
    tokenizer = AutoTokenizer.from_pretrained(sample_backbone_dir("opt"))
    size = {"height": image_size, "width": image_size}
    processor = Blip2Processor(
        BlipImageProcessor(size=size, **image_processor), tokenizer, num_query_tokens=8
    )
    config = Blip2Config(**tiny_blip2_settings(processor, image_size))
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return processor


def test_a_directory_saved_by_transformers_captions_like_transformers(tmp_path: Path) -> None:
    model_dir = tmp_path / "blip2"
    # Not CLIP's mean/std either: only this directory's processor config says these.
    _save_blip2(model_dir, IMAGE_SIZE, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # What transformers 5 writes: the image processor nested in processor_config.json.
    saved = json.loads((model_dir / "processor_config.json").read_text())["image_processor"]
    assert saved["size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert saved["image_mean"] == [0.5] * 3
    assert not (model_dir / "preprocessor_config.json").exists()

    folder = _image_folder(tmp_path)
    expected = transformers_captions(model_dir, _images(folder))
    assert len(set(expected)) > 1, expected  # the captions depend on the image
    assert cli_captions(model_dir, folder, tmp_path / "out") == expected


@pytest.mark.parametrize(("num_beams", "length_penalty"), [(5, 1.0), (3, -1.0)])
def test_beam_search_captions_like_transformers(
    tmp_path: Path, num_beams: int, length_penalty: float
) -> None:
    """Beam search (the default of ``caption`` and ``eval-vqa``) against transformers'
    ``generate`` with the same beams, length penalty and token limits; (3, -1.0) is the paper's
    VQA setting. This random model seldom ends a caption before the limit, so what is checked
    is the beam count reaching the search (went red with it forced to 1), not the penalty."""
    model_dir = tmp_path / "blip2"
    _save_blip2(model_dir, IMAGE_SIZE)
    folder = _image_folder(tmp_path)
    search = {"num_beams": num_beams, "length_penalty": length_penalty}
    expected = transformers_captions(
        model_dir, _images(folder), max_new_tokens=8, min_new_tokens=2, **search
    )
    greedy = transformers_captions(model_dir, _images(folder), max_new_tokens=8)
    assert expected != greedy  # the beams change the captions: this checks the search itself
    options = ["--num-beams", str(num_beams), "--length-penalty", str(length_penalty)]
    options += ["--max-new-tokens", "8", "--min-new-tokens", "2"]
    assert cli_captions(model_dir, folder, tmp_path / "out", *options) == expected


def test_a_directory_without_an_image_processor_uses_its_vision_image_size(tmp_path: Path):
    """No processor config at all (model + tokenizer only): the side comes from the vision
    config, mean/std are CLIP's (BlipImageProcessor's defaults)."""
    model_dir = tmp_path / "blip2"
    processor = _save_blip2(model_dir, IMAGE_SIZE)
    (model_dir / "processor_config.json").unlink()

    folder = _image_folder(tmp_path)
    expected = transformers_captions(model_dir, _images(folder), processor)
    assert cli_captions(model_dir, folder, tmp_path / "out") == expected


@pytest.mark.slow
def test_the_shipped_default_round_trips_through_transformers(tmp_path: Path) -> None:
    """pretrain-stage1 -> pretrain-stage2 on the embedded default -> convert --to transformers:
    the converted directory captions (and answers) as the run did, with our commands, and
    captions so with transformers' processor and ``generate`` too."""
    fast = ["--max-steps", "3", "--batch-size", "8", "--set", "model.qformer.num_layers=2"]
    stage1, stage2, converted = tmp_path / "s1", tmp_path / "s2", tmp_path / "hf"
    trained = runner.invoke(app, ["pretrain-stage1", "--out", str(stage1), *fast])
    assert trained.exit_code == 0, trained.output
    trained = runner.invoke(
        app, ["pretrain-stage2", "--init", str(stage1), "--out", str(stage2), *fast]
    )
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["convert", str(converted), "--model", str(stage2)])
    assert result.exit_code == 0, result.output

    _, info = Blip2ForConditionalGeneration.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    folder = _image_folder(tmp_path, count=6)
    ours = cli_captions(stage2, folder, tmp_path / "out-run")
    assert any(ours)
    assert cli_captions(converted, folder, tmp_path / "out-converted") == ours
    assert transformers_captions(converted, _images(folder)) == ours

    questions, annotations = vqa_subset(tmp_path)
    answers = cli_vqa_answers(stage2, questions, annotations, tmp_path / "vqa-run")
    assert len(answers) == 12 and any(a["answer"] for a in answers)
    assert cli_vqa_answers(converted, questions, annotations, tmp_path / "vqa-hf") == answers


def test_processor_config_is_read_before_preprocessor_config(tmp_path: Path) -> None:
    """transformers' own order when a folder has both (a processor saved by transformers 4
    beside one saved by 5): the image processor nested in processor_config.json wins."""
    BlipImageProcessor(size={"height": 96, "width": 96}).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(sample_backbone_dir("opt"))
    image_processor = BlipImageProcessor(size={"height": 40, "width": 40}, image_mean=[0.5] * 3)
    Blip2Processor(image_processor, tokenizer, num_query_tokens=8).save_pretrained(tmp_path)
    loaded = Blip2Processor.from_pretrained(tmp_path).image_processor
    config = load_transform_config(tmp_path)
    assert config.image_size == loaded.size["height"] == 40
    assert list(config.mean) == list(loaded.image_mean) == [0.5] * 3
    assert "processor_config.json" in config.source


def test_without_a_processor_the_vision_config_size_is_used_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Blip2VisionConfig(**{**TINY_VISION, "image_size": 40}).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        config = load_transform_config(tmp_path)
    assert config == ImageTransformConfig(40)  # CLIP mean/std, bicubic
    assert "no image processor config; 40 px from its vision config" in caplog.text
