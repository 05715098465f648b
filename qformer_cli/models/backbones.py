"""The frozen backbones: vision encoders and LLMs, loaded with transformers' ``from_pretrained``.

A hub id (``openai/clip-vit-large-patch14``, ``facebook/opt-2.7b``) and a local directory take
the same path. ``meta=True`` builds the architecture from its config alone (no weights, no
download when the config is given inline or found locally), for ``qformer info``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from torch import nn

from qformer_cli.embedded import SAMPLE_DATA, resolve_embedded_path
from qformer_cli.errors import CheckpointError, UsageError, first_line
from qformer_cli.models.config import BackboneConfig
from qformer_cli.models.convert import BLIP2_MODEL_TYPES

LLMFamily = Literal["decoder-only", "encoder-decoder"]

# Vision checkpoints whose full model holds a text tower too: load only the vision side.
_VISION_CLASSES = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "blip_2_vision_model": "Blip2VisionModel",
    "blip-2": "Blip2VisionModel",
}
# A full transformers BLIP-2 directory (Blip2Model / Blip2ForConditionalGeneration) holds both
# frozen backbones; each is loaded from its sub-config and the weights under its prefix.
_BLIP2_VISION_PREFIX = "vision_model."
_BLIP2_LLM_PREFIX = "language_model."
# Modules whose weights a checkpoint may lack without changing the features we read
# (``last_hidden_state``): poolers and pooling heads produce only the pooled output; CLIP's
# post_layernorm normalizes only the pooled token; BLIP-2's is replaced by our own ``ln_vision``.
_UNUSED_BY_ANY = ("pooler",)
_UNUSED_VISION_MODULES = {
    "CLIPVisionModel": ("post_layernorm",),
    "SiglipVisionModel": ("head",),
    "Blip2VisionModel": ("post_layernorm",),
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


def _backbone_location(name: str) -> str:
    """A local backbone's resolved path (however it was spelled), or the hub id as it is."""
    if not name:
        return ""
    local = Path(resolve_model_name(name))
    return str(local.resolve()) if local.exists() else name


def same_backbone(a: BackboneConfig, b: BackboneConfig) -> bool:
    """Whether two specs name the same weights (however a local path is spelled) and config."""
    return (
        _backbone_location(a.model) == _backbone_location(b.model)
        and a.architecture == b.architecture
        and a.config == b.config
    )


def _checkpoint_config(spec: BackboneConfig) -> transformers.PretrainedConfig | None:
    """The config saved with ``spec.model`` (None when the backbone is given by config alone)."""
    if not spec.model:
        return None
    try:
        return transformers.AutoConfig.from_pretrained(resolve_model_name(spec.model))
    except (OSError, ValueError) as exc:
        reason = first_line(exc)
        raise CheckpointError(f"{spec.model}: cannot load the backbone config ({reason})") from None


def _with_overrides(
    spec: BackboneConfig, saved: transformers.PretrainedConfig | None, tower: str
) -> transformers.PretrainedConfig:
    """``saved`` (or, for a full BLIP-2 checkpoint, its ``tower`` sub-config: ``"vision_config"``
    or ``"text_config"``) updated by ``spec.config``; built from ``spec.config`` alone without."""
    overrides = dict(spec.config)
    if saved is not None:
        # model.vision.config / model.llm.config describe the tower, not a whole BLIP-2
        config = getattr(saved, tower) if tower and _is_blip2(saved) else saved
        for key, value in overrides.items():
            setattr(config, key, value)
        return config
    model_type = overrides.pop("model_type", None)
    if not model_type:
        raise UsageError("a backbone needs `model` (id or path) or `config` with a model_type")
    return transformers.AutoConfig.for_model(model_type, **overrides)


def backbone_config(spec: BackboneConfig) -> transformers.PretrainedConfig:
    """The backbone's transformers config: the checkpoint's (if any) updated by ``spec.config``."""
    return _with_overrides(spec, _checkpoint_config(spec), tower="")


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
    # A full CLIP/SigLIP/BLIP-2 config holds the vision tower's config as a sub-config.
    return getattr(config, "vision_config", None) or config


def _is_blip2(config: transformers.PretrainedConfig) -> bool:
    return config.model_type in BLIP2_MODEL_TYPES


def _preview(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown} (+{len(names) - limit} more)" if len(names) > limit else shown


def _is_unused(key: str, unused_modules: tuple[str, ...]) -> bool:
    return any(part in unused_modules for part in key.split(".")[:-1])


def _build_on_meta(
    cls: Any, config: transformers.PretrainedConfig, spec: BackboneConfig
) -> nn.Module:
    """The architecture from its config alone, on the meta device (shapes, no weights)."""
    try:
        with torch.device("meta"):
            return cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    except (ValueError, AttributeError, TypeError) as exc:
        reason = first_line(exc)
        name = spec.model or config.model_type
        message = f"{name}: cannot build {cls.__name__} from its config ({reason})"
        raise UsageError(message) from None


def _missing_weights_message(
    name: str, setting: str, model: nn.Module, missing: list[str], unread: list[str]
) -> str:
    unread_part = f"; {len(unread)} of its weights unread: {_preview(unread)}" if unread else ""
    return (
        f"{name}: {len(missing)} of the {len(model.state_dict())} weights of "
        f"{type(model).__name__} are not in the checkpoint and would be random: "
        f"{_preview(missing)}{unread_part} (is {setting}.architecture right for it?)"
    )


def load_pretrained_checked(
    cls: Any,
    spec: BackboneConfig,
    setting: str,
    *,
    dtype: torch.dtype,
    unused_modules: tuple[str, ...] = (),
    config: transformers.PretrainedConfig | None = None,
    prefix: str = "",
) -> nn.Module:
    """``cls.from_pretrained`` that refuses a checkpoint lacking weights the model uses.

    transformers fills a weight the checkpoint lacks with a fresh random init and carries on;
    for a frozen backbone that means training on noise. Weights in ``unused_modules`` (which
    do not reach the features we read) may be absent. Unexpected weights (a CLIP checkpoint's
    text tower, a classifier head) are left unread, which is harmless.
    ``prefix``: where the backbone's weights sit in the checkpoint (a BLIP-2 directory's tower);
    ``setting``: the config key that named the backbone, for the message.
    """
    name = resolve_model_name(spec.model)
    extra: dict[str, Any] = {"config": config} if config is not None else {}
    if prefix:
        extra["key_mapping"] = {f"^{re.escape(prefix)}": ""}
    try:
        model, info = cls.from_pretrained(name, dtype=dtype, output_loading_info=True, **extra)
    except (OSError, ValueError, AttributeError, RuntimeError) as exc:
        # a checkpoint of another architecture fails in the class's constructor or loader
        reason = first_line(exc)
        raise CheckpointError(f"{spec.model}: cannot load as {cls.__name__} ({reason})") from None
    unused = (*_UNUSED_BY_ANY, *unused_modules)
    missing = sorted(key for key in info["missing_keys"] if not _is_unused(key, unused))
    if missing:
        unread = sorted(info["unexpected_keys"])
        raise CheckpointError(_missing_weights_message(spec.model, setting, model, missing, unread))
    return model


class VisionEncoder(nn.Module):
    """A transformers vision model returning per-token features (B, N, C): frozen, unless
    ``unfreeze`` (fine-tuning: ``train.vision_lr``) makes its weights trainable.

    Features are the last layer's hidden states (``last_hidden_state``), or with ``layer`` < -1
    an earlier layer's (``hidden_states[layer]``, before any final norm). For
    ``Blip2VisionModel`` (and InstructBLIP's) the final ``post_layernorm`` is removed: BLIP-2
    applies its own trainable ``ln_vision`` instead.
    """

    def __init__(self, model: nn.Module, layer: int = -1) -> None:
        super().__init__()
        if isinstance(model, transformers.Blip2VisionModel | transformers.InstructBlipVisionModel):
            model.post_layernorm = nn.Identity()
        self.model = model.eval().requires_grad_(False)
        self.hidden_size: int = _vision_config(model.config).hidden_size
        self.layer = layer

    def train(self, mode: bool = True) -> VisionEncoder:
        # Dropout and the like stay off even when the surrounding model trains (also when the
        # encoder itself is fine-tuned: LAVIS fine-tunes BLIP-2's ViT with drop-path 0).
        super().train(False)
        return self

    def unfreeze(self) -> VisionEncoder:
        """Train the tower's weights (the paper's fine-tuning); hold them in fp32 first."""
        self.model.requires_grad_(True)
        return self

    @property
    def trains(self) -> bool:
        return any(param.requires_grad for param in self.model.parameters())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.layer == -1:
            return self.model(pixel_values=pixel_values).last_hidden_state
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return outputs.hidden_states[self.layer]


def build_vision_encoder(
    spec: BackboneConfig, *, meta: bool = False, dtype: torch.dtype | None = None
) -> VisionEncoder:
    saved = _checkpoint_config(spec)
    blip2 = saved is not None and _is_blip2(saved)  # the vision tower of a BLIP-2 directory
    config = _with_overrides(spec, saved, tower="vision_config")
    cls = _vision_class(spec, config)
    tower_config = config if cls is transformers.AutoModel else _vision_config(config)
    if meta:
        return VisionEncoder(_build_on_meta(cls, tower_config, spec), spec.layer)
    model = load_pretrained_checked(
        cls,
        spec,
        "model.vision",
        dtype=dtype or torch.float32,
        unused_modules=_UNUSED_VISION_MODULES.get(cls.__name__, ()),
        config=tower_config if blip2 else None,
        prefix=_BLIP2_VISION_PREFIX if blip2 else "",
    )
    return VisionEncoder(model, spec.layer)


def vision_tower_config(spec: BackboneConfig) -> transformers.PretrainedConfig:
    """The vision tower's config as ``model.vision`` names it (overrides applied), no weights."""
    return _vision_config(_with_overrides(spec, _checkpoint_config(spec), tower="vision_config"))


def check_vision_kind(spec: BackboneConfig) -> None:
    """Refuse, from its config alone, a ``model.vision`` that is no vision tower (an LLM, BERT):
    every supported tower (CLIP, SigLIP, DINOv2, BLIP-2's ViT, ...) has an image size."""
    if spec.architecture:
        return  # the user named the class
    config = vision_tower_config(spec)
    if getattr(config, "image_size", None) is None:
        raise UsageError(
            f"model.vision {spec.model or config.model_type}: a {config.model_type} model is not "
            "a vision encoder (give a vision tower: CLIP, SigLIP, DINOv2, BLIP-2's ViT, ...)"
        )


# Vision towers whose embeddings interpolate their position table to any image size themselves.
SIZE_FREE_VISION_TYPES = ("dinov2", "dinov2_with_registers")


def check_vision_image_size(spec: BackboneConfig, image_size: int) -> None:
    """Refuse, from its config alone, a ``data.image_size`` the tower cannot take: its position
    embeddings are for its own size. (BLIP-2 fine-tunes at 364 px by interpolating them; this
    package does not, and the forward pass would fail on the token count.)"""
    if not image_size or spec.architecture:
        return
    config = vision_tower_config(spec)
    native = getattr(config, "image_size", None)
    if native is None or image_size == native or config.model_type in SIZE_FREE_VISION_TYPES:
        return
    raise UsageError(
        f"data.image_size {image_size}: {spec.model or config.model_type} takes {native} px "
        f"images (its position embeddings are for that size; interpolating them is not "
        f"supported): --set data.image_size={native}, or 0 for its image processor's size"
    )


def check_language_model_kind(spec: BackboneConfig) -> None:
    """Refuse, from its config alone, a ``model.llm`` that is neither a causal nor a
    sequence-to-sequence LM. transformers would build BERT as a causal LM (``BertLMHeadModel``)
    that attends to later tokens unless ``is_decoder``: training would "work" on leaked text."""
    if spec.architecture:
        return
    from transformers.models.auto import modeling_auto as auto

    config = _with_overrides(spec, _checkpoint_config(spec), tower="text_config")
    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        fits = kind in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    else:
        encoder_only = kind in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
        fits = kind in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not (
            encoder_only and not getattr(config, "is_decoder", False)
        )
    if not fits:
        raise UsageError(
            f"model.llm {spec.model or kind}: a {kind} model is not a causal or "
            "sequence-to-sequence language model (e.g. OPT, Llama, Qwen, FlanT5)"
        )


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
    saved = _checkpoint_config(spec)
    blip2 = saved is not None and _is_blip2(saved)  # the LLM of a full BLIP-2 directory
    config = _with_overrides(spec, saved, tower="text_config")
    family = llm_family(config)
    if spec.architecture:
        cls = _transformers_class(spec.architecture)
    elif family == "encoder-decoder":
        cls = transformers.AutoModelForSeq2SeqLM
    else:
        cls = transformers.AutoModelForCausalLM
    if meta:
        model = _build_on_meta(cls, config, spec)
    else:
        model = load_pretrained_checked(
            cls,
            spec,
            "model.llm",
            dtype=dtype or torch.float32,
            config=config if blip2 else None,
            prefix=_BLIP2_LLM_PREFIX if blip2 else "",
        )
    return LanguageModel(model=model.eval().requires_grad_(False), family=family)


DEC_TOKEN = "[DEC]"


def _load_tokenizer(name: str) -> transformers.PreTrainedTokenizerBase:
    try:
        return transformers.AutoTokenizer.from_pretrained(resolve_model_name(name))
    except (OSError, ValueError) as exc:
        reason = first_line(exc)
        raise CheckpointError(f"{name}: cannot load the tokenizer ({reason})") from None


def load_qformer_tokenizer(name: str) -> transformers.PreTrainedTokenizerBase:
    """The Q-Former's BERT tokenizer with BLIP-2's ``[DEC]`` token (added when absent)."""
    tokenizer = _load_tokenizer(name)
    if DEC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


def qformer_vocabulary(tokenizer: transformers.PreTrainedTokenizerBase) -> dict[str, int]:
    """What a Q-Former that embeds text takes from its tokenizer (``fitted_to_backbones``
    keywords): the vocabulary size, [DEC] included, and the pad id."""
    return {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id or 0}


def load_llm_tokenizer(name: str) -> transformers.PreTrainedTokenizerBase:
    """The LLM's tokenizer; a pad token is borrowed from EOS where the LLM has none (GPT-2)."""
    tokenizer = _load_tokenizer(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
