"""LAVIS 1.0.2's stage-1 model (``Blip2Qformer``), importable offline in its own environment.

Runs only under the LAVIS environment's python (``make lavis-env``: salesforce-lavis 1.0.2 with
transformers 4.33, next to the same torch); it never imports ``qformer_cli``. Used by
``bench/lavis_worker.py`` (the measured peer of ``bench/stage1_step.py``) and by
``scripts/lavis_reference.py`` (the LAVIS parity fixture). Nothing installed is edited; only the
calling process is adapted:

* ``lavis`` and ``lavis.models`` are registered without running their ``__init__`` (they import
  every model and data set builder, and their optional dependencies); torchvision's two ops whose
  fakes the PyPI wheel registers unconditionally are declared first, as its C extension does not
  load next to a CPU torch (no torchvision op runs).
* ``bert-base-uncased`` lookups return a local config (``BertConfig`` with the given overrides:
  none is bert-base), a tokenizer over a local vocabulary file and a randomly initialized
  ``BertLMHeadModel``: nothing is downloaded.
* The vision encoder is an identity that declares the image features' width: ``samples["image"]``
  holds the frozen encoder's output (B, N, C), which the trainable ``ln_vision`` normalizes.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# bert-base-uncased's special tokens and their ids ([unusedN] fill 1-99).
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
BERT_VOCAB_SIZE = 30522


def bert_like_vocabulary(words: list[str], size: int = BERT_VOCAB_SIZE) -> list[str]:
    """bert-base-uncased's special tokens at their ids, then ``words``, then filler to ``size``."""
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [word for word in dict.fromkeys(words) if word not in tokens]
    tokens += [f"[filler{i}]" for i in range(size - len(tokens))]
    return tokens


def register_bare_package(name: str) -> None:
    """Make ``name`` importable as a package without executing its ``__init__.py``."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit(f"{name} is not installed in {sys.executable}'s environment")
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


def declare_torchvision_ops() -> None:
    """torchvision registers fakes for these ops: without its C extension they must exist."""
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    declare_torchvision_ops.library = library  # type: ignore[attr-defined]  # keep it alive


def import_blip2_qformer(
    vocab_file: Path,
    vision_width: int,
    bert_overrides: dict[str, Any] | None = None,
    layer_norm: type[nn.Module] | None = None,
) -> type:
    """LAVIS's ``Blip2Qformer`` class, offline: images are given as encoder features of width
    ``vision_width``; ``layer_norm`` replaces LAVIS's ``ln_vision`` class (None: LAVIS's own,
    which computes in float32)."""
    declare_torchvision_ops()
    register_bare_package("lavis")
    register_bare_package("lavis.models")
    from lavis.models import base_model

    sys.modules["lavis.models"].BaseModel = base_model.BaseModel  # the registry imports it here
    from lavis.models.blip2_models import Qformer, blip2
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
    from transformers import BertTokenizer

    def local_config(cls: type, name: str, *args: Any, **kwargs: Any) -> Any:
        assert name == "bert-base-uncased", name
        return cls(**(bert_overrides or {}))

    def local_tokenizer(cls: type, name: str, *args: Any, **kwargs: Any) -> Any:
        assert name == "bert-base-uncased", name
        return cls(vocab_file=str(vocab_file), do_lower_case=True)

    def random_lm(cls: type, name: str, *args: Any, config: Any = None, **kwargs: Any) -> Any:
        assert name == "bert-base-uncased" and config is not None, name
        return cls(config)

    class FeaturesAsImages(nn.Identity):
        num_features = vision_width

    norm = layer_norm or blip2.LayerNorm

    def stand_in_vision(cls: type, *args: Any) -> tuple[nn.Module, nn.Module]:
        return FeaturesAsImages(), norm(vision_width)

    Qformer.BertConfig.from_pretrained = classmethod(local_config)
    BertTokenizer.from_pretrained = classmethod(local_tokenizer)
    Qformer.BertLMHeadModel.from_pretrained = classmethod(random_lm)
    blip2.Blip2Base.init_vision_encoder = classmethod(stand_in_vision)
    return Blip2Qformer


def start_process_group() -> None:
    """A one-process gloo group, as LAVIS's trainer starts: ``forward`` calls
    ``dist.get_rank()``, and ``concat_all_gather`` gathers only in a group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
