"""BLIP-2 models built around the Q-Former: the stage-1 heads and the stage-2 LLM bridge.

Only the trainable parts live here; the frozen vision encoder and LLM are transformers models
from :mod:`qformer_cli.models.backbones`, passed in where needed.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qformer_cli.models.config import QFormerConfig
from qformer_cli.models.qformer import ImageKV, KeyValue, QFormer


class BertLMHead(nn.Module):
    """BERT's MLM head, used for ITG: transform, then a decoder tied to the word embeddings."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, T, H) text states -> (B, T, V) logits, with the decoder weight tied to (V, H)."""
        transformed = self.layer_norm(F.gelu(self.dense(hidden)))
        return F.linear(transformed, word_embeddings, self.bias)


HeadInit = Literal["lavis", "normal"]
SimilarityRows = Literal["images", "texts"]


class Stage1Model(nn.Module):
    """Q-Former with text parts + ITC projections, ITM head, learnable temperature, LM head.

    ``head_init`` (config ``stage1.head_init``): ``lavis`` leaves ``vision_proj``, ``text_proj``
    and ``itm_head`` at torch's default ``nn.Linear`` init, as LAVIS's ``Blip2Qformer`` creates
    them; ``normal`` draws them from normal(0, initializer_range) with zero bias, as BERT inits
    its own layers. The LM head's transform is BERT's (loaded from the BERT checkpoint in both).
    """

    def __init__(self, config: QFormerConfig, head_init: HeadInit = "normal") -> None:
        super().__init__()
        self.config = config
        self.qformer = QFormer(config, with_text=True)
        self.vision_proj = nn.Linear(config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(config.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.lm_head = BertLMHead(config)
        normal_heads = [self.vision_proj, self.text_proj, self.itm_head, self.lm_head.dense]
        if head_init == "lavis":
            normal_heads = [self.lm_head.dense]
        for head in normal_heads:
            nn.init.normal_(head.weight, std=config.initializer_range)
            nn.init.zeros_(head.bias)

    # The stage-1 operations, each the one implementation that training, retrieval and the ONNX
    # export call. B images or texts, P image-text pairs, Q queries, T tokens, H hidden,
    # D = embed_dim, V vocabulary.

    def image_feats(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Frozen image features (B, N, C) -> L2-normalized ITC query embeddings (B, Q, D)."""
        return self.image_feats_from_queries(self.qformer.query_features(image_embeds))

    def image_feats_from_queries(self, query_output: torch.Tensor) -> torch.Tensor:
        """Query outputs (B, Q, H) of an image pass already run -> ITC embeddings (B, Q, D)."""
        return F.normalize(self.vision_proj(query_output), dim=-1)

    def text_feat(self, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask (B, T) -> L2-normalized ITC text embedding (B, D): the [CLS]
        output of a text-only (unimodal) pass, projected."""
        text_pass = self.qformer(
            input_ids=input_ids, text_mask=text_mask, use_queries=False, pattern="unimodal"
        )
        return F.normalize(self.text_proj(text_pass.text_output[:, 0]), dim=-1)

    @staticmethod
    def similarity(
        image_feats: torch.Tensor, text_feat: torch.Tensor, *, rows: SimilarityRows = "images"
    ) -> torch.Tensor:
        """ITC similarity of image (N_img, Q, D) and text (N_txt, D) embeddings: for each pair,
        the max over the Q queries of the dot products (no temperature).

        ``rows="images"`` gives (N_img, N_txt), ``"texts"`` (N_txt, N_img), each computed in
        its own orientation (as LAVIS computes sim_i2t and sim_t2i), not as a transpose.
        """
        if rows == "images":
            return torch.einsum("iqd,td->itq", image_feats, text_feat).amax(dim=-1)
        return torch.einsum("td,iqd->tiq", text_feat, image_feats).amax(dim=-1)

    def itm_logits(
        self, image_kv: ImageKV, input_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Image K/V and token ids/mask of P pairs -> (P, 2) ITM logits [no match, match]: a
        joint bidirectional pass, the head on each query output, averaged over the queries."""
        joint = self.qformer(
            image_kv=image_kv, input_ids=input_ids, text_mask=text_mask, pattern="bidirectional"
        )
        return self.itm_head(joint.query_output).mean(dim=1)

    def itg_logits(
        self,
        decoder_ids: torch.Tensor,
        text_mask: torch.Tensor,
        *,
        past_query_kv: list[KeyValue] | None = None,
        image_kv: ImageKV | None = None,
    ) -> torch.Tensor:
        """[DEC]-prefixed token ids and mask (B, T) -> (B, T, V) LM logits of a causal pass in
        which each token sees all queries and the tokens up to itself.

        The queries come from ``past_query_kv`` (per layer (B, h, Q, d), from an image pass
        already run: the queries never see the text, so their states are the same) or are
        recomputed from ``image_kv``; give exactly one.
        """
        if (past_query_kv is None) == (image_kv is None):
            raise ValueError("itg_logits: give exactly one of past_query_kv and image_kv")
        if past_query_kv is not None:
            text_pass = self.qformer(
                input_ids=decoder_ids,
                text_mask=text_mask,
                use_queries=False,
                pattern="causal",
                past_query_kv=past_query_kv,
            )
        else:
            text_pass = self.qformer(
                image_kv=image_kv, input_ids=decoder_ids, text_mask=text_mask, pattern="causal"
            )
        return self.lm_logits(text_pass.text_output)

    def lm_logits(self, text_output: torch.Tensor) -> torch.Tensor:
        """(B, T, H) text outputs -> (B, T, V) logits of the tied LM head."""
        return self.lm_head(text_output, self.qformer.word_embeddings.weight)


class Stage2Model(nn.Module):
    """Q-Former + ``Linear(H -> LLM hidden)``: the LLM's soft visual prompt.

    BLIP-2's Q-Former has no text parts here. ``instruction_aware`` (InstructBLIP) keeps them:
    the instruction's tokens join the queries in self-attention (the queries and the
    instruction see each other; only the queries cross-attend to the image and leave)."""

    def __init__(
        self,
        config: QFormerConfig,
        llm_hidden_size: int,
        proj_init_std: float = 0.02,
        *,
        instruction_aware: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.instruction_aware = instruction_aware
        self.qformer = QFormer(config, with_text=instruction_aware)
        self.llm_proj = nn.Linear(config.hidden_size, llm_hidden_size)
        # normal(0, 0.02) by default, as transformers initializes BLIP-2's language_projection.
        # The soft prompt's scale should be near the LLM's token embeddings': a small LLM reads
        # one tens of times larger (torch's default init for the tiny OPT) or smaller (0.02 for
        # the tiny T5, whose embeddings are large) poorly or not at all.
        nn.init.normal_(self.llm_proj.weight, std=proj_init_std)
        nn.init.zeros_(self.llm_proj.bias)

    def soft_prompt(
        self,
        image_embeds: torch.Tensor,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Frozen image features (B, N, C) -> soft prompt (B, Q, LLM hidden); an
        instruction-aware model also reads the instruction's Q-Former tokens (B, T) + mask."""
        if not self.instruction_aware:
            return self.llm_proj(self.qformer.query_features(image_embeds))
        if instruction_ids is None:
            raise ValueError("an instruction-aware Q-Former needs the instruction's tokens")
        output = self.qformer(
            image_kv=self.qformer.encode_image(image_embeds),
            input_ids=instruction_ids,
            text_mask=instruction_mask,
            pattern="bidirectional",
        )
        return self.llm_proj(output.query_output)


def soft_prompt_inputs(
    llm: nn.Module, soft_prompt: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[soft prompt; token embeddings]`` (B, Q + T, D) and its attention mask (B, Q + T)."""
    token_embeds = llm.get_input_embeddings()(input_ids)
    soft_prompt = soft_prompt.to(token_embeds.dtype)
    query_mask = torch.ones(
        soft_prompt.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device
    )
    return (
        torch.cat([soft_prompt, token_embeds], dim=1),
        torch.cat([query_mask, attention_mask], dim=1),
    )
