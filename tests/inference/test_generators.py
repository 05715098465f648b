"""The one batched generation loop, with a fake Generator for each kind of representation the
backends use (torch tensors, numpy arrays): order, batching, prompts, bad samples, and the
--shuffle-images / --blind permutation, alike for both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qformer_cli.config import GenerationConfig
from qformer_cli.data import BadSampleLog, Sample, load_transform_config, read_image_folder
from qformer_cli.errors import DataError
from qformer_cli.inference.generators import generate_for_samples
from tests.tiny_runs import ROOT

VAL_IMAGES = ROOT / "sample_data" / "images" / "val"


class FakeGenerator:
    """Encodes each image as its mean pixel value; 'generates' that value and the prompt, so
    each text shows which image reached which prompt. ``as_numpy``: onnx-style rows."""

    image_transform = load_transform_config(str(ROOT / "sample_data" / "backbones" / "vision"))
    prompt = ""

    def __init__(self, as_numpy: bool) -> None:
        self.backend = "onnx" if as_numpy else "torch"
        self.as_numpy = as_numpy
        self.batches: list[int] = []

    def encode_images(self, pixel_values: torch.Tensor):
        means = pixel_values.mean(dim=(1, 2, 3))  # (B,)
        return means.numpy() if self.as_numpy else means

    def generate(self, encoded, prompts: list[str], settings: GenerationConfig) -> list[str]:
        self.batches.append(len(prompts))
        return [
            f"{float(value):.6f}|{prompt}" for value, prompt in zip(encoded, prompts, strict=True)
        ]


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return read_image_folder(VAL_IMAGES)[:10]


def run(samples: list[Sample], as_numpy: bool, **options) -> tuple[list[str], FakeGenerator]:
    generator = FakeGenerator(as_numpy)
    results = list(
        generate_for_samples(
            generator,
            samples,
            GenerationConfig(),
            lambda s: str(s.image_id),
            batch_size=4,
            **options,
        )
    )
    assert [s for s, _ in results] == samples  # input order
    return [text for _, text in results], generator


@pytest.mark.parametrize("as_numpy", [False, True])
def test_batches_in_order_with_each_samples_prompt(samples, as_numpy: bool) -> None:
    texts, generator = run(samples, as_numpy)
    assert generator.batches == [4, 4, 2]
    assert [text.split("|")[1] for text in texts] == [str(s.image_id) for s in samples]


def test_both_representations_are_shuffled_alike_and_every_batch_is_deranged(samples) -> None:
    plain, _ = run(samples, as_numpy=False)
    torch_shuffled, _ = run(samples, as_numpy=False, shuffle_images=True)
    numpy_shuffled, _ = run(samples, as_numpy=True, shuffle_images=True)
    assert torch_shuffled == numpy_shuffled
    images = [text.split("|")[0] for text in plain]
    moved = [text.split("|")[0] for text in torch_shuffled]
    prompts = [text.split("|")[1] for text in torch_shuffled]
    assert prompts == [str(s.image_id) for s in samples]  # the prompts stay
    for start in (0, 4, 8):  # within each batch: the same images, none left in place
        assert sorted(moved[start : start + 4]) == sorted(images[start : start + 4])
        pairs = zip(moved[start : start + 4], images[start : start + 4], strict=True)
        assert all(shown != own for shown, own in pairs)


def test_a_bad_image_is_refused_or_skipped(samples, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with_bad = [*samples[:3], Sample(image=broken, image_id="broken", origin=str(broken))]
    with pytest.raises(DataError, match=r"broken\.png"):
        run(with_bad, as_numpy=True)
    generator = FakeGenerator(as_numpy=True)
    bad = BadSampleLog(skip=True)
    done: list[tuple[int, int]] = []
    results = generate_for_samples(
        generator,
        with_bad,
        GenerationConfig(),
        lambda s: "",
        batch_size=2,
        bad=bad,
        progress=lambda count, total: done.append((count, total)),
    )
    assert [s.image_id for s, _ in results] == [s.image_id for s in samples[:3]]
    assert bad.total == 1 and bad.records[0]["image_id"] == "broken"
    assert done == [(2, 4), (4, 4)]  # the skipped sample counts as done
