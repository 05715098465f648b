"""Visual question answering: the prompt template, the answers in the official VQAv2 results
format, and their accuracy. ``eval-vqa --model`` runs :func:`answer_to_file`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qformer_cli.config import GenerationConfig
from qformer_cli.data import BadSampleLog, Sample, read_vqa
from qformer_cli.errors import UsageError
from qformer_cli.inference.generators import Generator, generate_for_samples

# LAVIS's two zero-shot VQA prompts, by name
VQA_PROMPTS = {"answer": "Question: {} Answer:", "short-answer": "Question: {} Short answer:"}


def vqa_template(prompt: str) -> str:
    """A named prompt's template, or ``prompt`` itself, which must hold ``{}`` for the question."""
    template = VQA_PROMPTS.get(prompt, prompt)
    if "{}" not in template:
        raise UsageError(f"--prompt {prompt!r}: the template needs {{}} for the question")
    return template


def answer_samples(
    generator: Generator,
    samples: list[Sample],
    settings: GenerationConfig,
    template: str,
    *,
    batch_size: int = 32,
    blind: bool = False,
    skip_bad_samples: bool = False,
) -> tuple[list[dict[str, Any]], BadSampleLog]:
    """``[{"question_id", "answer"}]`` in input order (the VQAv2 results format), and the log of
    images skipped as bad; ``blind`` shuffles the images across the questions."""
    generated, bad = generate_for_samples(
        generator,
        samples,
        settings,
        lambda sample: template.format(sample.question),
        batch_size=batch_size,
        shuffle_images=blind,
        skip_bad_samples=skip_bad_samples,
    )
    return [{"question_id": s.question_id, "answer": text} for s, text in generated], bad


def answer_to_file(
    generator: Generator,
    questions: Path,
    annotations: Path | None,
    images: Path,
    settings: GenerationConfig,
    template: str,
    results_path: Path,
    *,
    batch_size: int,
    blind: bool,
    skip_bad_samples: bool,
) -> dict[str, Any]:
    """Answer the questions file into ``results_path``; the command's result (scoring is the
    caller's: ``eval-vqa --predictions`` scores a file it did not write)."""
    bad = BadSampleLog(skip=skip_bad_samples)
    samples = read_vqa(questions, annotations, images, bad=bad)
    answers, bad_images = answer_samples(
        generator,
        samples,
        settings,
        template,
        batch_size=batch_size,
        blind=blind,
        skip_bad_samples=skip_bad_samples,
    )
    results_path.write_text(json.dumps(answers, indent=1))
    result: dict[str, Any] = {"backend": generator.backend, "prompt": template}
    if bad.total + bad_images.total:
        result["bad_samples"] = f"{bad.summary()}; {bad_images.summary()}"
    return result
