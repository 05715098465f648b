"""The models' own configuration: the Q-Former's sizes, its named presets, and how a frozen
backbone is named. The run configuration (:mod:`qformer_cli.config`) nests these; the models
read nothing else from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qformer_cli.errors import UsageError


@dataclass(frozen=True)
class QFormerConfig:
    """Every size of the Querying Transformer (defaults: the paper's BERT-base Q-Former).

    Frozen: a preset's sizes are fitted to the backbones by :meth:`fitted_to_backbones`, which
    returns a new config validated again, never by changing fields of a validated one.
    """

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_query_tokens: int = 32
    encoder_width: int = 1408  # width of the frozen image features (EVA ViT-g: 1408)
    cross_attention_freq: int = 2  # cross-attention in layers where idx % freq == 0
    vocab_size: int = 30523  # bert-base-uncased 30522 + [DEC]
    max_position_embeddings: int = 512
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    vision_layer_norm_eps: float = 1e-5  # ln_vision (LAVIS: torch LayerNorm default)
    embed_dim: int = 256  # ITC projection width
    pad_token_id: int = 0
    initializer_range: float = 0.02
    # The freshly initialized cross-attention layers (BERT has none to copy). 0.02 is BERT's
    # choice for width 768; see the tiny preset for why a narrow Q-Former needs more.
    cross_attention_initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise UsageError(
                f"model.qformer: hidden_size {self.hidden_size} is not a multiple of "
                f"num_heads {self.num_heads}"
            )
        if self.cross_attention_freq < 1:
            raise UsageError("model.qformer.cross_attention_freq must be >= 1")
        for name in ("encoder_width", "vocab_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"model.qformer.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise UsageError(
                f"model.qformer.pad_token_id {self.pad_token_id} is not a token id of the "
                f"{self.vocab_size}-token vocabulary"
            )

    def fitted_to_backbones(
        self,
        *,
        encoder_width: int,
        vocab_size: int | None = None,
        pad_token_id: int | None = None,
    ) -> QFormerConfig:
        """These sizes fitted to the frozen backbones, as a new validated config.

        ``encoder_width`` is the vision encoder's feature width (what the cross-attention and
        ``ln_vision`` read); ``vocab_size`` and ``pad_token_id`` the Q-Former tokenizer's, where
        the model embeds text (stage 1); None keeps the config's own.
        """
        fitted = {"encoder_width": encoder_width}
        if vocab_size is not None:
            fitted["vocab_size"] = vocab_size
        if pad_token_id is not None:
            fitted["pad_token_id"] = pad_token_id
        try:
            return dataclasses.replace(self, **fitted)  # runs __post_init__ again
        except UsageError as exc:
            described = ", ".join(f"{name} {value}" for name, value in fitted.items())
            raise UsageError(
                f"the Q-Former does not fit its backbones ({described}): {exc}"
            ) from None

    def has_cross_attention(self, layer_idx: int) -> bool:
        return layer_idx % self.cross_attention_freq == 0


QFORMER_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's sizes (BERT-base, 32 queries, EVA ViT-g features).
    "blip2": {},
    # Tests and the embedded demo: matches sample_data/backbones/{bert,vision}.
    "tiny": {
        "hidden_size": 128,
        "num_layers": 4,
        "num_heads": 4,
        "intermediate_size": 512,
        "num_query_tokens": 16,
        "encoder_width": 128,
        "cross_attention_freq": 2,
        "vocab_size": 202,  # sample_data/backbones/bert: 201 WordPiece + [DEC]
        "max_position_embeddings": 64,
        "embed_dim": 64,
        # At width 128, normal(0, 0.02) cross-attention gives attention logits ~6x flatter than
        # at 768: every query reads the same average of the image tokens, and ITC sat on a
        # plateau (text->image R@1 ~2% after 300 demo steps). With 0.1 the queries attend
        # selectively from the start and R@1 reaches ~20% in the same steps (make demo; README).
        "cross_attention_initializer_range": 0.1,
    },
}


def qformer_preset(name: str, **overrides: Any) -> QFormerConfig:
    """A named preset with size overrides, e.g. ``qformer_preset("tiny", num_layers=2)``."""
    if name not in QFORMER_PRESETS:
        raise UsageError(f"unknown Q-Former preset {name!r} (known: {', '.join(QFORMER_PRESETS)})")
    return QFormerConfig(**{**QFORMER_PRESETS[name], **overrides})


@dataclass
class BackboneConfig:
    """A frozen transformers model: a hub id or local directory loaded with ``from_pretrained``.

    ``architecture`` names the transformers class (e.g. ``CLIPVisionModel``); when empty it is
    inferred from the model's config. ``config`` holds config fields used instead of (or on top
    of) the checkpoint's own, so a shape can be built on the meta device with no download.
    """

    model: str = ""
    architecture: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    # Vision towers: the hidden layer the Q-Former reads. -1: the last (its last_hidden_state);
    # -2: the second to last, as BLIP-2 reads EVA ViT-g (a full 40-block checkpoint then gives
    # the 39-block features; configs/blip2_*.yaml instead build 39 blocks and read the last).
    layer: int = -1
