"""Does the training loader keep up with the step? Images/s of reading webdataset shards,
decoding and transforming (the training transform: RandomResizedCrop 0.5-1.0 to 224 px + flip,
CLIP normalization), with 0, 1 and 2 DataLoader workers, next to the images/s of stage-1 steps
on cached features (so the encoder's cost is left out: the loader's hardest case).

The shards hold synthetic 640x480 JPEGs (quality 90; a photo-sized decode), written once into a
temporary directory. The step row: the BLIP-2 Q-Former, B=8, on ViT-g-shaped features
(bench/stage1_step.py's step). ``workers to keep up`` is the step's images/s over one worker's:
how many worker processes the loader needs (on a GPU node the step is ~100x faster, so size
``data.num_workers`` from its own step rate the same way).

A second table captions a folder of the same JPEGs with a tiny BLIP-2 (greedy, batch 32):
images decoded in the main process between generation batches (as before 2026-12-01) vs by
loader workers while the model generates (``inference_workers``, what ``caption`` does now).

    python -m bench.loader [--quick] [--images 256] [--captions-only]
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tarfile
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image

from bench.common import (
    BenchOptions,
    Column,
    Machine,
    Table,
    add_common_args,
    measure_machine,
    options_from_args,
    print_header,
    print_table,
    progress,
)
from qformer_cli.data import SampleDataset, build_transform, make_dataloader
from qformer_cli.data.shards import read_shard_source
from qformer_cli.data.transforms import ImageTransformConfig

WORKERS = (0, 1, 2)
IMAGE_SIZE = (640, 480)


CAPTION_BATCH = 32


def jpeg_bytes(count: int) -> list[bytes]:
    """``count`` deterministic 640x480 JPEGs (quality 90): blurred noise, photo-sized."""
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(count):
        pixels = rng.integers(0, 255, (IMAGE_SIZE[1] // 8, IMAGE_SIZE[0] // 8, 3))
        image = Image.fromarray(pixels.astype(np.uint8)).resize(IMAGE_SIZE)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def write_jpeg_shards(directory: Path, count: int, per_shard: int = 64) -> str:
    """``count`` deterministic 640x480 JPEGs with captions, as img2dataset lays shards out."""
    images = jpeg_bytes(count)
    for shard in range(math.ceil(count / per_shard)):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as archive:
            for index in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                for name, data in ((f"{index:06d}.jpg", images[index]),
                                   (f"{index:06d}.txt", b"a synthetic photo")):  # fmt: skip
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return str(directory / f"{{00000..{math.ceil(count / per_shard) - 1:05d}}}.tar")


def loader_rate(source: str, workers: int, batch_size: int = 32) -> float:
    """Images/s of one pass over the shards: read, decode, transform, collate."""
    transform = build_transform(ImageTransformConfig(image_size=224), train=True)
    dataset = SampleDataset(read_shard_source(source), transform)
    loader = make_dataloader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    started = time.perf_counter()
    seen = sum(len(batch) for batch in loader)  # includes the workers' start-up, as a run has
    return seen / (time.perf_counter() - started)


def step_rate(device: torch.device, batch_size: int, repeats: int) -> float:
    """Images/s of BLIP-2 stage-1 steps (fp32) on random ViT-g-shaped cached features."""
    from bench.stage1_step import build, train_step  # the stage-1 bench's own step

    step = train_step(build(device, batch_size), reuse=True, precision="fp32")
    step()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return batch_size * repeats / (time.perf_counter() - started)


def run(
    machine: Machine, options: BenchOptions, batch_size: int = 8, images: int = 256
) -> list[Table]:
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        source = write_jpeg_shards(Path(directory), images)
        per_worker = None
        for workers in WORKERS:
            progress(f"loader, {workers} workers")
            rates = [loader_rate(source, workers) for _ in range(options.repeats)]
            rate = float(np.median(rates))
            per_worker = rate if workers == 1 else per_worker
            rows.append({"name": f"loader, {workers} workers", "images_per_s": rate})
    name = f"stage-1 step, BLIP-2 Q-Former, B={batch_size}, fp32"
    progress(name)
    rate = step_rate(machine.device, batch_size, 2 if options.quick else 4)
    needed = math.ceil(rate / per_worker) if per_worker else None
    rows.append({"name": name, "images_per_s": rate, "workers": needed})
    columns = [Column("images/s", "images_per_s", "{:,.1f}"),
               Column("workers to keep up", "workers", "{:d}")]  # fmt: skip
    notes = [
        f"{images} synthetic 640x480 JPEG (q90) in 64-image shards; training transform to 224 px",
        "steps on cached features: the loader's hardest case (no encoder in the step)",
    ]
    title = f"Loader (shards -> decode -> transform) vs stage-1 step ({machine.device.type})"
    return [Table(title, columns, rows, notes=notes), caption_table(options, images)]


def caption_table(options: BenchOptions, images: int) -> Table:
    """Captioning a folder of photo-sized JPEGs: decoding between batches vs overlapped."""
    from bench.common import throughput_rows, timeit_interleaved
    from bench.generation import build_tiny_blip2
    from qformer_cli.config import GenerationConfig
    from qformer_cli.data import inference_workers
    from qformer_cli.data.folder import read_image_folder
    from qformer_cli.inference.generators import TorchGenerator, generate_for_samples
    from qformer_cli.pretrained import load_stage2

    settings = GenerationConfig(num_beams=1, max_new_tokens=20, min_new_tokens=8)
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory) / "photos"
        folder.mkdir()
        for index, data in enumerate(jpeg_bytes(images)):
            (folder / f"IMG_{index:04d}.jpg").write_bytes(data)
        build_tiny_blip2(Path(directory) / "blip2", None, None)
        generator = TorchGenerator(load_stage2(Path(directory) / "blip2", torch.device("cpu")))
        samples = read_image_folder(folder)
        # what caption does on a machine with more than 4 cores (on this one, at least 1)
        overlapped = max(1, inference_workers(len(samples), CAPTION_BATCH))

        def caption(workers: int) -> list[str]:
            rows = generate_for_samples(
                generator, samples, settings, lambda _: "a photo of",
                batch_size=CAPTION_BATCH, workers=workers,
            )  # fmt: skip
            return [text for _, text in rows]

        same = "yes" if caption(0) == caption(overlapped) else "no"
        fns = {
            "decoded between batches (0 workers)": lambda: caption(0),
            f"decoded while generating ({overlapped} worker(s))": lambda: caption(overlapped),
        }
        timings = timeit_interleaved(fns, options)
    rows = throughput_rows(timings, next(iter(fns)), images, same)
    columns = [
        Column("s / folder", "seconds", "{:.2f}"),
        Column("images/s", "items_per_s", "{:.1f}"),
        Column("× before", "ratio", "{:.2f}×"),
        Column("same captions", "same", "{}"),
    ]
    notes = [
        f"{images} synthetic 640x480 JPEGs (q90) in a folder; a tiny BLIP-2 (bench/generation.py), "
        f"greedy, up to 20 new tokens, batch {CAPTION_BATCH}; worker start-up included",
    ]
    return Table("Captioning a folder: image decoding overlapped with generation (cpu)", columns,
                 rows, notes=notes)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument(
        "--captions-only", action="store_true", help="only the folder-captioning table"
    )
    args = parser.parse_args()
    options = options_from_args(args)
    machine = measure_machine(options.device, options.quick)
    print_header(machine, "Loader throughput")
    if args.captions_only:
        tables = [caption_table(options, args.images)]
    else:
        tables = run(machine, options, images=args.images)
    for table in tables:
        print_table(table, options.table_format)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
