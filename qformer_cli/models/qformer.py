"""The BLIP-2 Querying Transformer (Q-Former).

A BERT-style post-LayerNorm encoder over the sequence ``[queries; text]``:

* every layer: self-attention over the whole sequence (which positions may see which is set by
  the attention pattern, see :func:`self_attention_mask`);
* layers with ``idx % cross_attention_freq == 0``: the *query* positions (only) cross-attend to
  the frozen image features, after ``ln_vision``;
* feed-forward: the query positions use their own FFN (``query_ffn``), text positions the BERT FFN.

Shapes: B batch, Q queries, T text tokens, N image tokens, H hidden, h heads, d = H / h.

Two caches avoid repeated work in stage 1:

* :class:`ImageKV` -- the cross-attention keys/values of one batch of images, computed once by
  :meth:`QFormer.encode_image` and shared by every pass over those images (ITC, ITM's 3B pairs
  index into it, generation).
* ``query_kv`` -- each layer's self-attention keys/values of the query positions, returned by a
  query-only pass and fed to the ITG pass as ``past_query_kv``: in ITG the queries never see the
  text, so their states equal the image pass's and need not be recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qformer_cli.models.config import QFormerConfig

AttentionPattern = Literal["bidirectional", "causal", "unimodal"]
KeyValue = tuple[torch.Tensor, torch.Tensor]  # each (B, h, L, d)


@dataclass
class ImageKV:
    """Cross-attention keys/values per layer (``None`` for layers without cross-attention)."""

    layers: list[KeyValue | None]

    def index_select(self, index: torch.Tensor) -> ImageKV:
        """The keys/values of the images ``index`` (B',) -- no recomputation, e.g. for ITM pairs.

        ``index_select``, not ``kv[index]``: on a CPU the backward of advanced indexing adds the
        repeated rows with atomics across threads, in an order that changes from run to run;
        ``index_select``'s adds them in index order, so training repeats bit for bit."""
        return ImageKV(
            [
                None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                for kv in self.layers
            ]
        )

    @staticmethod
    def cat(parts: list[ImageKV]) -> ImageKV:
        """Concatenate several batches' keys/values along the batch dimension."""
        return ImageKV(
            [
                None
                if layer[0] is None
                else (torch.cat([kv[0] for kv in layer]), torch.cat([kv[1] for kv in layer]))
                for layer in zip(*(part.layers for part in parts), strict=True)
            ]
        )

    @property
    def batch_size(self) -> int:
        return next(kv[0].shape[0] for kv in self.layers if kv is not None)


@dataclass
class QFormerOutput:
    query_output: torch.Tensor | None  # (B, Q, H), None for a text-only pass
    text_output: torch.Tensor | None  # (B, T, H), None for a query-only pass
    query_kv: list[KeyValue] | None  # per layer, the queries' self-attention K/V (B, h, Q, d)


def self_attention_mask(
    pattern: AttentionPattern,
    num_queries: int,
    text_mask: torch.Tensor | None,
    num_past_queries: int = 0,
) -> torch.Tensor | None:
    """Boolean self-attention mask (B, 1, rows, cols), ``True`` = may attend.

    Rows are the current positions ``[queries (num_queries); text (T)]``; columns are
    ``[past queries; current queries; text]``. ``text_mask`` (B, T) is 1 for real tokens, 0 for
    padding. Patterns (BLIP-2 stage 1):

    * ``bidirectional`` (ITM): every position sees every non-padding position;
    * ``causal`` (ITG): queries see only queries; text token i sees all queries and text <= i;
    * ``unimodal`` (ITC): queries see only queries, text only text.

    Returns ``None`` when nothing is blocked (a query-only pass), which lets SDPA take its fastest
    kernel. SDPA reads a boolean mask as "attend where True"; an additive float mask would need
    0 / -inf, and a 0/1 float mask would silently be wrong.
    """
    if text_mask is None:
        return None
    batch, text_len = text_mask.shape
    device = text_mask.device
    all_queries = num_past_queries + num_queries
    text_keys = text_mask.bool()[:, None, :]  # (B, 1, T): padding is never attended to

    # Query rows: always the queries; the text only when bidirectional.
    query_rows = torch.cat(
        [
            torch.ones(batch, num_queries, all_queries, dtype=torch.bool, device=device),
            text_keys.expand(batch, num_queries, text_len)
            if pattern == "bidirectional"
            else torch.zeros(batch, num_queries, text_len, dtype=torch.bool, device=device),
        ],
        dim=2,
    )
    # Text rows: the queries unless unimodal; the text (causally for ITG), minus padding.
    text_sees_text = text_keys.expand(batch, text_len, text_len)
    if pattern == "causal":
        causal = torch.ones(text_len, text_len, dtype=torch.bool, device=device).tril()
        text_sees_text = text_sees_text & causal
    # ones / zeros rather than torch.full(..., bool): the ONNX tracer cannot export a bool fill.
    fill = torch.zeros if pattern == "unimodal" else torch.ones
    text_sees_queries = fill(batch, text_len, all_queries, dtype=torch.bool, device=device)
    text_rows = torch.cat([text_sees_queries, text_sees_text], dim=2)
    return torch.cat([query_rows, text_rows], dim=1)[:, None]


class MultiHeadAttention(nn.Module):
    """Query/key/value projections; the attention itself is ``F.scaled_dot_product_attention``."""

    def __init__(self, hidden_size: int, kv_width: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(kv_width, hidden_size)
        self.value = nn.Linear(kv_width, hidden_size)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, width = states.shape  # (B, L, H) -> (B, h, L, d)
        return states.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def key_value(self, states: torch.Tensor) -> KeyValue:
        return self._split_heads(self.key(states)), self._split_heads(self.value(states))

    def attend(self, hidden: torch.Tensor, kv: KeyValue, mask: torch.Tensor | None) -> torch.Tensor:
        query = self._split_heads(self.query(hidden))  # (B, h, L, d)
        key, value = kv
        dropout = self.dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(query, key, value, mask, dropout_p=dropout)
        batch, _, length, _ = context.shape
        return context.transpose(1, 2).reshape(batch, length, -1)  # (B, L, H)


class AttentionBlock(nn.Module):
    """Attention followed by BERT's post-LN output: ``LayerNorm(x + dropout(dense(attn)))``."""

    def __init__(self, config: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        h = config.hidden_size
        self.attention = MultiHeadAttention(h, kv_width, config.num_heads, config.attention_dropout)
        self.out_proj = nn.Linear(h, h)
        self.layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self, hidden: torch.Tensor, kv: KeyValue, mask: torch.Tensor | None
    ) -> torch.Tensor:
        context = self.attention.attend(hidden, kv, mask)
        return self.layer_norm(hidden + self.dropout(self.out_proj(context)))


class FeedForward(nn.Module):
    """BERT FFN with post-LN: ``LayerNorm(x + dropout(fc_out(gelu(fc_in(x)))))``."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = F.gelu(self.fc_in(hidden))
        return self.layer_norm(hidden + self.dropout(self.fc_out(inner)))


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, layer_idx: int, with_text: bool) -> None:
        super().__init__()
        self.self_attention = AttentionBlock(config, config.hidden_size)
        self.cross_attention = (
            AttentionBlock(config, config.encoder_width)
            if config.has_cross_attention(layer_idx)
            else None
        )
        self.query_ffn = FeedForward(config)
        self.text_ffn = FeedForward(config) if with_text else None

    def forward(
        self,
        hidden: torch.Tensor,
        num_queries: int,
        mask: torch.Tensor | None,
        image_kv: KeyValue | None,
        past_query_kv: KeyValue | None,
    ) -> tuple[torch.Tensor, KeyValue]:
        """``hidden`` (B, Q + T, H) -> (B, Q + T, H), and this pass's self-attention K/V."""
        key, value = self.self_attention.attention.key_value(hidden)  # (B, h, Q + T, d)
        present_kv = (key, value)
        if past_query_kv is not None:  # ITG: the queries' K/V from the image pass come first
            key = torch.cat([past_query_kv[0], key], dim=2)
            value = torch.cat([past_query_kv[1], value], dim=2)
        hidden = self.self_attention(hidden, (key, value), mask)

        outputs = []
        if num_queries:
            query_hidden = hidden[:, :num_queries]
            if self.cross_attention is not None:
                if image_kv is None:
                    raise ValueError("a query pass through a cross-attention layer needs image_kv")
                query_hidden = self.cross_attention(query_hidden, image_kv, None)
            outputs.append(self.query_ffn(query_hidden))
        if hidden.shape[1] > num_queries:
            if self.text_ffn is None:
                raise ValueError("this Q-Former was built without its text parts")
            outputs.append(self.text_ffn(hidden[:, num_queries:]))
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0], present_kv


class QFormer(nn.Module):
    """Learnable queries + ``ln_vision`` + text embeddings + the layer stack.

    ``with_text=False`` builds the stage-2 Q-Former: no word/position embeddings and no text
    FFN (exactly transformers' ``Blip2QFormerModel`` plus queries and ``ln_vision``).
    """

    def __init__(self, config: QFormerConfig, *, with_text: bool = True) -> None:
        super().__init__()
        self.config = config
        self.with_text = with_text
        h = config.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, h))
        self.ln_vision = nn.LayerNorm(config.encoder_width, eps=config.vision_layer_norm_eps)
        if with_text:
            self.word_embeddings = nn.Embedding(
                config.vocab_size, h, padding_idx=config.pad_token_id
            )
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.embed_layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(config, idx, with_text) for idx in range(config.num_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT initialization: normal(0, 0.02) weights, zero biases, unit LayerNorms; the
        cross-attention weights with ``cross_attention_initializer_range``."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.query_tokens, std=std)
        for layer in self.layers:
            if layer.cross_attention is not None:
                for module in layer.cross_attention.modules():
                    if isinstance(module, nn.Linear):
                        nn.init.normal_(
                            module.weight, std=self.config.cross_attention_initializer_range
                        )

    def encode_image(self, image_embeds: torch.Tensor) -> ImageKV:
        """Frozen image features (B, N, C) -> cross-attention K/V per layer, computed once."""
        image_embeds = self.ln_vision(image_embeds.to(self.ln_vision.weight.dtype))
        return ImageKV(
            [
                None
                if layer.cross_attention is None
                else layer.cross_attention.attention.key_value(image_embeds)
                for layer in self.layers
            ]
        )

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, H) word + absolute position embeddings (positions from 0)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]

    def forward(
        self,
        *,
        image_kv: ImageKV | None = None,
        input_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        use_queries: bool = True,
        pattern: AttentionPattern = "bidirectional",
        past_query_kv: list[KeyValue] | None = None,
    ) -> QFormerOutput:
        """One pass over ``[queries; text]``.

        * query-only (image pass, ITC image side, stage 2): ``image_kv`` only;
        * text-only (ITC text side): ``input_ids``, ``use_queries=False``, ``pattern="unimodal"``;
        * ITM: ``image_kv`` + ``input_ids``, ``pattern="bidirectional"``;
        * ITG: ``input_ids`` + ``past_query_kv`` (from a query-only pass), ``use_queries=False``,
          ``pattern="causal"``; or, with no cache, ``image_kv`` + ``input_ids`` + ``"causal"``.
        """
        pieces = []
        batch = self._batch_size(image_kv, input_ids)
        if use_queries:
            pieces.append(self.query_tokens.expand(batch, -1, -1))
        if input_ids is not None:
            pieces.append(self.embed_text(input_ids))
            if text_mask is None:
                text_mask = torch.ones_like(input_ids)
        if not pieces:
            raise ValueError("nothing to encode: give image_kv (queries) and/or input_ids")
        num_queries = pieces[0].shape[1] if use_queries else 0
        hidden = self.embed_dropout(self.embed_layer_norm(torch.cat(pieces, dim=1)))

        num_past = 0 if past_query_kv is None else past_query_kv[0][0].shape[2]
        mask = self_attention_mask(pattern, num_queries, text_mask, num_past)
        query_kv = []
        for idx, layer in enumerate(self.layers):
            hidden, present_kv = layer(
                hidden,
                num_queries,
                mask,
                None if image_kv is None else image_kv.layers[idx],
                None if past_query_kv is None else past_query_kv[idx],
            )
            query_kv.append((present_kv[0][:, :, :num_queries], present_kv[1][:, :, :num_queries]))
        return QFormerOutput(
            query_output=hidden[:, :num_queries] if num_queries else None,
            text_output=hidden[:, num_queries:] if input_ids is not None else None,
            query_kv=query_kv if num_queries else None,
        )

    def _batch_size(self, image_kv: ImageKV | None, input_ids: torch.Tensor | None) -> int:
        if image_kv is not None:
            return image_kv.batch_size
        if input_ids is not None:
            return input_ids.shape[0]
        raise ValueError("nothing to encode: give image_kv (queries) and/or input_ids")

    def query_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Frozen image features (B, N, C) -> query outputs (B, Q, H): the stage-2 path."""
        output = self.forward(image_kv=self.encode_image(image_embeds))
        assert output.query_output is not None
        return output.query_output
