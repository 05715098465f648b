"""A stage-2 model as a transformers ``Blip2ForConditionalGeneration`` directory + processor; a
stage-1 model as a ``Blip2ForImageTextRetrieval`` directory + its BERT tokenizer and image
processor."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from qformer_cli.data.transforms import ImageTransformConfig, image_processor_settings
from qformer_cli.models.convert import save_transformers_blip2
from qformer_cli.pretrained import Stage1Pipeline, Stage2Pipeline

IMAGE_TOKEN = "<image>"


def _image_processor(image_transform: ImageTransformConfig):
    import transformers

    # The transform our inference uses for this model, so both sides see the same pixels.
    kind, settings = image_processor_settings(image_transform)
    return getattr(transformers, kind)(**settings)


def _processor(pipeline: Stage2Pipeline):
    """``Blip2Processor``, or ``InstructBlipProcessor`` (with the Q-Former's tokenizer)."""
    from transformers import Blip2Processor, InstructBlipProcessor

    image_processor = _image_processor(pipeline.image_transform)
    tokenizer = copy.deepcopy(pipeline.tokenizer)
    queries = pipeline.bridge.config.num_query_tokens
    if pipeline.qformer_tokenizer is not None:
        return InstructBlipProcessor(
            image_processor,
            tokenizer,
            copy.deepcopy(pipeline.qformer_tokenizer),
            num_query_tokens=queries,
        )
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=queries)


@torch.no_grad()
def _make_room_for_image_token(language_model: torch.nn.Module, token_id: int, pad_id: int) -> None:
    """transformers' BLIP-2 marks the soft prompt's slots with an ``<image>`` token id, which
    must be a row of the LLM's embeddings. A new row copies the pad row, so the (tied) output
    layer never prefers it over pad."""
    # Counted before resizing: transformers may resize the embedding module in place.
    old_count = language_model.get_input_embeddings().num_embeddings
    if token_id < old_count:
        return
    language_model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    weight = language_model.get_input_embeddings().weight
    weight[old_count:] = weight[pad_id]
    output = language_model.get_output_embeddings()
    if output is not None and output.weight is not weight:
        output.weight[old_count:] = output.weight[pad_id]


def export_to_transformers(pipeline: Stage2Pipeline, out: Path) -> Path:
    """Write ``out`` so that ``Blip2ForConditionalGeneration.from_pretrained(out)`` and
    ``Blip2Processor.from_pretrained(out)`` load it (needs a ``Blip2VisionModel`` encoder); an
    instruction-aware model as ``InstructBlipForConditionalGeneration`` and
    ``InstructBlipProcessor``."""
    processor = _processor(pipeline)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    language_model = copy.deepcopy(pipeline.llm.model)
    _make_room_for_image_token(language_model, image_token_id, processor.tokenizer.pad_token_id)
    save_transformers_blip2(
        pipeline.bridge,
        pipeline.vision.model,
        out,
        language_model=language_model,
        image_token_index=image_token_id,
    )
    processor.save_pretrained(out)
    return out


def export_stage1_to_transformers(pipeline: Stage1Pipeline, out: Path) -> Path:
    """Write ``out`` so that ``Blip2ForImageTextRetrieval.from_pretrained(out)``,
    ``AutoTokenizer`` and ``BlipImageProcessor`` load it (needs a ``Blip2VisionModel``
    encoder)."""
    save_transformers_blip2(pipeline.model, pipeline.vision.model, out)
    pipeline.tokenizer.save_pretrained(out)
    _image_processor(pipeline.image_transform).save_pretrained(out)
    return out
