"""The Python API: what the commands do, callable from a notebook or a script.

    import qformer_cli as qf

    model = qf.load_model("runs/demo/stage2")          # a run, a checkpoint, a transformers
    qf.caption(model, ["cat.jpg", "dog.png"])          # BLIP-2 directory or an ONNX export
    qf.answer(model, "cat.jpg", ["What color is the cat?"])
    scores = qf.retrieve(qf.load_model("runs/demo/stage1"), images, ["a red circle", ...])

Images are file paths, folders (every image inside, sorted) or PIL images. Decoding settings
default to the config's: ``generate`` for captions, ``vqa`` for answers; keyword arguments
(``num_beams=3``, ``max_new_tokens=20``, ...) override them. Nothing is written to disk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from qformer_cli.config import GenerationConfig, check_ranges, vqa_generation
from qformer_cli.data import Sample, build_transform, load_image
from qformer_cli.data.folder import image_file_sample, read_image_folder
from qformer_cli.errors import UsageError
from qformer_cli.inference.caption import caption_prompt, caption_samples
from qformer_cli.inference.generators import Generator, load_generator
from qformer_cli.inference.vqa import answer_samples, vqa_template

ImageInput = str | Path | Image.Image
Images = ImageInput | Sequence[ImageInput]


@dataclass
class Model:
    """A loaded model: ``stage`` 2 captions and answers (torch or onnxruntime ``backend``),
    ``stage`` 1 retrieves (torch)."""

    stage: int
    backend: str
    source: Path
    generator: Generator | None = None  # stage 2
    retrieval: Any = None  # stage 1: pretrained.Stage1Pipeline


def load_model(path: str | Path, *, device: str = "auto") -> Model:
    """A run or checkpoint directory (stage 1 or 2), a transformers BLIP-2 directory, or an
    ``export-onnx`` directory of a stage-2 model; on ``device`` (auto: a CUDA GPU when usable)."""
    from qformer_cli.pretrained import checkpoint_stage, load_stage1_pipeline
    from qformer_cli.runtime import init_distributed

    path = Path(path)
    if (path / "manifest.json").is_file() and (path / "vision_qformer.onnx").is_file():
        return Model(2, "onnx", path, generator=load_generator(path, "onnx"))
    _, torch_device = init_distributed(device)
    if checkpoint_stage(path) == 1:
        return Model(1, "torch", path, retrieval=load_stage1_pipeline(path, torch_device))
    return Model(2, "torch", path, generator=load_generator(path, "torch", torch_device))


def caption(
    model: Model,
    images: Images,
    *,
    prompt: str | None = None,
    batch_size: int = 32,
    **settings: Any,
) -> list[dict[str, Any]]:
    """``[{"image", "caption"}]``, one per image in input order (a folder: its sorted files);
    ``prompt`` defaults to the one the model was trained with."""
    generator = _generator(model)
    config = _settings(GenerationConfig(), model, settings)
    samples = _samples(images)
    if prompt is not None:
        config = dataclasses.replace(config, prompt=prompt)
    chosen = caption_prompt(generator, config, given=prompt is not None)
    captions, _ = caption_samples(generator, samples, config, chosen, batch_size=batch_size)
    return [
        {"image": sample.origin, "caption": row["caption"]}
        for sample, row in zip(samples, captions, strict=True)
    ]


def answer(
    model: Model,
    images: Images,
    questions: str | Sequence[str],
    *,
    prompt: str | None = None,
    batch_size: int = 32,
    **settings: Any,
) -> list[str]:
    """One answer per question: ``images`` one per question, or one image for every question.
    ``prompt``: a template with ``{}`` for the question, or ``answer`` / ``short-answer``."""
    generator = _generator(model)
    config = _settings(vqa_generation(), model, settings)
    questions = [questions] if isinstance(questions, str) else list(questions)
    samples = _samples(images)
    if len(samples) == 1:
        samples = samples * len(questions)
    if len(samples) != len(questions):
        raise UsageError(f"{len(samples)} images for {len(questions)} questions")
    asked = [
        dataclasses.replace(sample, question=question, question_id=index)
        for index, (sample, question) in enumerate(zip(samples, questions, strict=True))
    ]
    template = vqa_template(prompt if prompt is not None else config.prompt)
    answers = answer_samples(generator, asked, config, template, batch_size=batch_size)
    return [row["answer"] for row in answers]


def retrieve(
    model: Model, images: Images, texts: Sequence[str], *, k: int = 0, batch_size: int = 64
) -> torch.Tensor:
    """(N_img, N_txt) image-text scores of a stage-1 model: ITC similarity, or with ``k > 0``
    each image's top ``k`` texts re-ranked by ITM (the rest -inf), as ``eval-retrieval`` does."""
    from qformer_cli.inference.retrieve import image_text_scores

    if model.retrieval is None:
        raise UsageError(f"{model.source}: a stage-{model.stage} model; retrieval needs stage 1")
    pipeline = model.retrieval
    transform = build_transform(pipeline.image_transform, False)
    pixels = torch.stack([transform(load_image(sample)) for sample in _samples(images)])
    return image_text_scores(pipeline, pixels, list(texts), k=k, batch_size=batch_size)


def _generator(model: Model) -> Generator:
    if model.generator is None:
        raise UsageError(f"{model.source}: a stage-1 model; captions and answers need stage 2")
    return model.generator


def _settings(base: GenerationConfig, model: Model, overrides: dict[str, Any]) -> GenerationConfig:
    """``base`` with keyword overrides."""
    known = {field.name for field in dataclasses.fields(GenerationConfig)} - {"prompt"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"unknown generation settings {unknown} (known: {sorted(known)})")
    settings = dataclasses.replace(base, **overrides)
    check_ranges(settings, "settings")
    return settings


def _samples(images: Images) -> list[Sample]:
    """Samples for image paths, folders and PIL images, in order."""
    items = [images] if isinstance(images, str | Path | Image.Image) else list(images)
    samples: list[Sample] = []
    for index, item in enumerate(items):
        if isinstance(item, Image.Image):
            samples.append(Sample(image=item, image_id=index, origin=f"image {index}"))
        elif Path(item).is_dir():
            samples.extend(read_image_folder(item))
        else:
            samples.append(image_file_sample(Path(item)))
    if not samples:
        raise UsageError("no images given")
    return samples


__all__ = ["Model", "answer", "caption", "load_model", "retrieve"]
