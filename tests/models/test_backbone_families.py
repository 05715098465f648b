"""Today's backbones through the whole user path: Llama-, Qwen2-, Mistral-, Phi- and
Gemma-family LLMs (each with its family's tokenizer conventions: BOS or none, which pad token;
Gemma scales its token embeddings inside its embedding module) and SigLIP, DINOv2 and
Blip2VisionModel towers (each with its
own image processor saved beside it). Tiny random models built from transformers' own classes:
stage 2 trains, captions, exports to ONNX and captions the same there; a run with each LLM,
converted to transformers, captions the same with transformers' processor and ``generate``.
(OPT and T5 have their own tests: tests/export/test_onnx_export.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from qformer_cli.cli import app
from qformer_cli.data import sample_backbone_dir
from tests.models.test_transformers_interop import (
    _image_folder,
    _images,
    cli_captions,
    transformers_captions,
)
from tests.tiny_runs import FAST, runner

WIDE_INIT = 0.3  # random LLMs whose captions depend on the image (see test_transformers_interop)
TOWER_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
)


def _family_tokenizer(directory: Path, bos: bool, pad: str | None) -> None:
    """The shipped OPT tokenizer's vocabulary dressed in a family's conventions."""
    opt = sample_backbone_dir("opt")
    tokenizer = json.loads((opt / "tokenizer.json").read_text())
    prepend = [{"SpecialToken": {"id": "<s>", "type_id": 0}}] if bos else []
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [*prepend, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [*prepend, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}} if bos else {},
    }  # fmt: skip
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    settings = {"tokenizer_class": "TokenizersBackend", "eos_token": "</s>", "unk_token": "<unk>"}
    settings |= {"bos_token": "<s>"} if bos else {}
    settings |= {"pad_token": pad} if pad else {}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))


# family -> (config class, model class, BOS token id, pad token) with each family's tokenizer
# conventions: Llama, Mistral and Gemma prepend BOS; Qwen2 and Phi do not; Qwen2 pads with its
# end token, Gemma with <pad>, the others have no pad token
LLM_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", 0, None),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", None, "</s>"),
    "mistral": ("MistralConfig", "MistralForCausalLM", 0, None),
    "phi": ("PhiConfig", "PhiForCausalLM", None, None),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", 0, "<pad>"),
}
PAD_IDS = {"</s>": 2, "<pad>": 1, None: None}


def _llm(directory: Path, family: str) -> Path:
    """A tiny random LLM of ``family`` (LLM_FAMILIES) with its tokenizer conventions."""
    config_class, model_class, bos, pad = LLM_FAMILIES[family]
    sizes = dict(
        vocab_size=420, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=2, initializer_range=WIDE_INIT, bos_token_id=bos, pad_token_id=PAD_IDS[pad],
    )  # fmt: skip
    if family == "gemma":
        sizes["head_dim"] = 16  # Gemma's default is 256
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**sizes)
    getattr(transformers, model_class)(config).save_pretrained(directory)
    _family_tokenizer(directory, bos=bos is not None, pad=pad)
    return directory


def _tower(directory: Path, family: str) -> Path:
    """A tiny random vision tower with its own image processor, saved as transformers saves
    them: SigLIP (a square, mean/std 0.5), DINOv2 (shorter side 72, centre crop 64, ImageNet
    mean/std) or Blip2VisionModel (BLIP-2's square)."""
    torch.manual_seed(0)
    if family == "siglip":
        config = transformers.SiglipVisionConfig(image_size=64, patch_size=16, **TOWER_SIZES)
        model, processor = (
            transformers.SiglipVisionModel(config),
            transformers.SiglipImageProcessorPil(size={"height": 64, "width": 64}),
        )
    elif family == "dinov2":
        model = transformers.Dinov2Model(
            transformers.Dinov2Config(image_size=64, patch_size=16, **TOWER_SIZES)
        )
        processor = transformers.BitImageProcessorPil(
            size={"shortest_edge": 72}, crop_size={"height": 64, "width": 64},
            image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD),
        )  # fmt: skip
    else:
        model = transformers.Blip2VisionModel(
            transformers.Blip2VisionConfig(image_size=64, patch_size=16, **TOWER_SIZES)
        )
        processor = transformers.BlipImageProcessorPil(size={"height": 64, "width": 64})
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _train_caption_export(
    tmp_path: Path, backbone: list[str], image_dependent: bool = True
) -> tuple[Path, Path, list[str]]:
    """pretrain-stage2 with ``backbone`` options, captions with --backend torch, export-onnx
    (whose parity check compares every graph's outputs with PyTorch's), and the same captions
    from --backend onnx; (run, image folder, captions)."""
    run = tmp_path / "run"
    trained = runner.invoke(
        app,
        ["pretrain-stage2", *backbone, "--out", str(run), *FAST, "--max-steps", "3",
         "--set", "data.vqa_questions=", "--quiet"],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    folder = _image_folder(tmp_path, count=6)
    ours = cli_captions(run, folder, tmp_path / "captions-torch")
    if image_dependent:  # else the shipped LM's prior after 3 steps: the same for every image
        assert len(set(ours)) > 1, ours
    exported = runner.invoke(
        app, ["export-onnx", "--model", str(run), "--out", str(tmp_path / "onnx")]
    )
    assert exported.exit_code == 0, exported.output
    onnx = cli_captions(tmp_path / "onnx", folder, tmp_path / "captions-onnx", "--backend", "onnx")
    assert onnx == ours
    return run, folder, ours


@pytest.mark.parametrize("family", list(LLM_FAMILIES))
def test_an_llm_family_trains_captions_exports_and_converts(tmp_path: Path, family: str) -> None:
    llm = _llm(tmp_path / family, family)
    run, folder, ours = _train_caption_export(tmp_path, ["--llm", str(llm)])
    converted = tmp_path / "hf"
    result = runner.invoke(app, ["convert", str(converted), "--model", str(run)])
    assert result.exit_code == 0, result.output
    assert transformers_captions(converted, _images(folder)) == ours


@pytest.mark.parametrize("family", ["siglip", "dinov2", "blip2vision"])
def test_a_vision_tower_trains_stage2_captions_and_exports(tmp_path: Path, family: str) -> None:
    tower = _tower(tmp_path / family, family)
    _train_caption_export(tmp_path, ["--vision-model", str(tower)], image_dependent=False)
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["parity"]  # checked, within tolerance
    # the export carries the tower's own transform: DINOv2's crop, the others' squares
    processor = json.loads((tmp_path / "onnx" / manifest["image_processor"]).read_text())
    assert processor.get("do_center_crop", False) == (family == "dinov2")
    from transformers.image_utils import OPENAI_CLIP_MEAN

    means = {"siglip": [0.5] * 3, "dinov2": IMAGENET_DEFAULT_MEAN, "blip2vision": OPENAI_CLIP_MEAN}
    assert processor["image_mean"] == pytest.approx(list(means[family]))


def test_a_chat_models_own_end_token_ends_its_captions(tmp_path: Path) -> None:
    """Chat models end a turn with a token of their own, listed in generation_config.json's
    eos_token_id (Qwen2-Instruct: <|im_end|>): generation stops there, in both backends."""
    llm = _llm(tmp_path / "qwen2", "qwen2")
    run, folder, ours = _train_caption_export(tmp_path, ["--llm", str(llm)])
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm)
    first = tokenizer(ours[0], add_special_tokens=False).input_ids
    end = first[2]  # the third token of the first image's caption
    config = transformers.GenerationConfig.from_pretrained(llm)
    config.eos_token_id = [2, end]
    config.save_pretrained(llm)
    ended = cli_captions(run, folder, tmp_path / "ended")
    assert ended[0] == tokenizer.decode(first[:2]).strip()  # stopped there, the end token cut
    assert all(end not in tokenizer(c, add_special_tokens=False).input_ids for c in ended)
    exported = runner.invoke(
        app, ["export-onnx", "--model", str(run), "--out", str(tmp_path / "o")]
    )
    assert exported.exit_code == 0, exported.output
    onnx = cli_captions(tmp_path / "o", folder, tmp_path / "ended-onnx", "--backend", "onnx")
    assert onnx == ended
