"""The frozen backbones: vision encoders and LLMs, loaded with transformers' ``from_pretrained``.

A hub id (``openai/clip-vit-large-patch14``, ``facebook/opt-2.7b``) and a local directory take
the same path. ``meta=True`` builds the architecture from its config alone (no weights, no
download when the config is given inline or found locally), for ``qformer info``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from torch import nn

from qformer_cli.config import BackboneConfig
from qformer_cli.embedded import SAMPLE_DATA, resolve_embedded_path
from qformer_cli.errors import CheckpointError, UsageError

LLMFamily = Literal["decoder-only", "encoder-decoder"]

# Vision checkpoints whose full model holds a text tower too: load only the vision side.
_VISION_CLASSES = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "blip_2_vision_model": "Blip2VisionModel",
}


def resolve_model_name(name: str) -> str:
    """A local directory if it exists (``sample_data/backbones/...`` not found here is the
    embedded default's: :func:`resolve_embedded_path`); otherwise the hub id as is."""
    if not name:
        raise UsageError("no backbone model given (set model.vision.model / model.llm.model)")
    path = resolve_embedded_path(name)
    if path.exists():
        return str(path)
    if path.is_absolute() or name.startswith((".", "~", SAMPLE_DATA)):
        looked = f" (looked in {path})" if path != Path(name).expanduser() else ""
        raise UsageError(f"{name}: backbone directory not found{looked}")
    return name


def backbone_config(spec: BackboneConfig) -> transformers.PretrainedConfig:
    """The backbone's transformers config: the checkpoint's (if any) updated by ``spec.config``."""
    overrides = dict(spec.config)
    if spec.model:
        name = resolve_model_name(spec.model)
        try:
            config = transformers.AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{spec.model}: cannot load the backbone config ({reason})"
            ) from None
        for key, value in overrides.items():
            setattr(config, key, value)
        return config
    model_type = overrides.pop("model_type", None)
    if not model_type:
        raise UsageError("a backbone needs `model` (id or path) or `config` with a model_type")
    return transformers.AutoConfig.for_model(model_type, **overrides)


def _transformers_class(name: str) -> Any:
    cls = getattr(transformers, name, None)
    if cls is None:
        raise UsageError(f"transformers has no class {name!r}")
    return cls


def _vision_class(spec: BackboneConfig, config: transformers.PretrainedConfig) -> Any:
    if spec.architecture:
        return _transformers_class(spec.architecture)
    name = _VISION_CLASSES.get(config.model_type)
    return _transformers_class(name) if name else transformers.AutoModel


def _vision_config(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    # A full CLIP/SigLIP config holds the vision tower's config as a sub-config.
    return getattr(config, "vision_config", None) or config


class VisionEncoder(nn.Module):
    """A frozen transformers vision model returning per-token features (B, N, C).

    Features are the last layer's hidden states. For ``Blip2VisionModel`` the final
    ``post_layernorm`` is removed: BLIP-2 applies its own trainable ``ln_vision`` instead.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if isinstance(model, transformers.Blip2VisionModel):
            model.post_layernorm = nn.Identity()
        self.model = model.eval().requires_grad_(False)
        self.hidden_size: int = _vision_config(model.config).hidden_size

    def train(self, mode: bool = True) -> VisionEncoder:
        # Frozen: dropout and the like stay off even when the surrounding model trains.
        super().train(False)
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state


def build_vision_encoder(
    spec: BackboneConfig, *, meta: bool = False, dtype: torch.dtype | None = None
) -> VisionEncoder:
    config = backbone_config(spec)
    cls = _vision_class(spec, config)
    if meta:
        with torch.device("meta"):
            tower_config = config if cls is transformers.AutoModel else _vision_config(config)
            model = cls._from_config(tower_config)
        return VisionEncoder(model)
    model = cls.from_pretrained(resolve_model_name(spec.model), dtype=dtype or torch.float32)
    return VisionEncoder(model)


@dataclass
class LanguageModel:
    """A frozen LLM and what the stage-2 bridge needs to know about it."""

    model: nn.Module
    family: LLMFamily

    @property
    def embedding_dim(self) -> int:
        # The width the soft prompt must have: the input embeddings' (for OPT this is
        # word_embed_proj_dim, which can differ from hidden_size).
        return self.model.get_input_embeddings().embedding_dim


def llm_family(config: transformers.PretrainedConfig) -> LLMFamily:
    return "encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "decoder-only"


def build_language_model(
    spec: BackboneConfig, *, meta: bool = False, dtype: torch.dtype | None = None
) -> LanguageModel:
    config = backbone_config(spec)
    family = llm_family(config)
    if spec.architecture:
        cls = _transformers_class(spec.architecture)
    elif family == "encoder-decoder":
        cls = transformers.AutoModelForSeq2SeqLM
    else:
        cls = transformers.AutoModelForCausalLM
    if meta:
        with torch.device("meta"):
            model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    else:
        model = cls.from_pretrained(resolve_model_name(spec.model), dtype=dtype or torch.float32)
    return LanguageModel(model=model.eval().requires_grad_(False), family=family)


DEC_TOKEN = "[DEC]"


def _load_tokenizer(name: str) -> transformers.PreTrainedTokenizerBase:
    try:
        return transformers.AutoTokenizer.from_pretrained(resolve_model_name(name))
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{name}: cannot load the tokenizer ({reason})") from None


def load_qformer_tokenizer(name: str) -> transformers.PreTrainedTokenizerBase:
    """The Q-Former's BERT tokenizer with BLIP-2's ``[DEC]`` token (added when absent)."""
    tokenizer = _load_tokenizer(name)
    if DEC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


def load_llm_tokenizer(name: str) -> transformers.PreTrainedTokenizerBase:
    """The LLM's tokenizer; a pad token is borrowed from EOS where the LLM has none (GPT-2)."""
    tokenizer = _load_tokenizer(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
