"""transformers' InstructBlipForConditionalGeneration through our commands: the instruction goes
to the Q-Former (beside the queries) and to the LLM, and `caption` / `ask` give the greedy texts
transformers' processor and `generate` give. A tiny random model built and saved by the
installed transformers, with the shipped OPT tokenizer and the shipped BERT tokenizer as the
Q-Former's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BlipImageProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
)

from qformer_cli.cli import app
from qformer_cli.config import load_config
from qformer_cli.data import sample_backbone_dir
from qformer_cli.inference.generate import instructed_soft_prompt, stop_token_ids
from qformer_cli.pretrained import load_stage2
from tests.models.test_transformers_interop import _image_folder, _images, tiny_blip2_settings
from tests.tiny_runs import runner

IMAGE_SIZE = 48
MAX_NEW_TOKENS = 6
INSTRUCTIONS = ["describe the image in detail.", "what colour is the shape on the left?"]


@pytest.fixture(scope="module")
def instructblip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("instructblip")
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=AutoTokenizer.from_pretrained(sample_backbone_dir("opt")),
        qformer_tokenizer=AutoTokenizer.from_pretrained(sample_backbone_dir("bert")),
        num_query_tokens=8,
    )
    config = InstructBlipConfig(
        **tiny_blip2_settings(processor, IMAGE_SIZE, vocab_size=len(processor.qformer_tokenizer))
    )
    torch.manual_seed(0)
    InstructBlipForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def transformers_texts(directory: Path, images: list, instruction: str) -> list[str]:
    """Greedy texts from transformers alone: its processor and model, loaded from directory."""
    model = InstructBlipForConditionalGeneration.from_pretrained(directory).eval()
    processor = InstructBlipProcessor.from_pretrained(directory)
    inputs = processor(images=images, text=[instruction] * len(images), return_tensors="pt")
    with torch.no_grad():
        output = model.generate(
            **inputs, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=stop_token_ids(processor.tokenizer),
        )  # fmt: skip
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [
        t.strip() for t in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    ]


def cli_texts(model: Path, images: Path, out: Path, instruction: str, *extra: str) -> list[str]:
    result = runner.invoke(
        app,
        ["caption", "--model", str(model), "--images", str(images), "--prompt", instruction,
         "--num-beams", "1", "--max-new-tokens", str(MAX_NEW_TOKENS), "--min-new-tokens", "0",
         "--out", str(out), "--json", "--quiet", *extra],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return [row["caption"] for row in json.loads((out / "captions.json").read_text())]


def test_caption_with_an_instruction_is_transformers_instructblip(
    instructblip: Path, tmp_path: Path
) -> None:
    folder = _image_folder(tmp_path)
    texts = {}
    for number, instruction in enumerate(INSTRUCTIONS):
        expected = transformers_texts(instructblip, _images(folder), instruction)
        assert len(set(expected)) > 1, expected  # the texts depend on the image
        texts[instruction] = cli_texts(instructblip, folder, tmp_path / f"out{number}", instruction)
        assert texts[instruction] == expected
    assert texts[INSTRUCTIONS[0]] != texts[INSTRUCTIONS[1]]


def test_ask_takes_the_question_to_the_qformer(instructblip: Path, tmp_path: Path) -> None:
    """`ask --image IMAGE QUESTION --prompt "{}"`: the question is the instruction."""
    folder = _image_folder(tmp_path, count=1)
    image = next(folder.glob("*.png"))
    question = INSTRUCTIONS[1]
    result = runner.invoke(
        app,
        ["ask", question, "--image", str(image), "--model", str(instructblip), "--prompt", "{}",
         "--num-beams", "1", "--max-new-tokens", str(MAX_NEW_TOKENS),
         "--set", "vqa.min_new_tokens=0", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [expected] = transformers_texts(instructblip, _images(folder), question)
    assert json.loads(result.stdout)["answers"][0]["answer"] == expected


def cli_texts_onnx(export: Path, images: Path, out: Path, instruction: str, beams: int) -> list:
    result = runner.invoke(
        app,
        ["caption", "--model", str(export), "--backend", "onnx", "--images", str(images),
         "--prompt", instruction, "--num-beams", str(beams), "--max-new-tokens",
         str(MAX_NEW_TOKENS), "--min-new-tokens", "0", "--out", str(out), "--json", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return [row["caption"] for row in json.loads((out / "captions.json").read_text())]


def test_an_instructblip_model_exports_to_onnx_and_captions_as_transformers(
    instructblip: Path, tmp_path: Path
) -> None:
    """export-onnx: the vision+Q-Former graph takes the instruction's Q-Former tokens; the onnx
    backend then gives transformers' greedy texts, and the torch backend's beam texts."""
    export = tmp_path / "onnx"
    result = runner.invoke(app, ["export-onnx", "--model", str(instructblip), "--out", str(export)])
    assert result.exit_code == 0, result.output
    inputs = json.loads((export / "manifest.json").read_text())["graphs"]["vision_qformer"]
    assert [entry["name"] for entry in inputs["inputs"]][1:] == [
        "instruction_ids",
        "instruction_mask",
    ]
    folder = _image_folder(tmp_path, count=5)
    for number, instruction in enumerate(INSTRUCTIONS):
        expected = transformers_texts(instructblip, _images(folder), instruction)
        greedy = cli_texts_onnx(export, folder, tmp_path / f"g{number}", instruction, beams=1)
        assert greedy == expected
    beams = cli_texts_onnx(export, folder, tmp_path / "beams", INSTRUCTIONS[1], beams=3)
    torch_beams = runner.invoke(
        app,
        ["caption", "--model", str(instructblip), "--images", str(folder), "--prompt",
         INSTRUCTIONS[1], "--num-beams", "3", "--max-new-tokens", str(MAX_NEW_TOKENS),
         "--min-new-tokens", "0", "--out", str(tmp_path / "torch-beams"), "--json", "--quiet"],
    )  # fmt: skip
    assert torch_beams.exit_code == 0, torch_beams.output
    rows = json.loads((tmp_path / "torch-beams" / "captions.json").read_text())
    assert beams == [row["caption"] for row in rows]


def test_an_instruction_aware_run_converts_to_transformers_instructblip(tmp_path: Path) -> None:
    """pretrain-stage2 with model.instruction_aware on the embedded default (captions and VQA
    pairs, the prompt also the Q-Former's input) -> convert --to transformers: transformers'
    InstructBLIP generates what the run does, for an instruction and for a VQA question."""
    run, converted = tmp_path / "run", tmp_path / "hf"
    trained = runner.invoke(
        app,
        ["pretrain-stage2", "--set", "model.instruction_aware=true", "--out", str(run),
         "--max-steps", "3", "--batch-size", "8", "--set", "model.qformer.num_layers=2",
         "--quiet"],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["convert", str(converted), "--model", str(run)])
    assert result.exit_code == 0, result.output
    assert json.loads((converted / "config.json").read_text())["model_type"] == "instructblip"
    folder = _image_folder(tmp_path, count=6)
    for number, instruction in enumerate([INSTRUCTIONS[0], "Question: is there a circle? Answer:"]):
        ours = cli_texts(run, folder, tmp_path / f"run{number}", instruction)
        assert any(ours)
        assert transformers_texts(converted, _images(folder), instruction) == ours
        assert cli_texts(converted, folder, tmp_path / f"hf{number}", instruction) == ours
    # LAVIS's layout keeps the Q-Former's text parts too: the .pth reads as instruction-aware
    lavis = tmp_path / "instruct.pth"
    result = runner.invoke(app, ["convert", str(lavis), "--model", str(run), "--to", "lavis"])
    assert result.exit_code == 0, result.output
    sizes = ["--set", "model.qformer.num_layers=2"]
    assert cli_texts(lavis, folder, tmp_path / "lavis", INSTRUCTIONS[0], *sizes) == cli_texts(
        run, folder, tmp_path / "run-again", INSTRUCTIONS[0]
    )
    # the same soft prompt for each instruction (greedy texts of a 3-step model can coincide)
    cpu = torch.device("cpu")
    loaded = [
        load_stage2(run, cpu),
        load_stage2(lavis, cpu, backbones=load_config(None, sizes[1:])),
    ]
    features = torch.randn(2, 17, loaded[0].bridge.config.encoder_width)
    for instruction in INSTRUCTIONS:
        prompts = [
            instructed_soft_prompt(p.bridge, features, [instruction] * 2, p.qformer_tokenizer)
            for p in loaded
        ]
        torch.testing.assert_close(prompts[1], prompts[0])
