"""VQAv2 files: ``{"questions": [{"question_id", "image_id", "question"}]}`` and, where the
answers are known, ``{"annotations": [{"question_id", "answers": [{"answer", ...}] x 10,
"multiple_choice_answer", "answer_type", "question_type", ...}]}``.

VQAv2 names images only by id; the image file is found in ``image_dir`` either with
``image_pattern`` (e.g. ``"COCO_val2014_{image_id:012d}.jpg"``) or, by default, as the file whose
name ends in that number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qformer_cli.data.json_files import (
    check_unique_id,
    entry_label,
    require_field,
    require_list,
    require_text,
    shown,
)
from qformer_cli.data.sample import (
    IMAGE_EXTENSIONS,
    BadSampleLog,
    Sample,
    image_id_from_name,
    raise_or_skip,
)
from qformer_cli.data.tables import read_vqa_annotations_payload, read_vqa_questions_payload
from qformer_cli.errors import DataError


@dataclass(frozen=True)
class VqaAnswers:
    answers: tuple[str, ...]
    majority: str | None
    answer_type: str | None
    question_type: str | None
    image_id: int | str | None = None  # the image the annotation names, when it names one


def read_vqa(
    questions_path: str | Path,
    annotations_path: str | Path | None,
    image_dir: str | Path,
    *,
    image_pattern: str | None = None,
    bad: BadSampleLog | None = None,
) -> list[Sample]:
    """One sample per question, in the questions file's order, with its answers when
    ``annotations_path`` is given (every question must then have an annotation)."""
    payload = read_vqa_questions_payload(questions_path)  # a VQA table reads as VQAv2 too
    questions = require_list(payload, questions_path, "questions")
    answers = _read_answers(annotations_path, bad) if annotations_path is not None else None
    find_image = ImageLocator(Path(image_dir), image_pattern)
    samples = []
    seen: dict[object, str] = {}
    for index, entry in enumerate(questions):
        where = entry_label(questions_path, "question", index, entry, "question_id")
        try:
            check_unique_id(
                seen, require_field(entry, "question_id", where, int), where, "question_id"
            )
            samples.append(_vqa_sample(entry, where, answers, annotations_path, find_image))
        except DataError as error:
            question_id = entry.get("question_id") if isinstance(entry, dict) else None
            raise_or_skip(bad, error, _reason(str(error)), question_id=question_id)
    return samples


def _reason(message: str) -> str:
    if "no image" in message:
        return "missing image"
    if "names image_id" in message:
        return "annotation for another image"
    return "missing annotation" if "no annotation" in message else "missing field"


def _vqa_sample(
    entry: Any,
    where: str,
    answers: dict[int, VqaAnswers] | None,
    annotations_path: str | Path | None,
    find_image: ImageLocator,
) -> Sample:
    question_id = require_field(entry, "question_id", where, int)
    image_id = require_field(entry, "image_id", where, (int, str))
    question = require_text(entry, "question", where)
    known = answers.get(question_id) if answers is not None else None
    if answers is not None and known is None:
        raise DataError(f"{where}: no annotation in {shown(annotations_path or '')}")
    if known is not None and known.image_id is not None and known.image_id != image_id:
        raise DataError(
            f"{where}: image_id {image_id!r}, but its annotation in "
            f"{shown(annotations_path or '')} names image_id {known.image_id!r}"
        )
    named = entry.get("image")  # a table's row names its file; VQAv2 names only the id
    image = find_image.image_dir / named if isinstance(named, str) else find_image(image_id, where)
    return Sample(
        image=image,
        file=find_image.relative(image),
        image_id=image_id,
        question=question,
        question_id=question_id,
        answers=known.answers if known else (),
        answer=known.majority if known else None,
        answer_type=known.answer_type if known else None,
        question_type=known.question_type if known else None,
        origin=where,
    )


def _read_answers(path: str | Path, bad: BadSampleLog | None) -> dict[int, VqaAnswers]:
    annotations = require_list(read_vqa_annotations_payload(path), path, "annotations")
    by_question: dict[int, VqaAnswers] = {}
    seen: dict[object, str] = {}
    for index, entry in enumerate(annotations):
        where = entry_label(path, "annotation", index, entry, "question_id")
        try:
            question_id = require_field(entry, "question_id", where, int)
            check_unique_id(seen, question_id, where, "question_id")
            by_question[question_id] = _parse_answers(entry, where)
        except DataError as error:
            raise_or_skip(bad, error, "missing field")
    return by_question


def _parse_answers(entry: dict[str, Any], where: str) -> VqaAnswers:
    raw = require_field(entry, "answers", where, list)
    answers = []
    for k, answer in enumerate(raw):
        text = answer.get("answer") if isinstance(answer, dict) else answer
        if not isinstance(text, str):
            raise DataError(f"{where}: answers[{k}] has no 'answer' text")
        answers.append(text)
    return VqaAnswers(
        answers=tuple(answers),
        majority=_optional_str(entry, "multiple_choice_answer", where),
        answer_type=_optional_str(entry, "answer_type", where),
        question_type=_optional_str(entry, "question_type", where),
        image_id=require_field(entry, "image_id", where, (int, str))
        if "image_id" in entry
        else None,
    )


def _optional_str(entry: dict[str, Any], name: str, where: str) -> str | None:
    return require_field(entry, name, where, str) if name in entry else None


class ImageLocator:
    """Finds the image file of an image id in one folder (by pattern, or by trailing number)."""

    def __init__(self, image_dir: Path, pattern: str | None) -> None:
        self.image_dir = image_dir
        self.pattern = pattern
        self._by_id: dict[int | str, Path] | None = None

    def __call__(self, image_id: int | str, where: str) -> Path:
        if self.pattern is not None:
            return self.image_dir / self.pattern.format(image_id=image_id)
        if self._by_id is None:
            self._by_id = self._index()
        path = self._by_id.get(image_id)
        if path is None:
            folder = shown(self.image_dir)
            raise DataError(f"{where}: no image for image_id {image_id} in {folder}")
        return path

    def relative(self, path: Path) -> str:
        """``path`` as written in results: relative to the image folder when inside it."""
        try:
            return path.relative_to(self.image_dir).as_posix()
        except ValueError:
            return str(path)

    def _index(self) -> dict[int | str, Path]:
        if not self.image_dir.is_dir():
            raise DataError(f"{shown(self.image_dir)}: image folder not found")
        files = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        return {image_id_from_name(p): p for p in files}
