"""The stage-1 objectives (ITC, ITM, ITG), each a small function, and the rank-aware gathers.

With one process nothing is gathered. With several, each rank scores its own rows against the
features of the whole global batch, and one step on R ranks x B/R samples equals one step on B
samples in one process. DDP averages the per-rank gradients, so each rank's loss is its share of
the global loss times R: ITC and ITM are means over a rank's own (equally many) rows; ITG, a mean
over caption tokens that ranks hold unequally many of, divides its token sum by the global token
count over R (:func:`itg_loss`'s ``tokens_per_loss``). Token ids and masks of different widths are
gathered at the global longest width (:func:`common_width`, :func:`pad_width`).

How ITC's gradient reaches the features is a named choice (``ItcGradient``):

* ``lavis`` -- as LAVIS 1.0.2's ``Blip2Qformer``: the other side of each similarity row is a
  constant (LAVIS gathers it with ``concat_all_gather``, a no-grad all-gather it uses with one
  process too), so image features get ITC gradient only from the image->text rows and text
  features only from the text->image rows;
* ``full`` -- gradient through both sides (the gathered side through the autograd-aware
  collective, which sends it back to the rank that produced it), as open_clip does: about twice
  LAVIS's ITC gradient on the shared Q-Former.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from qformer_cli.models.blip2 import Stage1Model
from qformer_cli.runtime import Ranks

NegativeMining = Literal["sample", "hardest"]
ItcGradient = Literal["lavis", "full"]
# How ITM's candidate negatives are weighted: ``lavis`` = softmax(similarity) + 1e-4, only the
# positive excluded (LAVIS 1.0.2); ``distinct`` = softmax(similarity), every sample of the same
# image or with the word-for-word same caption excluded.
ItmNegatives = Literal["lavis", "distinct"]

LABEL_SMOOTHING = 0.1
TEMPERATURE_RANGE = (0.001, 0.5)  # BLIP's bounds; LAVIS BLIP-2 leaves temp unclamped
LAVIS_WEIGHT_FLOOR = 1e-4  # LAVIS adds it to every softmax weight: any non-positive may be drawn


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for each slice.

    torch's own autograd all_gather (torch.distributed.nn) mishandles non-contiguous gradients
    on gloo, which the einsum backward of ITC produces; collectives want contiguous storage.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.rank, ctx.world_size = rank, world_size
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss used every slice
        size = grad.shape[0] // ctx.world_size
        return grad[ctx.rank * size : (ctx.rank + 1) * size], None, None


def gather_with_grad(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated on dim 0; gradients flow back to every rank."""
    if ranks.world_size == 1:
        return tensor
    return _GatherWithGrad.apply(tensor, ranks.rank, ranks.world_size)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated on dim 0, as constants (ids, masks, frozen features)."""
    if ranks.world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ranks.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def global_sum(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """``value`` summed over all ranks (a copy; the value itself with one process)."""
    if ranks.world_size == 1:
        return value
    total = value.clone()
    dist.all_reduce(total)
    return total


@torch.no_grad()
def common_width(width: int, ranks: Ranks, device: torch.device) -> int:
    """The largest ``width`` of any rank (each rank pads its captions to its own longest)."""
    if ranks.world_size == 1:
        return width
    widest = torch.tensor([width], device=device)
    dist.all_reduce(widest, op=dist.ReduceOp.MAX)
    return int(widest.item())


def pad_width(tensor: torch.Tensor, width: int, value: int = 0) -> torch.Tensor:
    """(B, T) -> (B, width), ``value`` appended on the right (padding: masked, never read)."""
    return F.pad(tensor, (0, width - tensor.shape[1]), value=value)


@dataclass
class ItcOutput:
    loss: torch.Tensor
    sim_i2t: torch.Tensor  # (B, G): local images vs all texts, / temp
    sim_t2i: torch.Tensor  # (B, G): local texts vs all images, / temp


def itc_loss(
    image_feats: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor,
    ranks: Ranks,
    *,
    gradient: ItcGradient = "full",
    temperature_clamp: tuple[float, float] | None = TEMPERATURE_RANGE,
) -> ItcOutput:
    """Image-text contrastive loss.

    ``image_feats`` (B, Q, D) and ``text_feat`` (B, D) are L2-normalized. The similarity of an
    image and a text is the max over the Q query embeddings of their dot products, divided by the
    learnable temperature (clamped to ``temperature_clamp`` unless None); cross-entropy both ways
    with label smoothing 0.1. Targets are this rank's slice of the global batch,
    ``rank * B + arange(B)``. ``gradient`` says which side of a similarity gets its gradient
    (module docstring).
    """
    batch = image_feats.shape[0]
    if temperature_clamp is not None:
        temp = temp.clamp(*temperature_clamp)
    if gradient == "lavis":
        # Every rank's slice a constant, this rank's own included (LAVIS's all-gather copies it)
        all_image_feats = gather_no_grad(image_feats.detach(), ranks)  # (G, Q, D)
        all_text_feat = gather_no_grad(text_feat.detach(), ranks)  # (G, D)
    else:
        all_image_feats = gather_with_grad(image_feats, ranks)  # (G, Q, D)
        all_text_feat = gather_with_grad(text_feat, ranks)  # (G, D)
    sim_i2t = Stage1Model.similarity(image_feats, all_text_feat) / temp  # (B, G)
    sim_t2i = Stage1Model.similarity(all_image_feats, text_feat, rows="texts") / temp  # (B, G)
    targets = torch.arange(batch, device=image_feats.device) + ranks.rank * batch
    loss = (
        F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
        + F.cross_entropy(sim_t2i, targets, label_smoothing=LABEL_SMOOTHING)
    ) / 2
    return ItcOutput(loss, sim_i2t, sim_t2i)


@torch.no_grad()
def negative_weights(
    similarity: torch.Tensor,
    positive_index: torch.Tensor,
    negatives: ItmNegatives,
    *,
    image_ids: torch.Tensor | None = None,
    all_image_ids: torch.Tensor | None = None,
    text_ids: torch.Tensor | None = None,
    all_text_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, G) unnormalized weights over the global batch from which each row's negative is drawn.

    ``similarity`` (B, G) scores this rank's samples against the global batch; ``positive_index``
    (B,) is each row's own global index.

    * ``lavis``: softmax(similarity) + 1e-4 with only the positive set to 0, as LAVIS 1.0.2
      (``weights_t2i`` / ``weights_i2t`` in ``Blip2Qformer.forward``); image and caption ids are
      not used, so another sample of the same image, or one captioned word for word alike, can be
      drawn as a "negative".
    * ``distinct``: softmax(similarity) with every sample of the same image (``image_ids`` (B,)
      vs ``all_image_ids`` (G,)), the positive included, set to 0 and, when ``text_ids`` (B,) /
      ``all_text_ids`` (G,) are given, every sample whose caption is the same text. A row with no
      candidate left (the batch shows one image only) falls back to any other sample.
    """
    if similarity.shape[1] < 2:
        raise ValueError("ITM needs at least 2 samples in the (global) batch")
    rows = torch.arange(similarity.shape[0], device=similarity.device)
    probabilities = F.softmax(similarity.float(), dim=1)
    if negatives == "lavis":
        weights = probabilities + LAVIS_WEIGHT_FLOOR
        weights[rows, positive_index] = 0.0
        return weights
    if image_ids is None or all_image_ids is None:
        raise ValueError("distinct negatives need the image ids")
    not_negative = image_ids[:, None] == all_image_ids[None, :]  # (B, G), includes the positive
    if text_ids is not None and all_text_ids is not None:
        not_negative |= text_ids[:, None] == all_text_ids[None, :]
    weights = probabilities.masked_fill(not_negative, 0.0)
    fallback = torch.ones_like(weights)
    fallback[rows, positive_index] = 0.0
    return torch.where((weights.sum(dim=1) > 0)[:, None], weights, fallback)


@torch.no_grad()
def mine_hard_negatives(
    similarity: torch.Tensor,
    image_ids: torch.Tensor,
    all_image_ids: torch.Tensor,
    positive_index: torch.Tensor,
    mining: NegativeMining,
    uniforms: torch.Tensor | None = None,
    text_ids: torch.Tensor | None = None,
    all_text_ids: torch.Tensor | None = None,
    negatives: ItmNegatives = "distinct",
    uniform_share: torch.Tensor | None = None,
) -> torch.Tensor:
    """For each local row, the global index of one negative (B,).

    Candidates are weighted by :func:`negative_weights` (``negatives`` names how), mixed with
    the uniform distribution over the same candidates when ``uniform_share`` (a 0-dim tensor
    in [0, 1]) is given. ``sample`` draws with probability proportional to the weights (BLIP-2),
    one of ``uniforms`` (B,) per row (:func:`draw_by_inverse_cdf`); ``hardest`` takes the most
    heavily weighted candidate (deterministic, for tests).
    """
    weights = negative_weights(
        similarity,
        positive_index,
        negatives,
        image_ids=image_ids,
        all_image_ids=all_image_ids,
        text_ids=text_ids,
        all_text_ids=all_text_ids,
    )
    if uniform_share is not None:
        candidates = (weights > 0).to(weights.dtype)  # (B, G)
        uniform = candidates / candidates.sum(dim=1, keepdim=True)
        share = uniform_share.to(weights.dtype)
        weights = (1 - share) * weights / weights.sum(dim=1, keepdim=True) + share * uniform
    if mining == "hardest":
        return weights.argmax(dim=1)
    if uniforms is None:
        uniforms = torch.rand(weights.shape[0], dtype=torch.float64, device=weights.device)
    return draw_by_inverse_cdf(weights, uniforms)


@torch.no_grad()
def draw_by_inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """For each row of ``weights`` (B, G) (non-negative, each row some positive), the column
    whose cumulative weight interval holds ``uniforms`` (B,) in [0, 1) times the row's total.

    Unlike ``torch.multinomial``, the pick is a plain function of the weights and the uniform:
    when the caller draws the uniforms for the global batch from one seeded stream, every world
    size picks the same negatives, and weights that differ by float rounding (1e-7) change a
    pick only when a uniform falls within that distance of a boundary.
    """
    cumulative = weights.double().cumsum(dim=1)  # (B, G)
    targets = uniforms.double() * cumulative[:, -1]  # (B,) strictly inside the row's total
    picked = torch.searchsorted(cumulative, targets[:, None], right=True).squeeze(1)
    # right=True skips zero-weight columns (flat CDF); rounding at the very top can run past the
    # end, where the last column of positive weight is the right pick.
    columns = torch.arange(weights.shape[1], device=weights.device)
    last_positive = torch.where(weights > 0, columns, -1).amax(dim=1)
    return torch.minimum(picked, last_positive)


def itm_loss(itm_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on (3B, 2) logits of the pairs [positive; image-negative; text-negative]."""
    batch = itm_logits.shape[0] // 3
    labels = torch.cat(
        [
            torch.ones(batch, dtype=torch.long, device=itm_logits.device),
            torch.zeros(2 * batch, dtype=torch.long, device=itm_logits.device),
        ]
    )
    return F.cross_entropy(itm_logits, labels)


def itg_targets(text_mask: torch.Tensor) -> torch.Tensor:
    """The number of ITG target tokens in a batch: every real token after the first (0-dim)."""
    return (text_mask[:, 1:] != 0).sum()


def itg_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    text_mask: torch.Tensor,
    tokens_per_loss: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy with label smoothing 0.1 over the real (non-padding) tokens.

    ``logits`` (B, T, V) are predictions at every text position; position t predicts token t+1.
    The sum of the token losses is divided by ``tokens_per_loss``; by default this batch's
    target count (the token mean). When this loss is one of K losses that are averaged (DDP's
    gradient averaging over R ranks, the trainer's mean over J micro-batches: K = R * J), pass
    the target count of all K batches over K: the average of the K losses is then the token mean
    of the whole step, whichever batch holds how many tokens.
    """
    labels = input_ids.masked_fill(text_mask == 0, -100)[:, 1:]  # (B, T-1)
    shifted = logits[:, :-1].float()
    token_sum = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        label_smoothing=LABEL_SMOOTHING,
        reduction="sum",
    )
    if tokens_per_loss is None:
        tokens_per_loss = itg_targets(text_mask)
    return token_sum / tokens_per_loss
