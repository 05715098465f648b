"""Text generation from images behind one interface, with one batched loop over samples.

A :class:`Generator` turns preprocessed images into a per-image representation
(``encode_images``) and continues prompts from it (``generate``). :class:`TorchGenerator` runs a
stage-2 pipeline with transformers' ``generate`` (beam search, sampling); :class:`OnnxGenerator`
runs an ``export-onnx`` directory with onnxruntime (greedy or beam search).
:func:`generate_for_samples` is the loop both use: load and preprocess images in batches,
optionally shuffle the encoded images across the batch (the grounding check), build each
sample's prompt, generate;
:func:`rows_to_file` writes what it yields, keeping the rows done when a run fails.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from qformer_cli.config import GenerationConfig, RunConfig
from qformer_cli.data import (
    BadSampleLog,
    Sample,
    SampleDataset,
    build_transform,
    inference_workers,
    make_dataloader,
)
from qformer_cli.data.json_files import read_json
from qformer_cli.data.transforms import ImageTransformConfig
from qformer_cli.errors import DataError, Interrupted, QformerError, UsageError
from qformer_cli.export.onnx_runtime import generate_text_onnx
from qformer_cli.inference.generate import generate_text

Encoded = torch.Tensor | np.ndarray  # (B, ...) one row per image


class Generator(Protocol):
    backend: str  # "torch" | "onnx"
    image_transform: ImageTransformConfig  # how the model reads images
    prompt: str  # the prompt the model was trained with ("" when unknown)

    def encode_images(self, pixel_values: torch.Tensor) -> Encoded:
        """Preprocessed images (B, 3, H, W) -> what ``generate`` reads, one row per image."""
        ...

    def generate(
        self, encoded: Encoded, prompts: list[str], settings: GenerationConfig
    ) -> list[str]:
        """One text per encoded image, continuing its prompt."""
        ...


class TorchGenerator:
    """A stage-2 pipeline (frozen vision, bridge, frozen LLM): transformers' ``generate``."""

    backend = "torch"

    def __init__(self, pipeline: Any) -> None:  # pretrained.Stage2Pipeline
        self.pipeline = pipeline
        self.image_transform = pipeline.image_transform
        self.prompt = pipeline.prompt
        self.device = next(pipeline.bridge.parameters()).device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> frozen vision features (B, N, C)."""
        vision = self.pipeline.vision
        dtype = next(vision.parameters()).dtype
        with torch.no_grad():
            return vision(pixel_values.to(device=self.device, dtype=dtype))

    def generate(
        self, encoded: Encoded, prompts: list[str], settings: GenerationConfig
    ) -> list[str]:
        pipeline = self.pipeline
        features = torch.as_tensor(encoded).float()
        return generate_text(
            pipeline.bridge,
            pipeline.llm,
            pipeline.tokenizer,
            features,
            prompts,
            settings,
            pipeline.qformer_tokenizer,
        )


class OnnxGenerator:
    """An ``export-onnx`` directory run by onnxruntime: greedy or beam search with the KV
    cache."""

    backend = "onnx"

    def __init__(self, pipeline: Any) -> None:  # export.onnx_runtime.OnnxPipeline
        self.pipeline = pipeline
        self.image_transform = pipeline.image_transform
        self.prompt = pipeline.prompt

    def encode_images(self, pixel_values: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) -> the vision + Q-Former graph's soft prompt (B, Q, D); for an
        instruction-aware Q-Former the pixels, which ``generate`` reads with the prompts."""
        if self.pipeline.instruction_aware:
            return pixel_values.numpy()
        return self.pipeline.soft_prompt(pixel_values.numpy())

    def generate(
        self, encoded: Encoded, prompts: list[str], settings: GenerationConfig
    ) -> list[str]:
        soft_prompt = np.asarray(encoded)
        if self.pipeline.instruction_aware:
            soft_prompt = self.pipeline.soft_prompt(soft_prompt, prompts)
        return generate_text_onnx(self.pipeline, soft_prompt, prompts, settings)


def load_generator(
    model: Path,
    backend: str = "torch",
    device: torch.device | None = None,
    backbones: RunConfig | None = None,
) -> Generator:
    """``backend`` torch: a stage-2 run/checkpoint, a transformers BLIP-2 directory or a LAVIS
    ``.pth`` (with the backbones ``backbones`` names) on ``device`` (default CPU); onnx: an
    ``export-onnx`` directory."""
    if backend == "onnx":
        from qformer_cli.export.onnx_runtime import OnnxPipeline

        return OnnxGenerator(OnnxPipeline.load(model))
    if backend != "torch":
        raise UsageError(f"--backend {backend!r}: choose torch or onnx")
    from qformer_cli.pretrained import load_stage2

    return TorchGenerator(load_stage2(model, device or torch.device("cpu"), backbones=backbones))


def describe(generator: Generator) -> str:
    """Where a generator runs, for messages: the device, or the onnxruntime provider."""
    if isinstance(generator, OnnxGenerator):
        return f"onnxruntime provider: {generator.pipeline.provider}"
    return f"device: {getattr(generator, 'device', 'cpu')}"


def shuffled(encoded: Encoded, seed: int) -> Encoded:
    """The images permuted across the batch so that none stays with its own text (a random
    derangement: one cycle through a random order), the grounding check; the same permutation
    for either backend's representation."""
    count = encoded.shape[0]
    if count < 2:
        return encoded
    cycle = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    order = torch.empty_like(cycle)
    order[cycle] = cycle.roll(-1)  # position cycle[i] shows image cycle[i + 1]
    return encoded[order] if isinstance(encoded, torch.Tensor) else encoded[order.numpy()]


def generate_for_samples(
    generator: Generator,
    samples: list[Sample],
    settings: GenerationConfig,
    prompt_for: Callable[[Sample], str],
    *,
    batch_size: int,
    shuffle_images: bool = False,
    bad: BadSampleLog | None = None,
    max_image_pixels: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> Iterator[tuple[Sample, str]]:
    """One generated text per sample (its image + its prompt), batched, in input order, yielded
    batch by batch (so that a failure keeps what was done). With ``shuffle_images`` each
    batch's images are deranged first (batch ``i`` with seed ``i``). Bad images follow ``bad``
    (default: raise); ``progress`` is told (samples done, samples) after each batch. Images
    are decoded by ``workers`` loader processes (default :func:`inference_workers`)."""
    bad = bad if bad is not None else BadSampleLog()
    transform = build_transform(generator.image_transform, train=False)
    dataset = SampleDataset(samples, transform, bad_samples=bad, max_image_pixels=max_image_pixels)
    done = 0
    if workers is None:  # decoding the next batches overlaps generation
        workers = inference_workers(len(samples), batch_size)
    loader = make_dataloader(dataset, batch_size=batch_size, num_workers=workers)
    for index, batch in enumerate(loader):
        encoded = generator.encode_images(batch.images)
        if shuffle_images:
            encoded = shuffled(encoded, seed=index)
        prompts = [prompt_for(sample) for sample in batch.samples]
        texts = generator.generate(encoded, prompts, settings)
        yield from zip(batch.samples, texts, strict=True)
        done += len(batch) + len(batch.skipped)
        if progress is not None:
            progress(done, len(samples))


def rows_to_file(rows: Iterable[dict[str, Any]], path: Path, noun: str) -> list[dict[str, Any]]:
    """Collect result rows and write them to ``path`` as a JSON list. If the rows stop with an
    error, the rows done so far are written first and the error says where they are."""
    done: list[dict[str, Any]] = []
    try:
        done.extend(rows)
    except (QformerError, KeyboardInterrupt) as error:
        if not done:
            raise
        path.write_text(json.dumps(done, indent=1))
        note = f"{len(done)} {noun} done before it are in {path}"
        if isinstance(error, KeyboardInterrupt):
            raise Interrupted(f"interrupted; {note}") from None
        error.args = (f"{error}; {note}",)  # the same error (type, exit code), now with the note
        raise
    path.write_text(json.dumps(done, indent=1))
    return done


def rows_done(path: Path, key: str) -> list[dict[str, Any]]:
    """The rows an interrupted run left in the results file ``path`` (none when there is no
    file), each with its ``key`` (``image_id`` for captions, ``question_id`` for answers)."""
    if not path.is_file():
        return []
    rows = read_json(path)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and key in r for r in rows):
        raise DataError(f"{path}: not a results file to resume (rows with '{key}')")
    return rows


def generate_to_file(
    generator: Generator,
    samples: list[Sample],
    settings: GenerationConfig,
    prompt_for: Callable[[Sample], str],
    row_of: Callable[[Sample, str], dict[str, Any]],
    results_path: Path,
    key: str,
    noun: str,
    *,
    batch_size: int,
    shuffle_images: bool,
    bad: BadSampleLog,
    max_image_pixels: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    resume: bool = False,
) -> tuple[list[dict[str, Any]], int]:
    """The results file of a generation job (captions, answers): one ``row_of`` per sample in
    input order, written when done or when the job fails (the rows done kept), and the samples
    ``bad`` skipped listed in ``skipped.json`` beside it. With ``resume`` the rows already in
    ``results_path`` are kept and their samples (by ``key``) not run again; ``noun`` names
    the rows in messages. Returns the rows and how many came from the earlier run."""
    done = rows_done(results_path, key) if resume else []
    finished = {row[key] for row in done}
    todo = [sample for sample in samples if getattr(sample, key) not in finished]
    generated = generate_for_samples(
        generator,
        todo,
        settings,
        prompt_for,
        batch_size=batch_size,
        shuffle_images=shuffle_images,
        bad=bad,
        max_image_pixels=max_image_pixels,
        progress=progress,
    )
    new_rows = (row_of(sample, text) for sample, text in generated)
    rows = rows_to_file(itertools.chain(done, new_rows), results_path, noun)
    bad.write_records(results_path.parent / "skipped.json")
    return rows, len(done)
