"""ONNX export of tiny trained models: stage 2 with a decoder-only (OPT) or encoder-decoder (T5)
LLM (graphs, manifest, parity, onnxruntime generation vs torch) and stage 1 (ITC embeddings)."""

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
from qformer_cli.config import GenerationConfig
from qformer_cli.data import (
    build_transform,
    load_transform_config,
    read_coco_captions,
    read_karpathy,
)
from qformer_cli.data.sample import load_image
from qformer_cli.data.sample_data import sample_split_files
from qformer_cli.errors import QformerError, UsageError
from qformer_cli.eval.retrieval import itc_similarity, load_retrieval_set, read_retrieval_samples
from qformer_cli.export.onnx_export import check_parity, export_onnx
from qformer_cli.export.onnx_runtime import OnnxPipeline, generate_text_onnx
from qformer_cli.inference.generate import generate_text, stop_token_ids
from qformer_cli.inference.generators import OnnxGenerator, TorchGenerator, generate_for_samples
from qformer_cli.models.blip2 import Stage1Model
from qformer_cli.pretrained import Stage1Pipeline, Stage2Pipeline, load_stage1_pipeline, load_stage2

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage-2 run directory: the shipped tiny vision encoder + OPT, a few training steps."""
    out = tmp_path_factory.mktemp("stage2")
    args = ["pretrain-stage2", "--max-steps", "3", "--batch-size", "8", "--out", str(out)]
    result = runner.invoke(app, args)
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
    assert manifest["generation"]["max_new_tokens"] == GenerationConfig().max_new_tokens
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


SEARCHES = [
    GenerationConfig(num_beams=1, max_new_tokens=8, min_new_tokens=0),
    GenerationConfig(num_beams=1, max_new_tokens=6, min_new_tokens=4),
    GenerationConfig(num_beams=5, max_new_tokens=8, min_new_tokens=0),  # caption's default beams
    GenerationConfig(num_beams=3, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0),  # VQA
    GenerationConfig(num_beams=4, max_new_tokens=6, min_new_tokens=5, length_penalty=2.0),
]


def test_onnx_generation_matches_torch(exported, pipeline) -> None:
    """Greedy and beam search (transformers' generate on the torch side) give the same texts."""
    out, _ = exported
    runtime = OnnxPipeline.load(out)
    assert runtime.provider == "CPUExecutionProvider" or torch.cuda.is_available()
    files = sample_split_files("val")
    samples = read_coco_captions(files.coco_captions, files.image_dir)[:3]
    # Read the transform from the export directory: it must match the torch side's.
    transform = build_transform(runtime.image_transform, train=False)
    torch_transform = build_transform(pipeline.image_transform, train=False)
    pixels = torch.stack([transform(load_image(s)) for s in samples])
    assert torch.equal(pixels, torch.stack([torch_transform(load_image(s)) for s in samples]))
    # Prompts of different lengths exercise the left padding.
    prompts = ["a photo of", "", "Question: what is on the left? Answer:"]
    for settings in SEARCHES:
        with torch.no_grad():
            features = pipeline.vision(pixels)
        expected = generate_text(
            pipeline.bridge, pipeline.llm, pipeline.tokenizer, features, prompts, settings
        )
        got = generate_text_onnx(runtime, runtime.soft_prompt(pixels.numpy()), prompts, settings)
        assert got == expected, settings


def test_sampling_and_repetition_penalty_are_refused(exported) -> None:
    out, _ = exported
    runtime = OnnxPipeline.load(out)
    soft_prompt = runtime.soft_prompt(np.zeros((1, 3, 64, 64), np.float32))
    for settings in (GenerationConfig(do_sample=True), GenerationConfig(repetition_penalty=1.2)):
        with pytest.raises(UsageError):
            generate_text_onnx(runtime, soft_prompt, [""], settings)


def test_parity_check_catches_a_changed_weight(exported, pipeline) -> None:
    out, _ = exported
    broken = copy.copy(pipeline)
    broken.bridge = copy.deepcopy(pipeline.bridge)
    with torch.no_grad():
        broken.bridge.llm_proj.bias.add_(0.05)
    with pytest.raises(QformerError, match=r"vision_qformer\.onnx:soft_prompt"):
        check_parity(broken, out)


def assert_export_generates(out: Path, embeddings_dtype: type) -> None:
    """The export at ``out`` loads with its embedding table in ``embeddings_dtype`` and
    generates a text for each of two prompts."""
    runtime = OnnxPipeline.load(out)
    assert runtime.embed_tokens.dtype == embeddings_dtype
    settings = GenerationConfig(num_beams=1, max_new_tokens=4, min_new_tokens=0)
    soft_prompt = runtime.soft_prompt(np.zeros((2, 3, 64, 64), np.float32))
    texts = generate_text_onnx(runtime, soft_prompt, ["", "a"], settings)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)


def test_fp16_export_passes_parity_and_generates(pipeline, tmp_path: Path) -> None:
    manifest = export_onnx(pipeline, tmp_path, precision="fp16")
    assert manifest["precision"] == "fp16" and manifest["parity"]["tolerance"] == 1e-2
    vision = manifest["graphs"]["vision_qformer"]
    assert vision["inputs"][0]["dtype"] == "float16"
    assert manifest["graphs"]["llm_decode"]["inputs"][1]["dtype"] == "int64"
    parity = manifest["parity"]
    for graph, per_batch in parity["max_abs_diff"].items():
        for batch, diffs in per_batch.items():
            scales = parity["scale"][graph][batch]
            # each output within 1% of its scale, max(1, max |value|): fp16's own precision
            assert all(0 <= d <= 1e-2 * scales[name] for name, d in diffs.items())
    # logits are the outputs whose scale is above 1 (fp16 spaces values of 16-32 by 0.016); a
    # scale is the largest |value|, tens at most here, never a bound that lets anything pass
    assert parity["scale"]["llm_prefill"]["batch_1"]["logits"] > 1
    assert all(s < 100 for b in parity["scale"].values() for o in b.values() for s in o.values())
    assert_export_generates(tmp_path, np.float16)


def test_int8_export_quantizes_the_weights_and_passes_its_parity(pipeline, tmp_path: Path) -> None:
    """Dynamic quantization: the weight matmuls' weights are stored as int8 and their inputs
    quantized as they run (MatMulInteger; attention's activation products stay float), the
    graphs' inputs and outputs stay float32, and each output is within 1e-1 of its scale but,
    being quantized, not within fp32's 1e-4."""
    import onnx

    manifest = export_onnx(pipeline, tmp_path, precision="int8")
    assert manifest["precision"] == "int8" and manifest["parity"]["tolerance"] == 1e-1
    for name, graph in manifest["graphs"].items():
        model = onnx.load(str(tmp_path / graph["file"]))
        ops = {node.op_type for node in model.graph.node}
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops, name
        int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
        assert sum(len(i.raw_data) for i in int8) > 100_000, name
        assert graph["inputs"][0]["dtype"] == "float32"
    parity = manifest["parity"]
    diffs = [d for per_batch in parity["max_abs_diff"].values() for b in per_batch.values()
             for d in b.values()]  # fmt: skip
    assert max(diffs) > 1e-4  # quantized, not an fp32 graph under another name
    assert_export_generates(tmp_path, np.float32)


def test_bad_options_are_usage_errors(pipeline, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="precision"):
        export_onnx(pipeline, tmp_path, precision="int4")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="opset"):
        export_onnx(pipeline, tmp_path, opset=13)


def test_sample_generation_matches_the_torch_backend(exported, pipeline) -> None:
    out, _ = exported
    files = sample_split_files("val")
    samples = read_coco_captions(files.coco_captions, files.image_dir)[:5]
    settings = GenerationConfig(num_beams=1, max_new_tokens=8, min_new_tokens=0)
    expected = list(
        generate_for_samples(
            TorchGenerator(pipeline), samples, settings, lambda _: pipeline.prompt, batch_size=2
        )
    )
    runtime = OnnxPipeline.load(out)
    assert runtime.prompt == pipeline.prompt
    got = list(
        generate_for_samples(
            OnnxGenerator(runtime), samples, settings, lambda _: runtime.prompt, batch_size=2
        )
    )
    assert [text for _, text in got] == [text for _, text in expected]
    assert [s.image_id for s, _ in got] == [s.image_id for s in samples]


# ---------------------------------------------------------------------------------------------
# Encoder-decoder LLM: the shipped tiny T5


@pytest.fixture(scope="module")
def t5_trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage2_t5")
    config = str(REPO / "configs" / "tiny_t5.yaml")
    args = ["pretrain-stage2", "--config", config, "--max-steps", "3", "--batch-size", "8"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def t5_pipeline(t5_trained: Path) -> Stage2Pipeline:
    pipeline = load_stage2(t5_trained, CPU)
    assert pipeline.llm.family == "encoder-decoder"
    return pipeline


@pytest.fixture(scope="module")
def t5_exported(t5_trained: Path, tmp_path_factory: pytest.TempPathFactory):
    """Exported through the CLI (which loads the checkpoint itself)."""
    out = tmp_path_factory.mktemp("onnx_t5")
    result = runner.invoke(app, ["export-onnx", "--model", str(t5_trained), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "manifest.json").read_text())


def test_t5_export_writes_encoder_and_cached_decoder_graphs(t5_exported, t5_pipeline) -> None:
    out, manifest = t5_exported
    llm = t5_pipeline.llm.model
    assert manifest["llm_family"] == "encoder-decoder" and manifest["stage"] == 2
    assert manifest["decoder_start_token_id"] == llm.config.decoder_start_token_id
    assert manifest["stop_token_ids"] == [llm.config.eos_token_id]
    assert manifest["num_layers"] == llm.config.num_decoder_layers
    assert manifest["head_dim"] == llm.config.d_kv
    graphs = manifest["graphs"]
    assert set(graphs) == {"vision_qformer", "llm_encoder", "llm_prefill", "llm_decode"}
    for graph in graphs.values():
        onnx.checker.check_model(str(out / graph["file"]), full_check=True)
    layers = manifest["num_layers"]
    cross = [f"cross.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    prefill_outputs = [o["name"] for o in graphs["llm_prefill"]["outputs"]]
    assert prefill_outputs[-2 * layers :] == cross
    decode_inputs = [i["name"] for i in graphs["llm_decode"]["inputs"]]
    # Cross-attention K/V come in computed; the encoder states are not needed any more.
    assert decode_inputs[:2] == ["inputs_embeds", "encoder_attention_mask"]
    assert decode_inputs[-2 * layers :] == cross and "encoder_hidden_states" not in decode_inputs
    assert graphs["llm_decode"]["inputs"][2]["shape"] == ["batch", 4, "past_sequence", 32]

    parity = manifest["parity"]
    assert set(parity["max_abs_diff"]) == set(graphs)
    for per_batch in parity["max_abs_diff"].values():
        assert set(per_batch) == {"batch_1", "batch_3"}
        assert all(0 <= d <= 1e-4 for diffs in per_batch.values() for d in diffs.values())
    assert set(cross) <= set(parity["max_abs_diff"]["llm_prefill"]["batch_3"])


def test_t5_parity_check_covers_the_cross_attention(t5_exported, t5_pipeline) -> None:
    out, _ = t5_exported
    broken = copy.copy(t5_pipeline)
    broken.llm = copy.copy(t5_pipeline.llm)
    broken.llm.model = copy.deepcopy(t5_pipeline.llm.model)
    attention = broken.llm.model.decoder.block[1].layer[1].EncDecAttention
    with torch.no_grad():
        attention.k.weight.mul_(1.5)
    with pytest.raises(QformerError, match=r"llm_prefill\.onnx:cross\.1\.key"):
        check_parity(broken, out)


def test_t5_with_untied_decoder_embeddings_is_refused(t5_pipeline, tmp_path: Path) -> None:
    """The runtime embeds decoder tokens with the encoder's table: refuse LLMs where they differ."""
    other = copy.copy(t5_pipeline)
    other.llm = copy.copy(t5_pipeline.llm)
    other.llm.model = copy.deepcopy(t5_pipeline.llm.model)
    decoder_table = copy.deepcopy(other.llm.model.get_input_embeddings())
    with torch.no_grad():
        decoder_table.weight.add_(0.01)
    other.llm.model.decoder.embed_tokens = decoder_table
    with pytest.raises(UsageError, match="share the encoder's"):
        export_onnx(other, tmp_path)
    assert not list(tmp_path.glob("*.onnx"))


def test_t5_onnx_generation_matches_torch(t5_exported, t5_pipeline) -> None:
    out, _ = t5_exported
    runtime = OnnxPipeline.load(out)
    files = sample_split_files("val")
    samples = read_coco_captions(files.coco_captions, files.image_dir)[:3]
    transform = build_transform(runtime.image_transform, train=False)
    pixels = torch.stack([transform(load_image(s)) for s in samples])
    prompts = ["a photo of", "", "Question: what is on the left? Answer:"]
    with torch.no_grad():
        features = t5_pipeline.vision(pixels)
    for settings in (
        GenerationConfig(num_beams=1, max_new_tokens=12, min_new_tokens=0),
        GenerationConfig(num_beams=1, max_new_tokens=6, min_new_tokens=4),
        GenerationConfig(num_beams=5, max_new_tokens=12, min_new_tokens=0),
        GenerationConfig(num_beams=3, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0),
    ):
        expected = generate_text(
            t5_pipeline.bridge, t5_pipeline.llm, t5_pipeline.tokenizer, features, prompts, settings
        )
        assert any(expected)  # the comparison below is not between empty strings
        assert (
            generate_text_onnx(runtime, runtime.soft_prompt(pixels.numpy()), prompts, settings)
            == expected
        )


def _vqa_subset(tmp_path: Path, count: int) -> tuple[Path, Path]:
    """The first ``count`` sample val questions and their annotations, in VQAv2 files."""
    files = sample_split_files("val")
    questions = json.loads(files.vqa_questions.read_text())
    annotations = json.loads(files.vqa_annotations.read_text())
    questions["questions"] = questions["questions"][:count]
    kept = {q["question_id"] for q in questions["questions"]}
    annotations["annotations"] = [a for a in annotations["annotations"] if a["question_id"] in kept]
    paths = tmp_path / "questions.json", tmp_path / "annotations.json"
    for path, content in zip(paths, (questions, annotations), strict=True):
        path.write_text(json.dumps(content))
    return paths


def test_t5_vqa_answers_onnx_equal_torch(t5_exported, t5_trained, tmp_path: Path) -> None:
    out, _ = t5_exported
    questions, annotations = _vqa_subset(tmp_path, 12)
    files = sample_split_files("val")
    answers = {}
    for backend, model in (("torch", t5_trained), ("onnx", out)):
        result = runner.invoke(
            app,
            [
                "eval-vqa", "--model", str(model), "--backend", backend,  # default beams (5)
                "--questions", str(questions), "--annotations", str(annotations),
                "--images", str(files.image_dir), "--batch-size", "5",
                "--out", str(tmp_path / backend), "--json",
            ],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        answers[backend] = json.loads((tmp_path / backend / "vqa_results.json").read_text())
    assert len(answers["torch"]) == 12 and any(a["answer"] for a in answers["torch"])
    assert answers["onnx"] == answers["torch"]


# ---------------------------------------------------------------------------------------------
# Stage 1: ITC image and text embeddings


@pytest.fixture(scope="module")
def stage1_trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage1")
    args = ["pretrain-stage1", "--max-steps", "3", "--batch-size", "8", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def stage1_pipeline(stage1_trained: Path) -> Stage1Pipeline:
    return load_stage1_pipeline(stage1_trained, CPU)


@pytest.fixture(scope="module")
def stage1_exported(stage1_trained: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("onnx_stage1")
    args = ["export-onnx", "--model", str(stage1_trained), "--out", str(out), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["graphs"]) == {"text_itc", "vision_itc"}
    return out, json.loads((out / "manifest.json").read_text())


def test_stage1_export_manifest_and_parity(stage1_exported, stage1_pipeline) -> None:
    out, manifest = stage1_exported
    config = stage1_pipeline.model.config
    assert manifest["stage"] == 1 and manifest["precision"] == "fp32"
    vision = manifest["graphs"]["vision_itc"]
    assert vision["inputs"][0]["shape"] == ["batch", *manifest["image_size"]]
    assert vision["outputs"][0] == {
        "name": "image_embeds",
        "shape": ["batch", config.num_query_tokens, config.embed_dim],
        "dtype": "float32",
    }
    text = manifest["graphs"]["text_itc"]
    assert [i["name"] for i in text["inputs"]] == ["input_ids", "attention_mask"]
    assert text["outputs"][0]["shape"] == ["batch", config.embed_dim]
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()
    # The Q-Former's text mask once used torch.full(bool), which only the dynamo exporter took.
    assert text["exporter"] == vision["exporter"] == "torchscript"
    for per_batch in manifest["parity"]["max_abs_diff"].values():
        assert set(per_batch) == {"batch_1", "batch_3"}
        assert all(0 <= d <= 1e-4 for diffs in per_batch.values() for d in diffs.values())


def test_stage1_onnx_itc_similarity_matches_torch_retrieval(
    stage1_exported, stage1_pipeline
) -> None:
    """The graphs' embeddings give eval-retrieval's ITC similarity on the sample val set."""
    from transformers import AutoTokenizer

    from qformer_cli.export.onnx_runtime import create_session

    out, manifest = stage1_exported
    files = sample_split_files("val")
    data = load_retrieval_set(
        read_retrieval_samples(files.karpathy, None),
        stage1_pipeline.vision,
        stage1_pipeline.image_transform,
        stage1_pipeline.tokenizer,
        CPU,
        batch_size=16,
    )
    expected = itc_similarity(stage1_pipeline.model, data, batch_size=16)  # (N_img, N_txt)

    # The deployed path: images through the exported image settings, text through the exported
    # tokenizer, both embedded by onnxruntime.
    samples = [s for s in read_karpathy(files.karpathy, None) if s.captions]
    transform = build_transform(load_transform_config(str(out)), train=False)
    pixels = np.stack([transform(load_image(s)).numpy() for s in samples])
    tokenizer = AutoTokenizer.from_pretrained(out / manifest["tokenizer"])
    captions = [caption for s in samples for caption in s.captions]
    encoded = tokenizer(
        captions, padding="longest", truncation=True, max_length=manifest["max_text_len"],
        return_tensors="np",
    )  # fmt: skip
    vision = create_session(out / "vision_itc.onnx")
    text = create_session(out / "text_itc.onnx")
    image_embeds = vision.run(None, {"pixel_values": pixels})[0]
    feed = {name: encoded[name] for name in ("input_ids", "attention_mask")}
    text_embeds = text.run(None, feed)[0]
    got = Stage1Model.similarity(torch.from_numpy(image_embeds), torch.from_numpy(text_embeds))
    assert got.shape == expected.shape and expected.shape[0] >= 8
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1))
    assert np.allclose(np.linalg.norm(text_embeds, axis=-1), 1.0, atol=1e-5)


def test_stage1_export_is_refused_by_the_caption_backend(stage1_exported, tmp_path) -> None:
    out, _ = stage1_exported
    result = runner.invoke(
        app,
        ["caption", "--model", str(out), "--backend", "onnx", "--out", str(tmp_path / "captions")],
    )
    assert result.exit_code == 2
    assert "stage-1" in result.stderr and "Traceback" not in result.output
