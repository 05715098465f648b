"""Several training sources sampled by weight, one source per global batch: BLIP-2's practice
(LAVIS draws, at every step, which dataset's loader gives the batch, by its sampling ratio).

The sources' samples are concatenated into one map-style dataset; :class:`MixtureSampler`
deals each step's global batch from one source, walking each source's own shuffled order
(reshuffled when it runs out). Which source, per step (``data.mixture_order``):

* ``random``: drawn by weight, independently each step, from a generator seeded by the run's
  seed and the epoch: LAVIS's way. Over 200 steps at 3:1 the first source's share has a
  standard deviation of 3 points.
* ``interleaved`` (default): the source furthest behind its weighted share so far (ties to the
  first), so that after every step each share is within one batch of its weight: the same
  proportions with no sampling noise.
 Rank r takes the r-th contiguous part of every global batch, so R ranks train on exactly
the global batches of one process, and ``skip`` resumes mid-epoch at the next sample, as
:class:`~qformer_cli.data.loader.RankSampler` does for one source.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from qformer_cli.errors import UsageError

MIXTURE_ORDERS = ("interleaved", "random")


def interleaved_sources(weights: list[float]) -> Iterator[int]:
    """The source of each step, endlessly: the one furthest behind its weighted share so far
    (ties to the first)."""
    shares = [weight / sum(weights) for weight in weights]
    taken = [0] * len(weights)
    for step in itertools.count(1):
        behind = [share * step - count for share, count in zip(shares, taken, strict=True)]
        source = behind.index(max(behind))
        taken[source] += 1
        yield source


def source_schedule(weights: list[float], order: str, seed: int) -> Iterator[int]:
    """The source of each batch of a streamed run (:mod:`qformer_cli.data.streams`), endlessly:
    ``interleaved`` as in an epoch here, ``random`` drawn by weight from the run's seed."""
    if order == "interleaved":
        return interleaved_sources(weights)
    draw = random.Random(f"mixture:{seed}")
    return (draw.choices(range(len(weights)), weights)[0] for _ in itertools.count())


class MixtureSampler(Sampler[int]):
    def __init__(
        self,
        sizes: list[int],
        weights: list[float],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        order: str = "interleaved",
    ) -> None:
        if len(sizes) != len(weights) or not sizes:
            raise UsageError("a mixture needs one weight per source")
        if any(weight <= 0 for weight in weights) or any(size <= 0 for size in sizes):
            raise UsageError("every mixture source needs samples and a weight > 0")
        if order not in MIXTURE_ORDERS:
            raise UsageError(f"data.mixture_order {order!r}: choose {' or '.join(MIXTURE_ORDERS)}")
        self.order = order
        self.sizes = sizes
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]  # each source's first index
        self.batch_size = batch_size  # one rank's part of a global batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.skip = 0  # indices of this epoch to leave out from the start (mid-epoch resume)

    @property
    def steps_per_epoch(self) -> int:
        """As many global batches as the sources hold samples in all."""
        return sum(self.sizes) // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _source_orders(self, generator: torch.Generator) -> list[Iterator[int]]:
        """Each source's indices (into the concatenation), shuffled, reshuffled on each pass."""

        def endless(source: int) -> Iterator[int]:
            while True:
                order = torch.randperm(self.sizes[source], generator=generator)
                yield from (self.offsets[source] + int(i) for i in order)

        return [endless(source) for source in range(len(self.sizes))]

    def _order(self) -> list[int]:
        """This rank's indices for the epoch: its part of every global batch, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        orders = self._source_orders(generator)
        global_batch = self.batch_size * self.world_size
        start = self.rank * self.batch_size
        indices: list[int] = []
        for source in self._sources(generator):
            batch = [next(orders[source]) for _ in range(global_batch)]
            indices += batch[start : start + self.batch_size]
        return indices

    def _sources(self, generator: torch.Generator) -> list[int]:
        """The source of each step of the epoch."""
        steps = self.steps_per_epoch
        if self.order == "random":
            return torch.multinomial(
                self.weights, steps, replacement=True, generator=generator
            ).tolist()
        return list(itertools.islice(interleaved_sources(self.weights.tolist()), steps))

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.skip :])

    def __len__(self) -> int:
        return self.steps_per_epoch * self.batch_size
