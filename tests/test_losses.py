"""Stage-1 objectives against hand-written references, and reuse == recompute."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from qformer_cli.config import Stage1Config
from qformer_cli.losses import (
    draw_by_inverse_cdf,
    itc_loss,
    itg_loss,
    itg_targets,
    itm_loss,
    mine_hard_negatives,
    negative_weights,
)
from qformer_cli.models.blip2 import Stage1Model
from qformer_cli.models.config import qformer_preset
from qformer_cli.runtime import Ranks
from qformer_cli.train.stage1 import (
    GivenNegatives,
    ListedNegatives,
    Stage1Batch,
    Stage1Objective,
)


def _smoothed_ce(logits: list[float], target: int, eps: float = 0.1) -> float:
    """Label-smoothed cross-entropy of one row, written out: (1-eps)*nll + eps*mean(-log p)."""
    log_z = math.log(sum(math.exp(v) for v in logits))
    log_p = [v - log_z for v in logits]
    return (1 - eps) * -log_p[target] + eps * -sum(log_p) / len(log_p)


def test_itc_matches_a_loop_reference():
    image_feats = F.normalize(torch.randn(3, 4, 8), dim=-1)
    text_feat = F.normalize(torch.randn(3, 8), dim=-1)
    temp = torch.tensor(0.07)
    out = itc_loss(image_feats, text_feat, temp, Ranks())

    def sim(i: int, t: int) -> float:
        return max(float(image_feats[i, q] @ text_feat[t]) for q in range(4)) / 0.07

    i2t = sum(_smoothed_ce([sim(i, t) for t in range(3)], i) for i in range(3)) / 3
    t2i = sum(_smoothed_ce([sim(i, t) for i in range(3)], t) for t in range(3)) / 3
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    assert out.sim_i2t[1, 2].item() == pytest.approx(sim(1, 2), rel=1e-5)
    assert out.sim_t2i[1, 2].item() == pytest.approx(sim(2, 1), rel=1e-5)


def test_temperature_is_clamped_to_blips_range():
    feats = F.normalize(torch.randn(2, 1, 4), dim=-1)
    text = F.normalize(torch.randn(2, 4), dim=-1)
    low = itc_loss(feats, text, torch.tensor(1e-6), Ranks())
    floor = itc_loss(feats, text, torch.tensor(0.001), Ranks())
    assert torch.allclose(low.sim_i2t, floor.sim_i2t)


def test_an_unclamped_temperature_is_used_as_it_is():
    feats = F.normalize(torch.randn(2, 1, 4), dim=-1)
    text = F.normalize(torch.randn(2, 4), dim=-1)
    temp = torch.tensor(0.9, requires_grad=True)
    out = itc_loss(feats, text, temp, Ranks(), temperature_clamp=None)
    torch.testing.assert_close(out.sim_i2t * 0.9, torch.einsum("bqd,gd->bgq", feats, text)[..., 0])
    out.loss.backward()
    assert temp.grad != 0  # clamped to 0.5 it would get none


def _itc_gradients(gradient: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    image_feats = F.normalize(torch.randn(4, 3, 8, generator=generator), dim=-1).requires_grad_()
    text_feat = F.normalize(torch.randn(4, 8, generator=generator), dim=-1).requires_grad_()
    itc_loss(image_feats, text_feat, torch.tensor(0.07), Ranks(), gradient=gradient).loss.backward()
    return image_feats.grad, text_feat.grad


def test_lavis_itc_gradient_reaches_each_side_only_from_its_own_rows():
    """LAVIS: image features learn from the image->text rows alone, texts from text->image."""
    generator = torch.Generator().manual_seed(5)
    image_feats = F.normalize(torch.randn(4, 3, 8, generator=generator), dim=-1).requires_grad_()
    text_feat = F.normalize(torch.randn(4, 8, generator=generator), dim=-1).requires_grad_()
    targets = torch.arange(4)
    sim = torch.einsum("bqd,gd->bgq", image_feats, text_feat).amax(dim=-1) / 0.07  # (image, text)
    i2t = F.cross_entropy(sim, targets, label_smoothing=0.1) / 2
    t2i = F.cross_entropy(sim.T, targets, label_smoothing=0.1) / 2
    (image_from_i2t,) = torch.autograd.grad(i2t, image_feats, retain_graph=True)
    (text_from_t2i,) = torch.autograd.grad(t2i, text_feat)

    image_grad, text_grad = _itc_gradients("lavis")
    torch.testing.assert_close(image_grad, image_from_i2t)
    torch.testing.assert_close(text_grad, text_from_t2i)
    full_image_grad, _ = _itc_gradients("full")
    assert not torch.allclose(full_image_grad, image_grad, atol=1e-3)


def test_lavis_negative_weights_exclude_the_positive_only():
    similarity = torch.tensor([[4.0, 3.0, 1.0, 2.0], [2.0, 5.0, 0.0, 1.0]])
    positives = torch.tensor([0, 1])
    weights = negative_weights(similarity, positives, "lavis")
    expected = F.softmax(similarity, dim=1) + 1e-4
    expected[0, 0] = expected[1, 1] = 0.0
    torch.testing.assert_close(weights, expected)
    # Sample 1 shows row 0's image and sample 2 has row 0's caption: LAVIS may draw them, the
    # distinct mode leaves row 0 sample 3 alone.
    all_image_ids, all_text_ids = torch.tensor([7, 7, 8, 9]), torch.tensor([1, 2, 1, 3])
    distinct = negative_weights(
        similarity,
        positives,
        "distinct",
        image_ids=all_image_ids[:2],
        all_image_ids=all_image_ids,
        text_ids=all_text_ids[:2],
        all_text_ids=all_text_ids,
    )
    assert distinct[0].tolist() == [0.0, 0.0, 0.0, F.softmax(similarity[0], dim=0)[3].item()]
    assert weights[0, 1] > 0.1 and weights[0, 2] > 0.01


@pytest.mark.parametrize("head_init", ["lavis", "normal"])
def test_head_init(head_init: str):
    config = qformer_preset("tiny", vocab_size=40, num_layers=1)
    torch.manual_seed(0)
    model = Stage1Model(config, head_init=head_init)
    bound = 1 / math.sqrt(config.hidden_size)  # torch's nn.Linear default: U(-bound, bound)
    for head in (model.vision_proj, model.text_proj, model.itm_head):
        if head_init == "lavis":
            assert head.weight.abs().max() <= bound and head.bias.abs().max() <= bound
            assert head.weight.std().item() > 2 * config.initializer_range  # not normal(0, 0.02)
            assert head.bias.abs().max() > 0
        else:
            assert head.weight.std().item() == pytest.approx(config.initializer_range, rel=0.2)
            assert torch.all(head.bias == 0)
    # the LM head's transform is BERT's in both (loaded from the BERT checkpoint)
    assert torch.all(model.lm_head.dense.bias == 0)


def test_hardest_negative_skips_positives_and_same_image():
    similarity = torch.tensor(
        [
            [9.0, 8.0, 1.0, 2.0],  # sample 1 shows the same image as sample 0 -> take 3
            [8.0, 9.0, 5.0, 1.0],
            [0.0, 3.0, 9.0, 4.0],
        ]
    )
    image_ids = torch.tensor([7, 7, 5])
    all_ids = torch.tensor([7, 7, 5, 6])
    picked = mine_hard_negatives(similarity, image_ids, all_ids, torch.tensor([0, 1, 2]), "hardest")
    assert picked.tolist() == [3, 2, 3]


def test_sampled_negatives_never_pick_the_same_image():
    generator = torch.Generator().manual_seed(0)
    similarity = torch.randn(4, 4) * 5
    ids = torch.tensor([1, 1, 2, 3])
    for _ in range(50):
        uniforms = torch.rand(4, generator=generator, dtype=torch.float64)
        picked = mine_hard_negatives(similarity, ids, ids, torch.arange(4), "sample", uniforms)
        assert all(ids[p] != ids[i] for i, p in enumerate(picked.tolist()))


def test_inverse_cdf_draw_picks_the_interval_holding_the_uniform():
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0], [2.0, 0.0, 2.0, 0.0]])
    # Row 0: CDF 0, 1, 1, 4 (x total 4: intervals [0, .25) -> 1, [.25, 1) -> 3).
    # Row 1: intervals [0, .5) -> 0, [.5, 1) -> 2; zero-weight columns are never picked.
    cases = {(0.0, 0.0): [1, 0], (0.2499, 0.4999): [1, 0], (0.25, 0.5): [3, 2]}
    for (u0, u1), expected in cases.items():
        uniforms = torch.tensor([u0, u1], dtype=torch.float64)
        assert draw_by_inverse_cdf(weights, uniforms).tolist() == expected
    top = torch.tensor([1 - 2**-53, 1 - 2**-53], dtype=torch.float64)
    assert draw_by_inverse_cdf(weights, top).tolist() == [3, 2]


def test_inverse_cdf_draw_follows_the_weights():
    """Against torch.multinomial's distribution: frequencies of 20000 draws within 0.01."""
    weights = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(20000, 4)
    uniforms = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = torch.bincount(draw_by_inverse_cdf(weights, uniforms), minlength=4) / 20000
    assert torch.allclose(counts, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.01)


def _negative_frequencies(share: float, negatives: str = "lavis") -> torch.Tensor:
    """(G,) how often each sample is drawn as row 0's negative over 20000 draws."""
    similarity = torch.tensor([[9.0, 5.0, 0.0, 0.0]]).expand(20000, 4)  # row 0 of 4 samples
    ids = torch.arange(4)
    uniforms = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    picked = mine_hard_negatives(
        similarity,
        ids[:1].expand(20000),
        ids,
        torch.zeros(20000, dtype=torch.long),
        "sample",
        uniforms,
        negatives=negatives,
        uniform_share=torch.tensor(share),
    )
    return torch.bincount(picked, minlength=4) / 20000


def test_a_uniform_share_of_negatives_mixes_in_every_candidate_alike():
    """Share s: (1 - s) * softmax-weights + s * uniform over the candidates (the positive,
    column 0, never); against the distribution written out here."""
    hard = F.softmax(torch.tensor([9.0, 5.0, 0.0, 0.0]), dim=0)[1:]
    for share in (0.0, 0.5, 1.0):
        expected = (1 - share) * hard / hard.sum() + share / 3
        counts = _negative_frequencies(share, "distinct")
        assert counts[0] == 0
        assert torch.allclose(counts[1:], expected, atol=0.01), (share, counts)


def test_the_uniform_share_falls_linearly_over_the_warmup_steps():
    model = Stage1Model(qformer_preset("tiny", vocab_size=40, num_layers=2))
    settings = Stage1Config(itm_negative_warmup=100).resolved("tiny")
    objective = Stage1Objective(model, dec_token_id=39, settings=settings)
    shares = []
    for step in (0, 25, 50, 100, 400):
        objective.start_step(step)
        shares.append(round(objective.uniform_share.item(), 6))
    assert shares == [1.0, 0.75, 0.5, 0.0, 0.0]


def test_a_batch_of_one_image_falls_back_to_other_samples():
    ids = torch.tensor([4, 4, 4])
    picked = mine_hard_negatives(torch.randn(3, 3), ids, ids, torch.arange(3), "hardest")
    assert all(p != i for i, p in enumerate(picked.tolist()))


def test_itm_labels_are_positive_then_two_negatives():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [2.0, 2.0], [1.0, -1.0]])
    expected = (
        sum(
            -F.log_softmax(logits[i], dim=0)[label].item()
            for i, label in enumerate([1, 1, 0, 0, 0, 0])
        )
        / 6
    )
    assert itm_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_itg_predicts_the_next_real_token():
    logits = torch.randn(2, 4, 10)
    ids = torch.tensor([[1, 5, 6, 0], [1, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    pairs = [(0, 0, 5), (0, 1, 6), (1, 0, 7), (1, 1, 8), (1, 2, 9)]  # (row, position, next token)
    expected = sum(_smoothed_ce(logits[b, t].tolist(), y) for b, t, y in pairs) / len(pairs)
    assert itg_loss(logits, ids, mask).item() == pytest.approx(expected, rel=1e-5)


def test_itg_shares_of_unequal_batches_average_to_the_whole_token_mean():
    """Batches of 7 and 2 target tokens: with tokens_per_loss = 9 / 2 the mean of their two
    losses (what DDP's averaging over 2 ranks sees) is the token mean of all 9 tokens, where
    the mean of the two per-batch token means is not."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator, requires_grad=True)
    ids = torch.randint(1, 11, (3, 5), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    whole = itg_loss(logits, ids, mask)
    (whole_grad,) = torch.autograd.grad(whole, logits)
    parts = [slice(0, 2), slice(2, 3)]  # 4 + 3 = 7 targets, then 2
    tokens_per_loss = itg_targets(mask) / 2
    shares = [itg_loss(logits[p], ids[p], mask[p], tokens_per_loss) for p in parts]
    (shares_grad,) = torch.autograd.grad(sum(shares) / 2, logits)
    assert (sum(shares) / 2).item() == pytest.approx(whole.item(), rel=1e-6)
    assert torch.allclose(shares_grad, whole_grad, atol=1e-7)
    per_batch_means = sum(itg_loss(logits[p], ids[p], mask[p]) for p in parts) / 2
    assert per_batch_means.item() != pytest.approx(whole.item(), rel=1e-3)


def _objective(reuse: bool) -> Stage1Objective:
    config = qformer_preset("tiny", vocab_size=60, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(3)
    return Stage1Objective(Stage1Model(config), dec_token_id=59, mining="hardest", reuse=reuse)


def _batch() -> Stage1Batch:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 59, (4, 9), generator=generator)
    ids[:, 0] = 1  # [CLS]
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return Stage1Batch(
        image_embeds=torch.randn(4, 17, 128, generator=generator),
        input_ids=ids,
        text_mask=mask,
        image_ids=torch.tensor([0, 1, 1, 2]),
    )


def test_reuse_gives_the_same_losses_and_gradients_as_recomputing():
    reused, recomputed = _objective(reuse=True), _objective(reuse=False)
    batch = _batch()
    losses_a, losses_b = reused(batch), recomputed(batch)
    for name in ("itc", "itm", "itg"):
        assert getattr(losses_a, name).item() == pytest.approx(
            getattr(losses_b, name).item(), rel=1e-5
        )
    losses_a.total.backward()
    losses_b.total.backward()
    for (name, a), b in zip(reused.named_parameters(), recomputed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_the_stage1_gradient_is_the_same_bitwise_on_every_run_with_several_threads():
    """The demo's shapes (tiny Q-Former, batch 32, 65 image tokens), two threads, no
    ``train.deterministic``: repeating one step's backward must give the same gradients bit for
    bit, or stage 1 is not repeatable. The ITM pairs' image K/V were picked by advanced
    indexing, whose CPU backward adds with atomics across threads: the first repeat differed."""
    objective = _objective(reuse=True)
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(2, 59, (32, 12), generator=generator)
    ids[:, 0] = 1  # [CLS]
    batch = Stage1Batch(
        image_embeds=torch.randn(32, 65, 128, generator=generator),
        input_ids=ids,
        text_mask=torch.ones_like(ids),
        image_ids=torch.arange(32),
    )

    def gradients() -> list[torch.Tensor]:
        objective.zero_grad(set_to_none=True)
        objective(batch).total.backward()
        return [p.grad.clone() for p in objective.parameters() if p.grad is not None]

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = gradients()
        for _ in range(5):
            again = gradients()
            assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    finally:
        torch.set_num_threads(threads)


def test_itm_weight_scales_the_itm_loss_in_the_total_only():
    plain = _objective(reuse=True)(_batch())
    weighted_objective = _objective(reuse=True)
    weighted_objective.settings = replace(weighted_objective.settings, itm_weight=3.0)
    weighted = weighted_objective(_batch())
    for name in ("itc", "itm", "itg"):
        assert getattr(weighted, name).item() == pytest.approx(getattr(plain, name).item())
    expected = plain.itc + 3.0 * plain.itm + plain.itg
    assert weighted.total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_listed_negative_replaces_the_drawn_negative_text_of_its_row():
    """stage1.itm_hard_negatives: rows 0 and 2 list a negative (wider than the batch's captions)
    and it is their image's ITM negative text; rows 1 and 3 keep the drawn one. Reference: the
    ITM head run pair by pair, each text cut to its own length (no padding at all)."""
    objective = _objective(reuse=True)
    generator = torch.Generator().manual_seed(5)
    listed_ids = torch.randint(2, 59, (4, 12), generator=generator)
    listed_ids[:, 0] = 1
    listed_mask = torch.ones_like(listed_ids)
    listed_mask[2, 10:] = 0
    listed = torch.tensor([True, False, True, False])
    drawn = GivenNegatives(image=torch.tensor([1, 3, 0, 2]), text=torch.tensor([2, 0, 3, 1]))
    batch = replace(
        _batch(),
        given_negatives=drawn,
        listed_negatives=ListedNegatives(listed, listed_ids, listed_mask),
    )
    model = objective.model
    with torch.no_grad():  # a sharp head, so that the loss tells the pairs' texts apart
        model.itm_head.weight.mul_(50.0)

    def itm_of(image: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = int(mask.sum())
        image_kv = model.qformer.encode_image(batch.image_embeds[image : image + 1])
        return model.itm_logits(image_kv, ids[None, :length], mask[None, :length])

    ids, mask = batch.input_ids, batch.text_mask
    with torch.no_grad():
        positives = [itm_of(i, ids[i], mask[i]) for i in range(4)]
        negative_images = [itm_of(int(drawn.image[i]), ids[i], mask[i]) for i in range(4)]
        negative_texts = [
            itm_of(i, listed_ids[i], listed_mask[i])
            if listed[i]
            else itm_of(i, ids[drawn.text[i]], mask[drawn.text[i]])
            for i in range(4)
        ]
        expected = itm_loss(torch.cat(positives + negative_images + negative_texts))
        got = objective(batch).itm
        drawn_only = objective(replace(batch, listed_negatives=None)).itm
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(drawn_only.item() - expected.item()) > 1e-3  # 2 of the 12 pairs differ


def test_every_trainable_parameter_gets_a_gradient():
    objective = _objective(reuse=True)
    objective(_batch()).total.backward()
    no_grad = [n for n, p in objective.named_parameters() if p.grad is None]
    assert no_grad == []


def test_a_word_for_word_identical_caption_is_not_a_negative():
    # Row 0's hardest other image is sample 1, but sample 1's caption is the same text
    # ("a red circle" twice): the next hardest, sample 3, is taken instead.
    similarity = torch.tensor(
        [
            [9.0, 8.0, 1.0, 2.0],
            [8.0, 9.0, 5.0, 1.0],
            [0.0, 3.0, 9.0, 4.0],
        ]
    )
    image_ids = torch.tensor([10, 11, 12])
    all_image_ids = torch.tensor([10, 11, 12, 13])
    text_ids = torch.tensor([100, 100, 102])
    all_text_ids = torch.tensor([100, 100, 102, 103])
    picked = mine_hard_negatives(
        similarity,
        image_ids,
        all_image_ids,
        torch.tensor([0, 1, 2]),
        "hardest",
        text_ids=text_ids,
        all_text_ids=all_text_ids,
    )
    assert picked.tolist() == [3, 2, 3]
    without_text_ids = mine_hard_negatives(
        similarity, image_ids, all_image_ids, torch.tensor([0, 1, 2]), "hardest"
    )
    assert without_text_ids.tolist() == [1, 0, 3]


def test_caption_ids_are_equal_exactly_for_equal_texts():
    from qformer_cli.train.stage1 import caption_ids

    ids = caption_ids(["a red circle", "a red circle", "a red circle ", "A red circle"], "cpu")
    assert ids.dtype == torch.int64
    assert ids[0] == ids[1]
    assert len(set(ids.tolist())) == 3
