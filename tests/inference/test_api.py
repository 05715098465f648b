"""The Python API (``qformer_cli.load_model / caption / answer / retrieve``): the README's example
runs as written, and each function gives what the matching command gives."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qformer_cli as qf
from qformer_cli import checkpoint
from qformer_cli.data import read_vqa
from qformer_cli.errors import UsageError
from tests.tiny_runs import ROOT, invoke_json

pytestmark = pytest.mark.slow  # uses the shared trained runs
SAMPLE = ROOT / "sample_data"
VAL_IMAGES = SAMPLE / "images" / "val"


def readme_example() -> str:
    """The Python block of the README's "Python API" section."""
    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_public_api_is_what_dir_shows() -> None:
    assert {"load_model", "caption", "answer", "retrieve"} <= set(dir(qf))
    assert callable(qf.load_model)
    with pytest.raises(AttributeError):
        _ = qf.no_such_function


def test_the_readme_example_runs_as_written(
    trained_stage1: Path, trained_stage2: Path, tmp_path: Path
) -> None:
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "stage1").symlink_to(trained_stage1)
    (tmp_path / "runs" / "demo" / "stage2").symlink_to(trained_stage2)
    (tmp_path / "sample_data").symlink_to(SAMPLE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ran = subprocess.run(
        [sys.executable, "-c", readme_example()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert len(lines) == 5, ran.stdout
    assert all(" -> " in line and line.startswith("sample_data/images/val") for line in lines[:3])
    answers = eval(lines[3])  # a printed list of two strings
    assert isinstance(answers, list) and len(answers) == 2
    assert lines[4] in ("a red circle", "two green triangles", "a blue square")


@pytest.fixture(scope="module")
def few_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("few")
    for path in sorted(VAL_IMAGES.iterdir())[:6]:
        shutil.copy(path, folder / path.name)
    return folder


def test_caption_equals_the_caption_command(
    trained_stage2: Path, few_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "caption"
    args = ["--model", str(trained_stage2), "--images", str(few_images), "--num-beams", "3"]
    invoke_json("caption", *args, "--out", str(out))
    expected = json.loads((out / "captions.json").read_text())
    got = qf.caption(qf.load_model(trained_stage2, device="cpu"), few_images, num_beams=3)
    assert [row["caption"] for row in got] == [row["caption"] for row in expected]
    assert [Path(row["image"].split(": ")[-1]).name for row in got] == [
        path.name for path in sorted(few_images.iterdir())
    ]


@pytest.fixture(scope="module")
def onnx_dir(trained_stage2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "export"
    invoke_json("export-onnx", "--model", str(trained_stage2), "--out", str(out))
    return out


def test_every_kind_of_model_directory_captions_alike(
    trained_stage2: Path, onnx_dir: Path, few_images: Path, tmp_path: Path
) -> None:
    """A run, one of its checkpoints, its transformers BLIP-2 conversion and its ONNX export
    give the same captions at the config's decoding settings (beam search, 5 beams)."""
    transformers_dir = tmp_path / "hf"
    invoke_json("convert", "--model", str(trained_stage2), str(transformers_dir))
    sources = {
        "run": trained_stage2,
        "checkpoint": checkpoint.resolve_checkpoint(trained_stage2),
        "transformers": transformers_dir,
        "onnx": onnx_dir,
    }
    captions = {}
    for kind, source in sources.items():
        model = qf.load_model(source, device="cpu")
        assert model.backend == ("onnx" if kind == "onnx" else "torch")
        rows = qf.caption(model, few_images, prompt="a photo of")
        captions[kind] = [row["caption"] for row in rows]
    assert any(captions["run"])
    assert all(texts == captions["run"] for texts in captions.values()), captions


def vqa_subset(directory: Path, count: int, asking: str | None = None) -> tuple[Path, Path]:
    """The first ``count`` val questions (those ``asking`` it, if given) and their
    annotations, as VQAv2 files."""
    questions = json.loads((SAMPLE / "vqa_val_questions.json").read_text())
    annotations = json.loads((SAMPLE / "vqa_val_annotations.json").read_text())
    kept = [q for q in questions["questions"] if asking in (None, q["question"])][:count]
    ids = {q["question_id"] for q in kept}
    questions_path, annotations_path = directory / "questions.json", directory / "annotations.json"
    questions_path.write_text(json.dumps(dict(questions, questions=kept)))
    kept_annotations = [a for a in annotations["annotations"] if a["question_id"] in ids]
    annotations_path.write_text(json.dumps(dict(annotations, annotations=kept_annotations)))
    return questions_path, annotations_path


def test_answer_equals_eval_vqa(trained_stage2: Path, tmp_path: Path) -> None:
    questions_path, annotations_path = vqa_subset(tmp_path, 6)
    files = ["--questions", str(questions_path), "--annotations", str(annotations_path)]
    out = tmp_path / "vqa"
    args = ["--model", str(trained_stage2), *files, "--images", str(VAL_IMAGES)]
    invoke_json("eval-vqa", *args, "--out", str(out))
    expected = json.loads((out / "vqa_results.json").read_text())

    samples = read_vqa(questions_path, None, VAL_IMAGES)
    model = qf.load_model(trained_stage2, device="cpu")
    got = qf.answer(model, [s.image for s in samples], [s.question for s in samples])
    assert got == [row["answer"] for row in expected]
    # one image for several questions
    one = qf.answer(model, samples[0].image, [samples[0].question] * 2)
    assert one == [expected[0]["answer"]] * 2


def test_retrieve_ranks_as_eval_retrieval(trained_stage1: Path, tmp_path: Path) -> None:
    """Recall@1 image -> text from retrieve()'s scores, ITC alone and re-ranked by ITM, equals
    the command's on the same images and captions."""
    entries = json.loads((SAMPLE / "karpathy_val.json").read_text())[:30]
    subset = tmp_path / "karpathy.json"
    subset.write_text(json.dumps(entries))
    out = tmp_path / "retrieval"
    args = ["--model", str(trained_stage1), "--annotations", str(subset), "--images", str(SAMPLE)]
    metrics = invoke_json("eval-retrieval", *args, "--k", "8", "--out", str(out))

    images = [SAMPLE / entry["image"] for entry in entries]
    texts = [caption for entry in entries for caption in entry["caption"]]
    owners = torch.tensor([i for i, entry in enumerate(entries) for _ in entry["caption"]])
    model = qf.load_model(trained_stage1, device="cpu")
    for k, key in ((0, "image_to_text_itc_only"), (8, "image_to_text")):
        scores = qf.retrieve(model, images, texts, k=k)
        assert scores.shape == (len(images), len(texts))
        hits = owners[scores.argmax(dim=1)] == torch.arange(len(images))
        assert round(100.0 * hits.float().mean().item(), 2) == metrics[key]["R@1"], key


def test_wrong_stage_and_unknown_settings_are_refused(
    trained_stage1: Path, trained_stage2: Path
) -> None:
    stage1 = qf.load_model(trained_stage1, device="cpu")
    stage2 = qf.load_model(trained_stage2, device="cpu")
    image = sorted(VAL_IMAGES.iterdir())[0]
    with pytest.raises(UsageError, match="captions and answers need stage 2"):
        qf.caption(stage1, image)
    with pytest.raises(UsageError, match="retrieval needs stage 1"):
        qf.retrieve(stage2, image, ["a red circle"])
    with pytest.raises(UsageError, match="unknown generation settings"):
        qf.caption(stage2, image, beams=3)
    with pytest.raises(UsageError, match="2 images for 3 questions"):
        qf.answer(stage2, [image, image], ["a?", "b?", "c?"])


def test_blind_vqa_runs_on_onnx_as_on_torch(
    trained_stage2: Path, onnx_dir: Path, tmp_path: Path
) -> None:
    """--blind through the command on the onnxruntime backend (refused before the one loop):
    the same answers as torch's --blind, both at the config's 5 beams. (That the two backends
    shuffle alike is checked exactly in test_generators.py; this tiny model's answers barely
    depend on it.)"""
    questions, annotations = vqa_subset(tmp_path, 12)
    files = ["--questions", str(questions), "--annotations", str(annotations)]
    files += ["--images", str(VAL_IMAGES)]

    def answers(model: Path, name: str, *extra: str) -> list[dict]:
        out = ("--out", str(tmp_path / name))
        printed = invoke_json("eval-vqa", "--model", str(model), *files, *out, *extra)
        assert printed["blind"]
        return json.loads((tmp_path / name / "vqa_results.json").read_text())

    onnx_blind = answers(onnx_dir, "onnx", "--backend", "onnx", "--blind")
    assert onnx_blind == answers(trained_stage2, "torch", "--blind")


def test_eval_vqa_reads_its_settings_from_the_config(trained_stage2: Path, tmp_path: Path) -> None:
    """The vqa section: from --config, then --set, then the dedicated flags."""
    questions, annotations = vqa_subset(tmp_path, 4)
    files = ["--questions", str(questions), "--annotations", str(annotations)]
    files += ["--images", str(VAL_IMAGES), "--model", str(trained_stage2)]
    config = tmp_path / "vqa.yaml"
    config.write_text('vqa:\n  prompt: "Q: {} A:"\n  num_beams: 1\n')

    def prompt_used(name: str, *extra: str) -> str:
        return invoke_json("eval-vqa", *files, "--out", str(tmp_path / name), *extra)["prompt"]

    assert prompt_used("default") == "Question: {} Answer:"
    assert prompt_used("file", "--config", str(config)) == "Q: {} A:"
    assert prompt_used("set", "--set", "vqa.prompt=short-answer") == "Question: {} Short answer:"
    flag = ("--config", str(config), "--prompt", "answer")
    assert prompt_used("flag", *flag) == "Question: {} Answer:"
