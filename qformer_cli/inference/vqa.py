"""Visual question answering: the prompt template, the answers in the official VQAv2 results
format, and their accuracy. ``eval-vqa --model`` runs :func:`answer_to_file`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qformer_cli.config import GenerationConfig
from qformer_cli.data import BadSampleLog, Sample
from qformer_cli.data.folder import image_file_sample
from qformer_cli.errors import UsageError
from qformer_cli.inference.generators import Generator, generate_for_samples, generate_to_file

# LAVIS's two zero-shot VQA prompts, by name
VQA_PROMPTS = {"answer": "Question: {} Answer:", "short-answer": "Question: {} Short answer:"}


def vqa_template(prompt: str) -> str:
    """A named prompt's template, or ``prompt`` itself, which must hold ``{}`` for the question."""
    template = VQA_PROMPTS.get(prompt, prompt)
    if "{}" not in template:
        raise UsageError(f"--prompt {prompt!r}: the template needs {{}} for the question")
    return template


def answer_row(sample: Sample, text: str) -> dict[str, Any]:
    """A row of the VQAv2 results format, with the image's id and file beside the question's."""
    return {
        "question_id": sample.question_id,
        "answer": text,
        "image_id": sample.image_id,
        "file": sample.file,
    }


def answer_samples(
    generator: Generator,
    samples: list[Sample],
    settings: GenerationConfig,
    template: str,
    *,
    batch_size: int = 32,
    blind: bool = False,
) -> list[dict[str, Any]]:
    """``[{"question_id", "answer", "image_id", "file"}]`` in input order; ``blind`` shuffles
    the images across the questions. A bad image raises."""
    generated = generate_for_samples(
        generator,
        samples,
        settings,
        lambda sample: template.format(sample.question),
        batch_size=batch_size,
        shuffle_images=blind,
    )
    return [answer_row(sample, text) for sample, text in generated]


def answer_to_file(
    generator: Generator,
    samples: list[Sample],
    settings: GenerationConfig,
    template: str,
    out_dir: Path,
    *,
    batch_size: int,
    blind: bool,
    bad: BadSampleLog,
    max_image_pixels: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Answer the questions (``read_vqa``'s samples) into ``out_dir/vqa_results.json`` (on a
    failure: the answers done so far) and list the questions ``bad`` skipped in
    ``out_dir/skipped.json``; the command's result. Scoring is the caller's (``eval-vqa
    --predictions`` scores a file it did not write). ``progress`` is told (done, total) after
    each batch. With ``resume``, the answers already in the results file are kept and their
    questions not asked again."""
    results_path = out_dir / "vqa_results.json"
    answers, resumed_with = generate_to_file(
        generator,
        samples,
        settings,
        lambda sample: template.format(sample.question),
        answer_row,
        results_path,
        "question_id",
        "answers",
        batch_size=batch_size,
        shuffle_images=blind,
        bad=bad,
        max_image_pixels=max_image_pixels,
        progress=progress,
        resume=resume,
    )
    result: dict[str, Any] = {
        "backend": generator.backend,
        "prompt": template,
        "results": str(results_path),
        "num_answered": len(answers),
        "resumed_with": resumed_with,
        **bad.result_fields(),
    }
    if bad.total:
        result["skipped"] = str(out_dir / "skipped.json")
    return result


def score_to_file(
    annotations: Path,
    predictions: Path,
    questions: Path | None,
    metric: str,
    out_dir: Path,
    skipped: set[object] | None = None,
) -> dict[str, Any]:
    """The VQA accuracy of ``predictions`` into ``out_dir/metrics.json``; questions in
    ``skipped`` (bad samples) are not scored, and their count is reported."""
    from qformer_cli.eval.vqa_metric import evaluate_vqa_files

    left_out = skipped or set()
    accuracy = evaluate_vqa_files(
        annotations,
        predictions,
        questions,
        metric=metric,  # type: ignore[arg-type]
        skipped=left_out,  # type: ignore[arg-type]
        require_vqav2_answers=True,
    ).to_dict()
    accuracy["unscored_skipped"] = len(left_out)
    (out_dir / "metrics.json").write_text(json.dumps(accuracy, indent=1))
    return accuracy


def ask(
    generator: Generator, image: Path, prompts: list[str], settings: GenerationConfig
) -> list[str]:
    """One text per prompt (each already holding its question), all about one image file."""
    samples = [
        dataclasses.replace(image_file_sample(image), question=prompt, question_id=index)
        for index, prompt in enumerate(prompts)
    ]
    generated = generate_for_samples(
        generator,
        samples,
        settings,
        lambda sample: sample.question or "",
        batch_size=len(samples),
    )
    return [text for _, text in generated]
