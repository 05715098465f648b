"""Batching, multi-worker loading and per-rank sharding."""

from __future__ import annotations

import pytest
import torch

from qformer_cli.data import (
    RankSampler,
    SampleDataset,
    build_transform,
    load_transform_config,
    make_dataloader,
    read_vqa,
    sample_backbone_dir,
    sample_split_files,
)


@pytest.fixture(scope="module")
def val_questions() -> list:
    files = sample_split_files("val")
    return read_vqa(files.vqa_questions, files.vqa_annotations, files.image_dir)[:40]


def eval_dataset(samples: list) -> SampleDataset:
    config = load_transform_config(sample_backbone_dir("vision"))
    return SampleDataset(samples, build_transform(config, train=False))


def test_rank_sampler_equal_shards_cover_everything() -> None:
    shards = [list(RankSampler(10, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]  # padded by wrapping around
    assert [len(RankSampler(10, rank=r, world_size=3)) for r in range(3)] == [4, 4, 4]


def test_rank_sampler_exact_shards_for_evaluation() -> None:
    samplers = [RankSampler(10, rank=r, world_size=3, equal_shards=False) for r in range(3)]
    shards = [list(s) for s in samplers]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(s) for s in samplers] == [4, 3, 3]


def test_rank_sampler_shuffles_per_epoch_consistently_across_ranks() -> None:
    samplers = [RankSampler(12, rank=r, world_size=2, shuffle=True, seed=5) for r in range(2)]
    epoch0 = [list(s) for s in samplers]
    assert sorted(epoch0[0] + epoch0[1]) == list(range(12))
    for sampler in samplers:
        sampler.set_epoch(1)
    epoch1 = [list(s) for s in samplers]
    assert sorted(epoch1[0] + epoch1[1]) == list(range(12))
    assert epoch0 != epoch1
    again = RankSampler(12, rank=0, world_size=2, shuffle=True, seed=5)
    assert list(again) == epoch0[0]


def test_training_ranks_get_their_part_of_each_global_batch(val_questions: list) -> None:
    """Training loaders (shuffled, drop_last) on 2 ranks x 3 deal one process's batches of 6,
    in order, rank r the r-th part (the order the losses gather them in); the incomplete last
    global batch (2 of 14 samples) is dropped, as one process drops it."""
    dataset = eval_dataset(val_questions[:14])

    def batches(rank: int, world_size: int) -> list[list]:
        loader = make_dataloader(
            dataset, batch_size=6 // world_size, shuffle=True, seed=3, drop_last=True,
            rank=rank, world_size=world_size,
        )  # fmt: skip
        loader.set_epoch(1)
        return [batch.question_ids for batch in loader]

    one_process = batches(0, 1)
    rank0, rank1 = batches(0, 2), batches(1, 2)
    assert len(one_process) == len(rank0) == len(rank1) == 2
    assert [a + b for a, b in zip(rank0, rank1, strict=True)] == one_process


def test_rank_sampler_rejects_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        RankSampler(4, rank=2, world_size=2)


def test_batches_carry_images_and_text(val_questions: list) -> None:
    loader = make_dataloader(eval_dataset(val_questions), batch_size=16)
    batches = list(loader)
    assert [len(b) for b in batches] == [16, 16, 8] and len(loader) == 3
    first = batches[0]
    assert first.images.shape == (16, 3, 64, 64)
    assert first.question_ids == [s.question_id for s in val_questions[:16]]
    assert first.questions[0] == val_questions[0].question
    assert first.answers[0] == val_questions[0].answers
    assert first.image_ids[0] == val_questions[0].image_id and first.skipped == []


def test_workers_load_the_same_batches(val_questions: list) -> None:
    dataset = eval_dataset(val_questions)
    single = list(make_dataloader(dataset, batch_size=8))
    parallel = list(make_dataloader(dataset, batch_size=8, num_workers=2))
    assert [b.question_ids for b in single] == [b.question_ids for b in parallel]
    assert all(torch.equal(a.images, b.images) for a, b in zip(single, parallel, strict=True))


def test_ranks_see_disjoint_shards(val_questions: list) -> None:
    dataset = eval_dataset(val_questions[:30])
    seen = []
    for rank in range(4):
        loader = make_dataloader(dataset, batch_size=4, rank=rank, world_size=4)
        seen.append([q for batch in loader for q in batch.question_ids])
    assert sorted(q for shard in seen for q in shard) == sorted(
        s.question_id for s in val_questions[:30]
    )
    assert [len(s) for s in seen] == [8, 8, 7, 7]


def test_training_loader_shuffles_and_augments_reproducibly(val_questions: list) -> None:
    config = load_transform_config(sample_backbone_dir("vision"))
    dataset = SampleDataset(val_questions, build_transform(config, train=True))

    def first_batch(epoch: int) -> tuple[list, torch.Tensor]:
        loader = make_dataloader(dataset, batch_size=8, shuffle=True, num_workers=2, seed=1)
        loader.set_epoch(epoch)
        batch = next(iter(loader))
        return batch.question_ids, batch.images

    ids0, pixels0 = first_batch(0)
    ids0_again, pixels0_again = first_batch(0)
    ids1, _ = first_batch(1)
    assert ids0 == ids0_again and torch.equal(pixels0, pixels0_again)
    assert ids0 != ids1
