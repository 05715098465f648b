"""ONNX export of a tiny trained stage-2 model: graphs, manifest, parity, onnxruntime generation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from qformer_cli.cli import app
from qformer_cli.data import build_transform, load_transform_config, read_coco_captions
from qformer_cli.data.sample import load_image
from qformer_cli.data.sample_data import sample_split_files
from qformer_cli.errors import QformerError, UsageError
from qformer_cli.eval.captioning import generate_for_samples
from qformer_cli.export.onnx_export import check_parity, export_onnx
from qformer_cli.export.onnx_runtime import (
    OnnxPipeline,
    generate_for_samples_onnx,
    generate_text_onnx,
)
from qformer_cli.generate import GenerationSettings, generate_text, stop_token_ids
from qformer_cli.pretrained import Stage2Pipeline, load_stage2

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage-2 run directory: the shipped tiny CLIP + OPT, a few training steps."""
    out = tmp_path_factory.mktemp("stage2")
    result = CliRunner().invoke(
        app, ["pretrain-stage2", "--max-steps", "3", "--batch-size", "8", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def pipeline(trained: Path) -> Stage2Pipeline:
    return load_stage2(trained, CPU)


@pytest.fixture(scope="module")
def exported(pipeline: Stage2Pipeline, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("onnx")
    return out, export_onnx(pipeline, out)


def test_graphs_pass_the_full_checker(exported) -> None:
    out, _ = exported
    for name in ("vision_qformer.onnx", "llm_prefill.onnx", "llm_decode.onnx"):
        onnx.checker.check_model(str(out / name), full_check=True)
        assert onnx.load(str(out / name)).opset_import[0].version >= 17


def test_parity_within_tolerance_at_two_batch_sizes(exported) -> None:
    _, manifest = exported
    parity = manifest["parity"]
    assert parity["tolerance"] == 1e-4
    assert parity["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert set(parity["max_abs_diff"]) == {"vision_qformer", "llm_prefill", "llm_decode"}
    for per_batch in parity["max_abs_diff"].values():
        assert set(per_batch) == {"batch_1", "batch_3"}
        for diffs in per_batch.values():
            assert "logits" in diffs or "soft_prompt" in diffs
            assert all(0 <= diff <= 1e-4 for diff in diffs.values())


def test_manifest_describes_graphs_tokenizer_and_generation(exported, pipeline) -> None:
    out, returned = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == json.loads(json.dumps(returned))
    assert manifest["opset"] == 17 and manifest["precision"] == "fp32"
    assert manifest["llm_family"] == "decoder-only"
    assert manifest["num_query_tokens"] == pipeline.bridge.config.num_query_tokens
    assert manifest["stop_token_ids"] == stop_token_ids(pipeline.tokenizer)
    assert manifest["generation"]["max_new_tokens"] == GenerationSettings().max_new_tokens
    layers = manifest["num_layers"]

    vision = manifest["graphs"]["vision_qformer"]
    assert vision["inputs"] == [
        {"name": "pixel_values", "shape": ["batch", 3, 64, 64], "dtype": "float32"}
    ]
    queries, dim = manifest["num_query_tokens"], manifest["embedding_dim"]
    assert vision["outputs"][0]["shape"] == ["batch", queries, dim]

    decode = manifest["graphs"]["llm_decode"]
    names = [i["name"] for i in decode["inputs"]]
    assert names[:2] == ["inputs_embeds", "attention_mask"] and len(names) == 2 + 2 * layers
    assert decode["inputs"][1]["shape"] == ["batch", "total_sequence"]
    assert decode["inputs"][2]["shape"][0] == "batch"
    assert decode["inputs"][2]["shape"][2] == "past_sequence"
    prefill = manifest["graphs"]["llm_prefill"]
    assert prefill["outputs"][0]["shape"][:2] == ["batch", "sequence"]
    assert [o["name"] for o in prefill["outputs"]][1:3] == ["present.0.key", "present.0.value"]

    for name in ("vision_qformer.onnx", "llm_prefill.onnx", "llm_decode.onnx"):
        assert (out / name).is_file()
    embeddings = np.load(out / manifest["embeddings"]["file"])
    assert embeddings.shape == (manifest["vocab_size"], dim)
    assert (out / manifest["tokenizer"] / "tokenizer_config.json").is_file()
    assert (out / manifest["image_processor"]).is_file()


def test_onnx_greedy_generation_matches_torch(exported, pipeline) -> None:
    out, _ = exported
    runtime = OnnxPipeline.load(out)
    assert runtime.provider == "CPUExecutionProvider" or torch.cuda.is_available()
    files = sample_split_files("val")
    samples = read_coco_captions(files.coco_captions, files.image_dir)[:3]
    # Read the transform from the export directory: it must match the torch side's.
    transform = build_transform(load_transform_config(runtime.image_processor_source), train=False)
    torch_transform = build_transform(
        load_transform_config(pipeline.image_processor_source), train=False
    )
    pixels = torch.stack([transform(load_image(s)) for s in samples])
    assert torch.equal(pixels, torch.stack([torch_transform(load_image(s)) for s in samples]))
    # Prompts of different lengths exercise the left padding.
    prompts = ["a photo of", "", "Question: what is on the left? Answer:"]
    for settings in (
        GenerationSettings(num_beams=1, max_new_tokens=8, min_new_tokens=0),
        GenerationSettings(num_beams=1, max_new_tokens=6, min_new_tokens=4),
    ):
        with torch.no_grad():
            features = pipeline.vision(pixels)
        expected = generate_text(
            pipeline.bridge, pipeline.llm, pipeline.tokenizer, features, prompts, settings
        )
        got = generate_text_onnx(runtime, pixels.numpy(), prompts, settings)
        assert got == expected


def test_beam_search_is_refused(exported) -> None:
    out, _ = exported
    runtime = OnnxPipeline.load(out)
    with pytest.raises(UsageError):
        pixels = np.zeros((1, 3, 64, 64), np.float32)
        generate_text_onnx(runtime, pixels, [""], GenerationSettings())


def test_parity_check_catches_a_changed_weight(exported, pipeline) -> None:
    out, _ = exported
    broken = copy.copy(pipeline)
    broken.bridge = copy.deepcopy(pipeline.bridge)
    with torch.no_grad():
        broken.bridge.llm_proj.bias.add_(0.05)
    with pytest.raises(QformerError, match=r"vision_qformer\.onnx:soft_prompt"):
        check_parity(broken, out)


def test_encoder_decoder_llms_are_refused(pipeline, tmp_path: Path) -> None:
    other = copy.copy(pipeline)
    other.llm = copy.copy(pipeline.llm)
    other.llm.family = "encoder-decoder"
    with pytest.raises(UsageError, match="encoder-decoder"):
        export_onnx(other, tmp_path)


def test_fp16_export_passes_parity_and_generates(pipeline, tmp_path: Path) -> None:
    manifest = export_onnx(pipeline, tmp_path, precision="fp16")
    assert manifest["precision"] == "fp16" and manifest["parity"]["tolerance"] == 1e-2
    vision = manifest["graphs"]["vision_qformer"]
    assert vision["inputs"][0]["dtype"] == "float16"
    assert manifest["graphs"]["llm_decode"]["inputs"][1]["dtype"] == "int64"
    for per_batch in manifest["parity"]["max_abs_diff"].values():
        assert all(0 <= d <= 1e-2 for diffs in per_batch.values() for d in diffs.values())
    runtime = OnnxPipeline.load(tmp_path)
    assert runtime.embed_tokens.dtype == np.float16
    settings = GenerationSettings(num_beams=1, max_new_tokens=4, min_new_tokens=0)
    texts = generate_text_onnx(runtime, np.zeros((2, 3, 64, 64), np.float32), ["", "a"], settings)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)


def test_bad_options_are_usage_errors(pipeline, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="precision"):
        export_onnx(pipeline, tmp_path, precision="int8")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="opset"):
        export_onnx(pipeline, tmp_path, opset=13)


def test_sample_generation_matches_the_torch_backend(exported, pipeline) -> None:
    out, _ = exported
    files = sample_split_files("val")
    samples = read_coco_captions(files.coco_captions, files.image_dir)[:5]
    settings = GenerationSettings(num_beams=1, max_new_tokens=8, min_new_tokens=0)
    expected, _ = generate_for_samples(
        pipeline, samples, settings, lambda _: pipeline.prompt, batch_size=2, device=CPU
    )
    runtime = OnnxPipeline.load(out)
    assert runtime.prompt == pipeline.prompt
    got, _ = generate_for_samples_onnx(
        runtime, samples, settings, lambda _: runtime.prompt, batch_size=2
    )
    assert [text for _, text in got] == [text for _, text in expected]
    assert [s.image_id for s, _ in got] == [s.image_id for s in samples]
