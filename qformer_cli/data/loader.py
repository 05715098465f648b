"""Torch datasets over samples, per-rank sharding, and the batching data loader.

Workers never raise for a bad image: they pass a :class:`BadSample` along, and the loader
reports it to the :class:`BadSampleLog` in the main process, which raises a one-line
:class:`DataError` (or, with ``skip=True``, counts it and drops the sample from its batch).
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from qformer_cli.data.mixture import MixtureSampler
from qformer_cli.data.sample import BadSampleLog, ImageError, Sample, load_image
from qformer_cli.errors import UsageError

ImageTransform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class BadSample:
    """A sample that could not be used, on its way to the main process's log."""

    message: str
    reason: str
    sample: Sample | None = None  # None: the entry did not even make a sample


@dataclass(frozen=True)
class LoadedSample:
    sample: Sample
    image: torch.Tensor  # (3, H, W) pixel values, or (N, C) features from a feature cache


def load_sample(
    sample: Sample, transform: ImageTransform, max_pixels: int | None = None
) -> LoadedSample | BadSample:
    try:
        return LoadedSample(sample, transform(load_image(sample, max_pixels)))
    except ImageError as error:
        return BadSample(str(error), error.reason, sample)


class SampleDataset(Dataset[LoadedSample | BadSample]):
    """Map-style dataset: item ``i`` is sample ``i`` with its transformed image.

    ``bad_samples`` is the policy for bad images (default: raise); pass the same log to the
    readers so entry errors and image errors are counted together. Images declaring more than
    ``max_image_pixels`` are bad (``data.max_image_pixels``).
    """

    def __init__(
        self,
        samples: list[Sample],
        transform: ImageTransform,
        *,
        skip_bad_samples: bool = False,
        bad_samples: BadSampleLog | None = None,
        max_image_pixels: int | None = None,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.bad_samples = bad_samples or BadSampleLog(skip=skip_bad_samples)
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> LoadedSample | BadSample:
        return load_sample(self.samples[index], self.transform, self.max_image_pixels)


class StreamingSampleDataset(IterableDataset[LoadedSample | BadSample]):
    """Iterable dataset over a re-iterable sample source (e.g. :func:`read_hf_dataset`).

    The source does its own splitting across ranks and workers (``datasets`` streaming gives
    each DataLoader worker its own shards)."""

    def __init__(
        self,
        source: Iterable[Sample | BadSample],
        transform: ImageTransform,
        *,
        skip_bad_samples: bool = False,
        bad_samples: BadSampleLog | None = None,
    ) -> None:
        self.source = source
        self.transform = transform
        self.bad_samples = bad_samples or BadSampleLog(skip=skip_bad_samples)

    def __iter__(self) -> Iterator[LoadedSample | BadSample]:
        for item in self.source:
            yield item if isinstance(item, BadSample) else load_sample(item, self.transform)

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.source, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)


@dataclass
class Batch:
    """A batch of samples with their images stacked; ``skipped`` are the bad samples dropped."""

    # (B, 3, H, W) pixel values, or (B, N, C) frozen-encoder features read from a feature cache
    # (qformer_cli.data.features), which the training recipes then use instead of the encoder
    images: torch.Tensor
    samples: list[Sample]
    skipped: list[BadSample]
    # streamed training (qformer_cli.data.streams): where each item came from, so the main
    # process knows each reader's place after the batches it consumed
    marks: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def image_ids(self) -> list[int | str]:
        return [s.image_id for s in self.samples]

    @property
    def captions(self) -> list[str]:
        """The first caption of each sample (training samples have exactly one)."""
        return [s.captions[0] if s.captions else "" for s in self.samples]

    @property
    def all_captions(self) -> list[tuple[str, ...]]:
        return [s.captions for s in self.samples]

    @property
    def questions(self) -> list[str]:
        return [s.question or "" for s in self.samples]

    @property
    def question_ids(self) -> list[int | None]:
        return [s.question_id for s in self.samples]

    @property
    def answers(self) -> list[tuple[str, ...]]:
        return [s.answers for s in self.samples]


def collate_samples(items: list[Any]) -> Batch:
    """Loaded and bad samples, or (item, mark) pairs from a streamed training set."""
    marks = [item[1] for item in items if isinstance(item, tuple)]
    items = [item[0] if isinstance(item, tuple) else item for item in items]
    loaded = [item for item in items if isinstance(item, LoadedSample)]
    skipped = [item for item in items if isinstance(item, BadSample)]
    images = torch.stack([item.image for item in loaded]) if loaded else torch.empty(0, 3, 0, 0)
    return Batch(images, [item.sample for item in loaded], skipped, marks)


class RankSampler(Sampler[int]):
    """Indices of one rank's shard, like ``DistributedSampler``, for any world size (1 too).

    Shuffled from ``seed + epoch`` when ``shuffle``. Per index, rank r takes every R-th index:
    with ``equal_shards`` indices are repeated so every rank gets the same count, as DDP needs;
    without it (evaluation) each sample appears exactly once across ranks.

    With ``batch_size`` (a rank's batch; training) the order is dealt in whole global batches
    of ``batch_size * world_size``: rank r takes the r-th contiguous part of each, the order in
    which the losses gather the global batch, so R ranks train on exactly the global batches of
    one process, sample for sample; an incomplete last global batch is dropped, as one process
    drops its last incomplete batch. Every rank gets the same count.
    """

    def __init__(
        self,
        length: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        equal_shards: bool = True,
        batch_size: int | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.length = length
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.equal_shards = equal_shards
        self.batch_size = batch_size
        self.epoch = 0
        self.skip = 0  # indices of this epoch to leave out from the start (mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.batch_size is not None:
            return iter(self._whole_batches(order)[self.skip :])
        if self.equal_shards and order:
            padded = math.ceil(len(order) / self.world_size) * self.world_size
            order = (order * math.ceil(padded / len(order)))[:padded]
        return iter(order[self.rank :: self.world_size][self.skip :])

    def _whole_batches(self, order: list[int]) -> list[int]:
        """This rank's part of every complete global batch of ``order``, in order."""
        size = self.batch_size or 1
        global_batch = size * self.world_size
        start = self.rank * size
        return [
            index
            for offset in range(0, len(order) - global_batch + 1, global_batch)
            for index in order[offset + start : offset + start + size]
        ]

    def __len__(self) -> int:
        if self.batch_size is not None:
            return self.length // (self.batch_size * self.world_size) * self.batch_size
        if self.equal_shards:
            return math.ceil(self.length / self.world_size)
        return len(range(self.rank, self.length, self.world_size))


class SampleLoader:
    """Iterates :class:`Batch` es; reports bad samples to the dataset's log in this process."""

    def __init__(self, loader: DataLoader[Any], dataset: Dataset[LoadedSample | BadSample]):
        self.loader = loader
        self.dataset = dataset
        self.bad_samples: BadSampleLog = dataset.bad_samples  # every dataset here carries one

    @property
    def _stream(self) -> Any:
        """The dataset when it is a streamed training set (qformer_cli.data.streams, which
        imports this module), else None."""
        return self.dataset if hasattr(self.dataset, "state") else None

    def __iter__(self) -> Iterator[Batch]:
        stream = self._stream
        if stream is not None:
            stream.begin()  # the workers start where the batches consumed so far end
        for batch in self.loader:
            for bad in batch.skipped:
                self.bad_samples.handle(bad.message, bad.reason, bad.sample)
            if stream is not None:
                stream.state.advance(batch.marks)
            if len(batch):
                yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def skip_batches(self, count: int) -> None:
        """Start this epoch's next pass after ``count`` batches, without loading them
        (resuming mid-epoch); call after :meth:`set_epoch`."""
        sampler = self.loader.sampler
        if self._stream is not None:  # each reader resumes at its saved place instead
            return
        if not isinstance(sampler, RankSampler | MixtureSampler):
            if count:
                raise ValueError("only map-style datasets can resume mid-epoch")
            return
        sampler.skip = count * (self.loader.batch_size or 1)

    def data_state(self) -> dict[str, Any] | None:
        """A streamed set's place (for the checkpoint); None for map-style data, whose place
        is the step."""
        return self._stream.state.to_dict() if self._stream is not None else None

    def restore_data_state(self, saved: dict[str, Any] | None) -> None:
        """Continue a streamed set at a checkpoint's :meth:`data_state`."""
        if self._stream is None:
            if saved is not None:
                raise UsageError("the checkpoint was streamed: resume with data.streaming=true")
            return
        if saved is None:
            raise UsageError(
                "the checkpoint holds no stream places: resume with data.streaming off"
            )
        self._stream.load_state(saved)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new epoch (call before iterating, as with DistributedSampler)."""
        sampler = self.loader.sampler
        if isinstance(sampler, RankSampler | MixtureSampler):
            sampler.set_epoch(epoch)
            sampler.skip = 0
        if isinstance(self.dataset, StreamingSampleDataset):
            self.dataset.set_epoch(epoch)


def leave_stop_signals_to_main(_worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT. A scheduler stopping a job (SLURM, docker
    stop, Ctrl-C in a terminal) signals the whole process group: a worker killed by it would
    crash the main process before it could save its checkpoint and stop at a step boundary; the
    main process shuts its workers down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def inference_workers(sample_count: int, batch_size: int) -> int:
    """Loader workers for a pass over ``sample_count`` images in batches: 2 that decode and
    transform the next batches while the model runs on this one, where there are more than 4
    cores; none for a single batch (nothing to overlap) or on a small CPU, where the model's
    own threads need the cores (BENCHMARKS.md, "Captioning a folder")."""
    if sample_count <= batch_size or (os.cpu_count() or 1) <= 4:
        return 0
    return 2


def make_dataloader(
    dataset: Dataset[LoadedSample | BadSample],
    *,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    drop_last: bool = False,
    equal_shards: bool | None = None,
    sampler: Sampler[int] | None = None,
) -> SampleLoader:
    """Batches of ``dataset`` for this rank, loaded by ``num_workers`` worker processes.

    Map-style datasets are sharded here (``equal_shards`` defaults to ``shuffle``: training
    pads shards to equal length, evaluation sees every sample once; with ``drop_last`` each
    rank gets its contiguous part of every complete global batch, see :class:`RankSampler`).
    Streaming datasets are sharded by their source (see :func:`read_hf_dataset`'s
    ``rank``/``world_size``).
    Worker random streams (crop, flip) are seeded from ``seed`` and ``rank``. ``sampler``
    replaces the rank sampler (a :class:`~qformer_cli.data.mixture.MixtureSampler`).
    """
    if sampler is None and not isinstance(dataset, IterableDataset):  # map-style
        sampler = RankSampler(
            len(dataset),
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            seed=seed,
            equal_shards=shuffle if equal_shards is None else equal_shards,
            batch_size=batch_size if drop_last else None,
        )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed * 1000 + rank),
        worker_init_fn=leave_stop_signals_to_main,
    )
    return SampleLoader(loader, dataset)
