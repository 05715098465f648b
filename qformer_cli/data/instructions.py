"""Instruction-style prompts over caption and VQA data (``data.instruction_templates``).

InstructBLIP trains on existing datasets turned into instructions by templates, several per
task, so that the model follows the wording of an instruction rather than one fixed prompt.
Each caption or question gets one template, picked by a hash of its image and text: the same
sample gets the same instruction in every run, on every rank and after a resume.
"""

from __future__ import annotations

import hashlib

from qformer_cli.data.sample import Sample

CAPTION_INSTRUCTIONS = (
    "A short image caption:",
    "Describe the image briefly.",
    "Write a short description of the picture.",
    "What does the image show? Answer in one sentence.",
    "Summarize the picture in a few words.",
)
QUESTION_TEMPLATES = (
    "{}",
    "Question: {} Short answer:",
    "Q: {} A:",
    "Answer the question about the image in a few words. {}",
    "{} Give a short answer.",
)


def _pick(sample: Sample, text: str, count: int) -> int:
    digest = hashlib.blake2b(f"{sample.image_id}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def caption_instruction(sample: Sample) -> str:
    return CAPTION_INSTRUCTIONS[_pick(sample, sample.captions[0], len(CAPTION_INSTRUCTIONS))]


def question_instruction(sample: Sample) -> str:
    assert sample.question is not None
    template = QUESTION_TEMPLATES[_pick(sample, sample.question, len(QUESTION_TEMPLATES))]
    return template.format(sample.question)
