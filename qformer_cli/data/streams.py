"""Training data read as streams (``data.streaming``): webdataset shards read front to back,
never indexed, for shard sets too big to index before training starts.

Every DataLoader worker of every rank is a *reader* with a fixed *slot*
(``rank * workers + role``). In each pass over a source, the shard files are put in an order
drawn from the run's seed and the pass, and reader ``slot`` of ``slots`` reads files
``slot, slot + slots, ...`` of it; with fewer files than readers each reader reads every file
and keeps every ``slots``-th sample. So in one pass the readers see disjoint samples that cover
the source. A reader that finishes its pass begins the next one (new file order): streams are
endless, and runs count steps (``train.max_steps``).

Within a file, samples pass through a shuffle buffer of ``data.shuffle_buffer`` samples, seeded
by the seed, the pass and the file, and emptied at the file's end. A reader's place in a source
is therefore ``(pass, file, samples taken from the file)``; each item carries it, the main
process keeps the place after the last item it trained on, and the checkpoint stores it per
rank, reader and source. ``--resume`` starts each reader at its place (re-reading, without
decoding, the part of the file already trained on), so a resumed run trains on exactly the
samples of the uninterrupted one. Sources that are not tar shards (JSON files, tables, parquet,
``hf:``) are read whole, as in map-style training, and dealt to readers the same way.

Mixtures (``data.sources``): batch ``g`` of every rank comes from the source
:func:`~qformer_cli.data.mixture.source_schedule` gives it, so each global batch is from one
source, as in map-style training. A tar's members belong to one sample while they share a key
(the name before the first dot) and follow each other, as img2dataset writes them.
"""

from __future__ import annotations

import itertools
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from qformer_cli.data.json_files import shown
from qformer_cli.data.loader import BadSample, ImageTransform, LoadedSample, load_sample
from qformer_cli.data.mixture import source_schedule
from qformer_cli.data.sample import IMAGE_EXTENSIONS, Sample
from qformer_cli.data.shards import CAPTION_EXTENSIONS, shard_caption
from qformer_cli.errors import DataError, UsageError

# A reader's place in one source: (pass, file of the reader's pass, samples taken from it).
Place = tuple[int, int, int]
START: Place = (0, 0, 0)


@dataclass(frozen=True)
class StreamMark:
    """Where an item came from: the reader (``role``), the rank-local batch index, the source,
    and the reader's place in that source after this item."""

    role: int
    batch: int
    source: int
    place: Place


def _pass_order(count: int, seed: int, source: int, pass_: int) -> list[int]:
    order = list(range(count))
    random.Random(f"files:{seed}:{source}:{pass_}").shuffle(order)
    return order


class TarStream:
    """One source's webdataset shards, read front to back."""

    def __init__(self, files: list[Path], name: str, *, index: int, seed: int, buffer: int):
        self.files = files
        self.name = name  # as data.sources names it (logged per sample in a mixture)
        self.index = index
        self.seed = seed
        self.buffer = buffer

    def records(
        self, slot: int, slots: int, start: Place
    ) -> Iterator[tuple[Sample | BadSample, Place]]:
        """This reader's samples from ``start`` on, each with the place after it; endless."""
        pass_, first_file, skip = start
        while True:
            order = _pass_order(len(self.files), self.seed, self.index, pass_)
            split_files = len(self.files) >= slots
            mine = order[slot::slots] if split_files else order
            yielded = False
            for position in range(first_file, len(mine)):
                file_number = mine[position]
                keep = None if split_files else (slot + position) % slots
                rows = self._shuffled(file_number, pass_, slots, keep)
                for taken, sample in enumerate(rows, start=1):
                    yielded = True
                    if taken > skip:
                        yield sample, (pass_, position, taken)
                skip = 0
            if not yielded and first_file == 0:
                raise DataError(
                    f"{self.name}: reader {slot} of {slots} found no samples in a pass "
                    "(fewer samples than DataLoader workers times processes?)"
                )
            pass_, first_file = pass_ + 1, 0

    def _shuffled(
        self, file_number: int, pass_: int, slots: int, keep: int | None
    ) -> Iterator[Sample | BadSample]:
        """A file's samples (every ``slots``-th from ``keep`` when given) through the shuffle
        buffer, seeded by the run, the pass and the file."""
        rng = random.Random(f"buffer:{self.seed}:{self.index}:{pass_}:{file_number}")
        samples = read_tar_samples(self.files[file_number])
        if keep is not None:
            samples = (s for i, s in enumerate(samples) if i % slots == keep)
        held: list[Sample | BadSample] = []
        for sample in samples:
            held.append(sample)
            if len(held) > self.buffer:
                yield held.pop(rng.randrange(len(held)))
        rng.shuffle(held)
        yield from held


class ListStream:
    """A source read whole (a JSON file, a table, parquet, ``hf:``), dealt to readers: each pass
    in a seeded order, reader ``slot`` taking every ``slots``-th sample."""

    def __init__(self, samples: list[Sample], name: str, *, index: int, seed: int):
        self.samples = samples
        self.name = name
        self.index = index
        self.seed = seed

    def records(
        self, slot: int, slots: int, start: Place
    ) -> Iterator[tuple[Sample | BadSample, Place]]:
        if len(self.samples) < slots:
            raise DataError(
                f"{self.name}: {len(self.samples)} samples for {slots} readers "
                "(DataLoader workers times processes)"
            )
        pass_, _, skip = start
        while True:
            order = _pass_order(len(self.samples), self.seed, self.index, pass_)[slot::slots]
            for taken, number in enumerate(order[skip:], start=skip + 1):
                yield self.samples[number], (pass_, 0, taken)
            pass_, skip = pass_ + 1, 0


Stream = TarStream | ListStream


def read_tar_samples(shard: Path) -> Iterator[Sample | BadSample]:
    """A tar shard's samples in file order, read front to back (``r|``: no seeking): adjacent
    members sharing a key make one sample. A sample without a caption, or with an empty one,
    comes as a :class:`BadSample` (its reason ``missing caption``)."""
    key, image, caption = None, None, None
    try:
        with tarfile.open(shard, "r|") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                name, dot, extension = member.name.partition(".")
                extension = dot + extension.lower()
                if name != key:
                    if image is not None:
                        yield _sample(shard, key, image, caption)
                    key, image, caption = name, None, None
                if extension in IMAGE_EXTENSIONS:
                    image = archive.extractfile(member).read()
                elif extension in CAPTION_EXTENSIONS and caption is None:
                    caption = archive.extractfile(member).read()
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"{shown(shard)}: not a readable tar shard ({error})") from None
    if image is not None:
        yield _sample(shard, key, image, caption)


def _sample(
    shard: Path, key: str | None, image: bytes, caption: bytes | None
) -> Sample | BadSample:
    where = f"{shown(shard)}: {key}"
    sample = Sample(image=image, image_id=str(key), origin=where, file=f"{shard.name}/{key}")
    try:
        return replace(sample, captions=(shard_caption(caption, where),))
    except DataError as error:
        return BadSample(str(error), "missing caption", sample)


@dataclass
class StreamState:
    """How far the main process has trained: raw batches consumed (empty ones included) and
    each reader's place in each source after its last consumed item."""

    workers: int
    consumed: int = 0
    places: dict[int, dict[int, Place]] = field(default_factory=dict)

    def advance(self, marks: list[StreamMark]) -> None:
        for mark in marks:
            self.places.setdefault(mark.role, {})[mark.source] = mark.place
            self.consumed = max(self.consumed, mark.batch + 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "consumed": self.consumed,
            "places": {role: dict(places) for role, places in self.places.items()},
        }


class StreamingTrainingSet(IterableDataset[tuple[LoadedSample | BadSample, StreamMark]]):
    """This rank's training items from endless streams, batch after batch: the items of the
    rank's batch ``g`` come from one worker, all from the source the schedule gives ``g``."""

    def __init__(
        self,
        streams: list[Stream],
        weights: list[float],
        transform: ImageTransform,
        *,
        batch_size: int,
        nominal_batches: int,
        rank: int,
        world_size: int,
        workers: int,
        seed: int,
        order: str,
        max_image_pixels: int | None,
        bad_samples: Any,
    ) -> None:
        self.streams = streams
        self.weights = weights
        self.transform = transform
        self.batch_size = batch_size
        self.nominal_batches = nominal_batches  # the loop's "epoch": the whole run
        self.rank = rank
        self.world_size = world_size
        self.workers = max(1, workers)
        self.seed = seed
        self.order = order
        self.max_image_pixels = max_image_pixels
        self.bad_samples = bad_samples
        self.state = StreamState(self.workers)  # advanced by the main process
        self.start = StreamState(self.workers)  # where iteration (the workers' copy) begins

    def __len__(self) -> int:
        return self.nominal_batches * self.batch_size

    def load_state(self, saved: dict[str, Any]) -> None:
        if saved["workers"] != self.workers:
            raise UsageError(
                f"a streamed run resumes with the data.num_workers it had "
                f"({saved['workers'] if saved['workers'] > 1 else 0}), processes too"
            )
        places = {
            int(role): {int(source): tuple(place) for source, place in by_source.items()}
            for role, by_source in saved["places"].items()
        }
        self.state = StreamState(self.workers, saved["consumed"], places)  # type: ignore[arg-type]

    def begin(self) -> None:
        """Start the next iteration where the main process has got to."""
        self.start = StreamState(
            self.workers, self.state.consumed, {r: dict(p) for r, p in self.state.places.items()}
        )

    def __iter__(self) -> Iterator[tuple[LoadedSample | BadSample, StreamMark]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # DataLoader hands out batches from workers 0, 1, ... in turn: after a resume worker w
        # makes the run's next batch number consumed + w, which the reader ``role`` made before.
        first = self.start.consumed + worker
        role = first % self.workers
        slot, slots = self.rank * self.workers + role, self.world_size * self.workers
        places = self.start.places.get(role, {})
        readers = [
            stream.records(slot, slots, places.get(stream.index, START)) for stream in self.streams
        ]
        schedule = itertools.islice(
            source_schedule(self.weights, self.order, self.seed), first, None, self.workers
        )
        for batch, source in zip(itertools.count(first, self.workers), schedule, strict=False):
            for _ in range(self.batch_size):
                sample, place = next(readers[source])
                item = sample if isinstance(sample, BadSample) else self._load(sample, source)
                yield item, StreamMark(role, batch, source, place)

    def _load(self, sample: Sample, source: int) -> LoadedSample | BadSample:
        if len(self.streams) > 1:
            sample = replace(sample, source=self.streams[source].name)
        return load_sample(sample, self.transform, self.max_image_pixels)
