"""`qformer finetune --task caption|vqa|retrieval|instruct --init RUN`, through the command.

Each task starts from the shared trained runs (conftest), trains a few steps and is read back
the way the inference commands read it; the vision encoder, when it trains, must reach every
reader (its weights live in the checkpoint's vision.safetensors, apart from the Q-Former's).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from qformer_cli import checkpoint, faults
from qformer_cli.cli import app
from qformer_cli.config import RunConfig, TrainConfig, from_dict
from qformer_cli.data import BadSampleLog, Sample
from qformer_cli.data.instructions import CAPTION_INSTRUCTIONS
from qformer_cli.models.backbones import build_vision_encoder
from qformer_cli.models.config import BackboneConfig
from qformer_cli.pretrained import load_stage1_pipeline, load_stage2
from qformer_cli.train.stage2 import prompt_and_target, read_stage2_samples
from qformer_cli.train.vision import load_vision, vision_param_groups
from tests.tiny_runs import ROOT, assert_same_weights, metrics_rows, runner

FINETUNE = [
    "--batch-size", "8",
    "--max-steps", "4",
    "--set", "train.warmup_steps=1",
    "--set", "train.log_every=1",
    "--set", "train.deterministic=true",
]  # fmt: skip
SAMPLE_VISION = BackboneConfig(model="sample_data/backbones/vision")


def invoke(*args: str | Path, env: dict | None = None):
    return runner.invoke(app, [str(arg) for arg in args], env=env)


def finetune(task: str, init: Path, out: Path, *extra: str, env: dict | None = None):
    args = ("--task", task, "--init", init, "--out", out, "--json", *FINETUNE, *extra)
    return invoke("finetune", *args, env=env)


def run_config(run: Path) -> dict:
    return checkpoint.load_meta(checkpoint.resolve_checkpoint(run)).run


def final(run: Path) -> Path:
    return checkpoint.resolve_checkpoint(run)


def base_tower() -> dict[str, torch.Tensor]:
    return build_vision_encoder(SAMPLE_VISION).model.state_dict()


def finetuned(task: str, init: Path, factory: pytest.TempPathFactory) -> Path:
    """A 4-step ``task`` run from ``init``, shared by a module's tests."""
    out = factory.mktemp("ft") / task
    result = finetune(task, init, out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def caption_run(trained_stage2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetuned("caption", trained_stage2, tmp_path_factory)


def test_caption_finetuning_trains_the_vision_encoder_and_every_reader_uses_it(
    caption_run: Path, trained_stage2: Path
) -> None:
    saved = load_file(str(final(caption_run) / checkpoint.VISION_WEIGHTS))
    base = base_tower()
    assert saved.keys() == base.keys()
    changed = [key for key in saved if not torch.equal(saved[key], base[key])]
    assert len(changed) > len(saved) // 2, "most of the tower's tensors should have moved"
    # the Q-Former moved too, from the stage-2 run it started at
    before = load_file(str(final(trained_stage2) / checkpoint.WEIGHTS))
    after = load_file(str(final(caption_run) / checkpoint.WEIGHTS))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # caption / eval-vqa / export-onnx / convert all load through load_stage2
    loaded = load_stage2(caption_run, torch.device("cpu")).vision.model.state_dict()
    for key in saved:
        assert torch.equal(loaded[key], saved[key]), key
    recorded = run_config(caption_run)
    assert recorded["train"]["vision_lr"] == recorded["train"]["lr"]  # LAVIS: one lr for all
    assert recorded["data"]["vqa_questions"] == ""  # captions only


def test_the_finetuned_run_converts_to_transformers_with_its_tower_and_not_to_lavis(
    caption_run: Path, tmp_path: Path
) -> None:
    """convert --to transformers writes the fine-tuned tower as vision_model (transformers reads
    it back), and the converted directory captions as the run does; --to lavis is refused."""
    folder = tmp_path / "images"
    folder.mkdir()
    for image in sorted((ROOT / "sample_data" / "images" / "val").iterdir())[:6]:
        (folder / image.name).symlink_to(image)

    def captions(model: Path, out: str) -> list[str]:
        result = invoke(
            "caption", "--model", model, "--images", folder, "--num-beams", "1",
            "--max-new-tokens", "6", "--min-new-tokens", "1", "--out", tmp_path / out, "--json",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        return [
            row["caption"] for row in json.loads((tmp_path / out / "captions.json").read_text())
        ]

    converted = tmp_path / "hf"
    result = invoke("convert", converted, "--model", caption_run)
    assert result.exit_code == 0, result.output
    tower = transformers.Blip2ForConditionalGeneration.from_pretrained(converted).vision_model
    saved = load_file(str(final(caption_run) / checkpoint.VISION_WEIGHTS))
    written = tower.state_dict()
    for key, value in saved.items():
        assert torch.equal(written[key], value), key
    assert captions(converted, "hf-captions") == captions(caption_run, "run-captions")
    refused = invoke("convert", tmp_path / "x.pth", "--model", caption_run, "--to", "lavis")
    assert refused.exit_code == 2
    assert "fine-tuned" in refused.output and not (tmp_path / "x.pth").exists()


@pytest.fixture(scope="module")
def retrieval_run(trained_stage1: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetuned("retrieval", trained_stage1, tmp_path_factory)


@pytest.fixture(scope="module")
def vqa_run(trained_stage2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetuned("vqa", trained_stage2, tmp_path_factory)


@pytest.fixture(scope="module")
def instruct_run(trained_stage2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetuned("instruct", trained_stage2, tmp_path_factory)


@pytest.mark.parametrize("task", ["caption", "vqa", "retrieval", "instruct"])
def test_a_stopped_finetuning_run_resumes_to_the_uninterrupted_weights(
    task: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    init = request.getfixturevalue("trained_stage1" if task == "retrieval" else "trained_stage2")
    uninterrupted = request.getfixturevalue(f"{task}_run")
    run = tmp_path / "run"
    stopped = finetune(task, init, run, env={faults.STOP_AFTER_STEP_ENV: "2"})
    assert stopped.exit_code == 128 + 15, stopped.output
    resumed = finetune(task, init, run, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    names = [checkpoint.WEIGHTS]
    if task != "instruct":  # its tower stays frozen: the checkpoint carries none
        names.append(checkpoint.VISION_WEIGHTS)
    for name in names:
        assert_same_weights(
            load_file(str(final(run) / name)), load_file(str(final(uninterrupted) / name))
        )
    losses = [[row["loss"] for row in metrics_rows(r)] for r in (run, uninterrupted)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-6)
    if task == "instruct":
        return
    # a resume must keep the vision encoder's training as it was
    frozen = finetune(
        task, init, run, "--resume", "auto", "--vision-lr", "0", "--max-steps", "6"
    )  # fmt: skip
    assert frozen.exit_code == 2 and "holds its own vision-encoder weights" in frozen.output


def test_a_run_from_a_finetuned_tower_keeps_it_frozen_in_its_checkpoints(
    caption_run: Path, retrieval_run: Path, tmp_path: Path
) -> None:
    """instruct keeps the tower frozen, and stage 2 never trains it; started from a run that
    fine-tuned it, they must carry that tower on, or inference would read the shipped one."""
    runs = {
        "instruct": (["finetune", "--task", "instruct", "--init", caption_run], caption_run),
        "stage2": (["pretrain-stage2", "--init", retrieval_run], retrieval_run),
    }
    for name, (command, start) in runs.items():
        out = tmp_path / name
        result = invoke(*command, "--out", out, "--max-steps", "2", "--batch-size", "8")
        assert result.exit_code == 0, result.output
        assert run_config(out)["train"]["vision_lr"] in (0, None)
        carried = load_file(str(final(out) / checkpoint.VISION_WEIGHTS))
        assert_same_weights(carried, load_file(str(final(start) / checkpoint.VISION_WEIGHTS)))
        loaded = load_stage2(out, torch.device("cpu")).vision.model.state_dict()
        assert all(torch.equal(loaded[key], value) for key, value in carried.items())


def test_a_config_files_vision_lr_is_kept(trained_stage2: Path, tmp_path: Path) -> None:
    config = tmp_path / "ft.yaml"
    config.write_text("train:\n  vision_lr: 2.0e-4\n")
    out = tmp_path / "run"
    result = finetune("caption", trained_stage2, out, "--config", str(config), "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert run_config(out)["train"]["vision_lr"] == 2e-4


def test_recomputing_the_encoders_activations_trains_the_same_weights(
    trained_stage2: Path, caption_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "recomputed"
    result = finetune("caption", trained_stage2, out, "--set", "train.vision_checkpointing=true")
    assert result.exit_code == 0, result.output
    config = from_dict(RunConfig, run_config(out))
    vision = load_vision(config, torch.device("cpu"))
    wrapped = [m for m in vision.modules() if isinstance(m, CheckpointWrapper)]
    assert len(wrapped) == vision.model.config.num_hidden_layers
    for name in (checkpoint.WEIGHTS, checkpoint.VISION_WEIGHTS):
        ours, plain = (load_file(str(final(run) / name)) for run in (out, caption_run))
        for key, value in plain.items():
            assert torch.allclose(ours[key], value, atol=1e-6), key


def test_vqa_finetuning_feeds_the_question_to_the_qformer_and_learns_answers_only(
    vqa_run: Path, tmp_path: Path
) -> None:
    out = vqa_run
    recorded = run_config(out)
    assert recorded["model"]["instruction_aware"] is True
    assert recorded["data"]["captions"] is False
    samples = read_stage2_samples(from_dict(RunConfig, recorded), BadSampleLog())
    answers = json.loads((ROOT / "sample_data" / "vqa_train_annotations.json").read_text())
    assert len(samples) == len(answers["annotations"])
    assert all(sample.question and sample.answer for sample in samples)
    answered = invoke(
        "eval-vqa", "--model", out, "--num-beams", "1", "--out", tmp_path / "e", "--json"
    )
    assert answered.exit_code == 0, answered.output
    assert 0 <= json.loads(answered.stdout)["overall"] <= 100


def test_retrieval_finetuning_starts_from_every_stage1_weight(
    trained_stage1: Path, tmp_path: Path
) -> None:
    out = tmp_path / "retrieval"
    first = finetune("retrieval", trained_stage1, out, "--max-steps", "1", "--vision-lr", "0")
    assert first.exit_code == 0, first.output
    # one step at the warmup's first lr (1e-6, Adam: a step of about that size per weight)
    before = load_file(str(final(trained_stage1) / checkpoint.WEIGHTS))
    after = load_file(str(final(out) / checkpoint.WEIGHTS))
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.allclose(after[key], value, atol=1e-5), key


def test_retrieval_finetuning_trains_the_encoder_that_eval_retrieval_reads(
    retrieval_run: Path,
) -> None:
    saved = load_file(str(final(retrieval_run) / checkpoint.VISION_WEIGHTS))
    loaded = load_stage1_pipeline(retrieval_run, torch.device("cpu")).vision
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in saved.items())
    assert any(not torch.equal(saved[k], v) for k, v in base_tower().items())


def test_instruct_finetuning_learns_instruction_tables_and_answers_an_instruction(
    trained_stage2: Path, tmp_path: Path
) -> None:
    images = ROOT / "sample_data" / "images" / "train"
    names = sorted(path.name for path in images.iterdir())[:6]
    table = tmp_path / "instructions.jsonl"
    rows = [
        {"image": f"images/{name}", "instruction": "Name one colour you see.", "response": "red"}
        for name in names
    ]
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "images").symlink_to(images)
    out = tmp_path / "instruct"
    result = finetune("instruct", trained_stage2, out, "--instructions", str(table))
    assert result.exit_code == 0, result.output
    recorded = run_config(out)
    assert recorded["model"]["instruction_aware"] is True
    # the embedded default's tiny LM reads only its own prompts (configs/tiny.yaml)
    assert recorded["data"]["instruction_templates"] is False
    samples = read_stage2_samples(from_dict(RunConfig, recorded), BadSampleLog())
    assert sum(sample.instruction == "Name one colour you see." for sample in samples) == len(rows)
    assert recorded["train"]["vision_lr"] == 0  # InstructBLIP keeps the encoder frozen
    assert not (final(out) / checkpoint.VISION_WEIGHTS).exists()
    asked = invoke(
        "ask", "--model", out, "--image", images / names[0], "--json", "--num-beams", "1",
        "--max-new-tokens", "3", "Describe the image briefly.",
    )  # fmt: skip
    assert asked.exit_code == 0, asked.output


def test_instruction_templates_are_fixed_per_sample_and_keep_the_question() -> None:
    caption = Sample(image=Path("a.png"), image_id=7, captions=("a red circle",))
    question = Sample(image=Path("a.png"), image_id=7, question="is there a circle?", answer="yes")
    given = Sample(image=Path("a.png"), image_id=7, instruction="List the shapes.", answer="a")
    prompts = {
        name: prompt_and_target(sample, "a photo of", "Question: {} Answer:", templates=True)
        for name, sample in {"caption": caption, "question": question, "given": given}.items()
    }
    assert prompts["caption"][0] in CAPTION_INSTRUCTIONS
    assert prompts["caption"][1] == "a red circle"
    assert "is there a circle?" in prompts["question"][0] and prompts["question"][1] == "yes"
    assert prompts["given"] == ("List the shapes.", "a")
    again = prompt_and_target(caption, "a photo of", "Question: {} Answer:", templates=True)
    assert again == prompts["caption"]  # the same instruction in every run
    plain = prompt_and_target(question, "a photo of", "Question: {} Answer:", templates=False)
    assert plain == ("Question: is there a circle? Answer:", "yes")
    picked = {
        prompt_and_target(
            Sample(image=Path("a.png"), image_id=i, captions=("x",)), "", "", templates=True
        )[0]
        for i in range(200)
    }
    assert picked == set(CAPTION_INSTRUCTIONS)  # every template is used


def test_a_missing_instruction_image_names_the_row(trained_stage2: Path, tmp_path: Path) -> None:
    table = tmp_path / "bad.jsonl"
    table.write_text(json.dumps({"image": "nope.png", "instruction": "a", "response": "b"}) + "\n")
    result = finetune("instruct", trained_stage2, tmp_path / "out", "--instructions", str(table))
    assert result.exit_code == 1
    assert "bad.jsonl: line 1" in result.output and "nope.png" in result.output


@pytest.mark.parametrize(
    ("task", "run", "extra", "says"),
    [
        ("retrieval", "stage2", [], "starts from a stage-1 run"),
        ("caption", "stage1", [], "starts from a stage-2 run"),
        ("caption", "stage2", ["--set", "model.preset=blip2"], "keeps the model of --init"),
        ("describe", "stage2", [], "one of caption, vqa, retrieval, instruct"),
        ("retrieval", "stage1", ["--set", "train.grad_accum=2"], "grad_accum"),
        ("caption", "transformers", [], "starts from a run of this toolkit"),
    ],
)
def test_finetune_refuses_in_one_line(
    task: str,
    run: str,
    extra: list[str],
    says: str,
    trained_stage1: Path,
    trained_stage2: Path,
    tmp_path: Path,
) -> None:
    init = trained_stage1 if run == "stage1" else trained_stage2
    if run == "transformers":  # a directory of transformers weights, not a run
        init = tmp_path / "hf"
        init.mkdir()
        (init / "config.json").write_text('{"model_type": "blip-2"}')
    result = finetune(task, init, tmp_path / "out", *extra)
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_layer_decay_scales_each_block_by_its_depth() -> None:
    import transformers

    from qformer_cli.models.backbones import VisionEncoder
    from tests.conftest import TINY_VISION

    tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION))
    vision = VisionEncoder(tower, layer=-2).unfreeze()
    config = TrainConfig(lr=1e-3, vision_lr=1e-4, vision_layer_decay=0.5)
    groups = vision_param_groups(vision, config)
    scale_of = {id(p): group["lr_scale"] for group in groups for p in group["params"]}
    named = dict(tower.named_parameters())
    layers = tower.config.num_hidden_layers
    assert len(scale_of) == len(named)  # every trained tensor in exactly one group
    expected = {
        "embeddings.patch_embedding.weight": 0.5 ** (layers + 1),
        "pre_layrnorm.weight": 0.5 ** (layers + 1),  # before the blocks
        "encoder.layers.0.mlp.fc1.weight": 0.5**layers,
        f"encoder.layers.{layers - 1}.mlp.fc1.weight": 0.5,
        "post_layernorm.weight": 1.0,  # after them
    }
    for name, decay in expected.items():
        assert scale_of[id(named[name])] == pytest.approx(0.1 * decay), name
    no_decay = {id(p) for group in groups if group["weight_decay"] == 0 for p in group["params"]}
    assert id(named["post_layernorm.weight"]) in no_decay
    assert id(named["encoder.layers.0.mlp.fc1.weight"]) not in no_decay


def without_key_bias(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Attention key biases get an exactly-zero gradient (softmax ignores a shift shared by all
    keys); AdamW turns its rounding residue into lr-sized steps that differ between summation
    orders (tests/train/test_distributed.py). Left out: the Q-Former's, and the middle third
    of the tower's fused qkv bias."""
    if name.endswith("attention.key.bias"):
        return tensor[:0]
    if name.endswith("qkv.bias"):
        third = tensor.shape[0] // 3
        return torch.cat([tensor[:third], tensor[2 * third :]])
    return tensor


@pytest.mark.slow
def test_torchrun_finetuning_of_the_vision_encoder_matches_one_process(
    trained_stage1: Path, tmp_path: Path
) -> None:
    """Retrieval fine-tuning on 2 processes x 4 vs 1 process x 8, the vision tower trained in
    DDP (parts after the layer read unused: find_unused_parameters), ITM negatives from the
    other rank gathered with their gradient: the same losses, Q-Former and tower weights.
    Dropout off, as no world size reproduces another's dropout masks. (Stage 2's LM loss is a
    per-process token mean, as in LAVIS, so stage 2 matches one process only on equal token
    counts.)"""
    from tests.train.test_distributed import torchrun

    no_dropout = [
        "--set", "model.qformer.hidden_dropout=0.0",
        "--set", "model.qformer.attention_dropout=0.0",
        "--max-steps", "3",
    ]  # fmt: skip
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    result = finetune("retrieval", trained_stage1, single, *no_dropout)
    assert result.exit_code == 0, result.output
    args = ["--task", "retrieval", "--init", str(trained_stage1), "--out", str(ddp)]
    torchrun("-m", "qformer_cli", "finetune", *args, *FINETUNE, *no_dropout)
    single_rows, ddp_rows = metrics_rows(single), metrics_rows(ddp)
    assert [row["step"] for row in ddp_rows] == [1, 2, 3]
    for one, two in zip(single_rows, ddp_rows, strict=True):
        for key in ("itc", "itm", "itg"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), (one["step"], key)
    for name in (checkpoint.WEIGHTS, checkpoint.VISION_WEIGHTS):
        ours, theirs = (load_file(str(final(run) / name)) for run in (single, ddp))
        for key in ours:
            assert torch.allclose(
                without_key_bias(key, theirs[key]), without_key_bias(key, ours[key]), atol=1e-5
            ), (name, key)
    assert run_config(ddp)["model"]["qformer"]["hidden_dropout"] == 0.0
