"""`qformer ask` and `qformer match` on the embedded default's trained runs and on the
transformers directories `convert` writes from them; match against transformers' own
Blip2ForImageTextRetrieval forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

from qformer_cli.cli import app
from qformer_cli.data import Sample, build_transform, load_image, load_transform_config
from qformer_cli.eval.retrieval import tokenize_texts
from tests.tiny_runs import ROOT, invoke_json, runner

SAMPLE = ROOT / "sample_data"
IMAGE = SAMPLE / "images" / "val" / "scene_200000.png"
TEXTS = [
    "a small blue triangle, a small purple triangle and a small green square",  # its caption
    "a large red circle alone at the top",
    "one shape: a yellow square",
]


@pytest.fixture(scope="module")
def stage2_transformers(trained_stage2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage2_hf") / "blip2"
    invoke_json("convert", str(out), "--model", str(trained_stage2))
    return out


@pytest.fixture(scope="module")
def stage1_transformers(trained_stage1: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage1_hf") / "blip2_itm"
    invoke_json("convert", str(out), "--model", str(trained_stage1))
    return out


def test_ask_answers_as_eval_vqa_does(trained_stage2: Path, tmp_path: Path) -> None:
    """One question through `ask` and through `eval-vqa` (a one-question file): the same
    answer, so `ask` uses the same template and decoding settings."""
    questions = json.loads((SAMPLE / "vqa_val_questions.json").read_text())["questions"]
    question = next(q for q in questions if q["image_id"] == 200000)
    (tmp_path / "q.json").write_text(json.dumps({"questions": [question]}))
    vqa = invoke_json(
        "eval-vqa", "--model", str(trained_stage2), "--questions", str(tmp_path / "q.json"),
        "--images", str(IMAGE.parent), "--out", str(tmp_path / "vqa"),
    )  # fmt: skip
    expected = json.loads(Path(vqa["results"]).read_text())[0]["answer"]
    asked = invoke_json(
        "ask", "--model", str(trained_stage2), "--image", str(IMAGE), question["question"]
    )
    assert asked["answers"][0]["answer"] == expected
    assert asked["answers"][0]["prompt"] == f"Question: {question['question']} Answer:"
    plain = runner.invoke(
        app, ["ask", "--model", str(trained_stage2), "--image", str(IMAGE), question["question"]]
    )
    assert plain.exit_code == 0 and plain.stdout == expected + "\n"


def test_ask_free_prompt_continues_the_caption_prompt(trained_stage2: Path, tmp_path: Path) -> None:
    caption = invoke_json(
        "caption", "--model", str(trained_stage2), "--images", str(IMAGE),
        "--out", str(tmp_path / "caption"),
    )  # fmt: skip
    expected = json.loads(Path(caption["captions"]).read_text())[0]["caption"]
    asked = invoke_json("ask", "--model", str(trained_stage2), "--image", str(IMAGE))
    assert asked["answers"] == [{"question": None, "prompt": "a photo of", "answer": expected}]
    sampled = [
        invoke_json(
            "ask", "--model", str(trained_stage2), "--image", str(IMAGE), "--do-sample",
            "--temperature", "4.0", "--set", f"generate.seed={seed}",
        )["answers"][0]["answer"]
        for seed in (1, 2, 3)
    ]  # fmt: skip
    assert len(set(sampled)) > 1  # sampling does sample


def test_ask_on_a_transformers_directory(trained_stage2: Path, stage2_transformers: Path) -> None:
    ours = invoke_json(
        "ask", "--model", str(trained_stage2), "--image", str(IMAGE), "how many shapes are there?"
    )
    theirs = invoke_json(
        "ask",
        "--model",
        str(stage2_transformers),
        "--image",
        str(IMAGE),
        "how many shapes are there?",
    )
    assert theirs["answers"][0]["answer"] == ours["answers"][0]["answer"]


def _transformers_scores(directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(ITM match probability, ITC similarity) per text from transformers' own model."""
    model = Blip2ForImageTextRetrieval.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    transform = build_transform(load_transform_config(str(directory)), train=False)
    pixels = transform(load_image(Sample(image=IMAGE, image_id=0)))[None].expand(
        len(TEXTS), -1, -1, -1
    )
    input_ids, mask = tokenize_texts(tokenizer, TEXTS, torch.device("cpu"))
    with torch.no_grad():
        itm = model(pixels, input_ids, mask, use_image_text_matching_head=True).logits_per_image
        itc = model(
            pixels[:1], input_ids, mask, use_image_text_matching_head=False
        ).logits_per_image
    return itm.softmax(dim=-1)[:, 1], itc[0]


def test_match_scores_equal_transformers_retrieval_model(
    trained_stage1: Path, stage1_transformers: Path
) -> None:
    args = ["--image", str(IMAGE), *(arg for text in TEXTS for arg in ("--text", text))]
    ours = invoke_json("match", "--model", str(trained_stage1), *args)["matches"]
    converted = invoke_json("match", "--model", str(stage1_transformers), *args)["matches"]
    itm, itc = _transformers_scores(stage1_transformers)
    for row, other, p, s in zip(ours, converted, itm.tolist(), itc.tolist(), strict=True):
        assert row["itm_probability"] == pytest.approx(p, abs=1e-5)
        assert row["itc_similarity"] == pytest.approx(s, abs=1e-5)
        assert other["itm_probability"] == pytest.approx(p, abs=1e-5)
        assert other["itc_similarity"] == pytest.approx(s, abs=1e-5)
    assert [row["text"] for row in ours] == TEXTS


def test_match_refuses_a_stage2_model(trained_stage2: Path) -> None:
    result = runner.invoke(
        app, ["match", "--model", str(trained_stage2), "--image", str(IMAGE), "--text", "x"]
    )
    assert result.exit_code == 1
    assert "stage-2" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_lavis_pth_files_give_the_runs_results(
    trained_stage1: Path, trained_stage2: Path, tmp_path: Path
) -> None:
    """`convert --to lavis` files, read back with the backbones named by the (embedded default)
    config: the run's captions and match scores; a file of the other stage is refused."""
    stage1_pth, stage2_pth = tmp_path / "stage1.pth", tmp_path / "stage2.pth"
    invoke_json("convert", str(stage1_pth), "--model", str(trained_stage1), "--to", "lavis")
    invoke_json("convert", str(stage2_pth), "--model", str(trained_stage2), "--to", "lavis")
    images = ["--images", str(IMAGE.parent), "--batch-size", "100"]
    run = invoke_json(
        "caption", "--model", str(trained_stage2), *images, "--out", str(tmp_path / "a")
    )
    pth = invoke_json("caption", "--model", str(stage2_pth), *images, "--out", str(tmp_path / "b"))
    assert Path(pth["captions"]).read_text() == Path(run["captions"]).read_text()
    args = ["--image", str(IMAGE), *(arg for text in TEXTS for arg in ("--text", text))]
    assert (
        invoke_json("match", "--model", str(stage1_pth), *args)["matches"]
        == invoke_json("match", "--model", str(trained_stage1), *args)["matches"]
    )
    wrong = runner.invoke(app, ["caption", "--model", str(stage1_pth), "--images", str(IMAGE)])
    assert wrong.exit_code == 1 and "a stage-1 LAVIS checkpoint; this needs stage 2" in wrong.stderr


def test_a_hub_id_is_fetched_and_read_as_a_directory(
    stage2_transformers: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--model owner/name` goes through huggingface_hub's snapshot_download (here answering
    with a local transformers directory, as its cache would); offline and uncached, one line."""
    import huggingface_hub

    question = "how many shapes are there?"
    local = invoke_json("ask", "--model", str(stage2_transformers), "--image", str(IMAGE), question)
    asked: list[str] = []

    def snapshot_download(repo_id: str, **_: object) -> str:
        asked.append(repo_id)
        return str(stage2_transformers)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    hub = invoke_json("ask", "--model", "someone/blip2-tiny", "--image", str(IMAGE), question)
    assert asked == ["someone/blip2-tiny"] and hub["answers"] == local["answers"]
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = runner.invoke(
        app, ["ask", "--model", "someone/not-cached", "--image", str(IMAGE), question]
    )
    assert offline.exit_code == 2
    [line] = offline.stderr.strip().splitlines()
    assert line.startswith("error: --model someone/not-cached: no such file or folder")
