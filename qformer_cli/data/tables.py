"""Plain tables of captions or questions: JSON Lines (``.jsonl``) and CSV / TSV with a header.

A caption table has the columns ``image`` (a path relative to the image folder) and
``caption``, one row per caption; a VQA table has ``image`` and ``question`` and, when the
answers are known, ``answers`` (JSONL: a list of strings; CSV: one string, several answers
separated by ``|``) or ``answer`` (one). ``image_id`` and ``question_id`` columns are used when
present. Each table is read into the official layouts (COCO captions; VQAv2 questions and
annotations), so everything downstream reads one format. An instruction table (``image``,
``instruction``, ``response``) has no official layout and is read into samples directly.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from qformer_cli.data.json_files import read_json, shown
from qformer_cli.data.sample import BadSampleLog, Sample, ids_from_names, raise_or_skip
from qformer_cli.errors import DataError

TABLE_SUFFIXES = (".jsonl", ".csv", ".tsv")
CSV_ANSWER_SEPARATOR = "|"


def is_table(path: str | Path) -> bool:
    return Path(path).suffix.lower() in TABLE_SUFFIXES


def read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Every row with its label for messages (``file: line N``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{shown(path)}: file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        if path.suffix.lower() == ".jsonl":
            return _json_lines(path, handle)
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(handle, delimiter=delimiter)
        return [(f"{shown(path)}: line {reader.line_num}", dict(row)) for row in reader]


def _json_lines(path: Path, handle: Any) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        where = f"{shown(path)}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, found {type(row).__name__}")
        rows.append((where, row))
    return rows


def _text(row: dict[str, Any], column: str, where: str) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: missing or empty '{column}'")
    return value.strip()


def _image_ids(files: list[str], rows: list[tuple[str, dict[str, Any]]]) -> dict[str, int | str]:
    """Each image file's id: the ``image_id`` column, else the number ending its name when
    every file has a distinct one (COCO-style names), else the file path itself."""
    given = {_text(row, "image", where): row.get("image_id") for where, row in rows}
    if all(isinstance(given[f], int | str) and given[f] != "" for f in files):
        return {f: given[f] for f in files}  # type: ignore[misc]
    return dict(zip(files, ids_from_names(files), strict=True))


def caption_table_as_coco(path: str | Path) -> dict[str, Any]:
    """A caption table as a COCO captions payload (``images`` + ``annotations``)."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{shown(path)}: no rows")
    captions = [(_text(row, "image", where), _text(row, "caption", where)) for where, row in rows]
    files = list(dict.fromkeys(file for file, _ in captions))
    ids = _image_ids(files, rows)
    return {
        "images": [{"id": ids[file], "file_name": file} for file in files],
        "annotations": [
            {"id": index, "image_id": ids[file], "caption": caption}
            for index, (file, caption) in enumerate(captions)
        ],
    }


def _answers(row: dict[str, Any], where: str) -> list[str] | None:
    if "answers" in row and row["answers"] not in (None, ""):
        value = row["answers"]
        answers = value.split(CSV_ANSWER_SEPARATOR) if isinstance(value, str) else value
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: 'answers' should be a list of strings")
    elif "answer" in row and row["answer"] not in (None, ""):
        answers = [row["answer"]] if isinstance(row["answer"], str) else None
        if answers is None:
            raise DataError(f"{where}: 'answer' should be a string")
    else:
        return None
    answers = [answer.strip() for answer in answers if answer.strip()]
    if not answers:
        raise DataError(f"{where}: empty 'answers'")
    return answers


def vqa_table_as_vqav2(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A VQA table as VQAv2 payloads: questions (each also naming its ``image`` file) and,
    when every row has answers, annotations (``multiple_choice_answer``: the most frequent)."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{shown(path)}: no rows")
    files = list(dict.fromkeys(_text(row, "image", where) for where, row in rows))
    ids = _image_ids(files, rows)
    questions, annotations = [], []
    for number, (where, row) in enumerate(rows, start=1):
        file = _text(row, "image", where)
        question_id = row.get("question_id", number)
        if isinstance(question_id, str) and question_id.isdigit():
            question_id = int(question_id)  # CSV cells are text
        question = {"question_id": question_id, "image_id": ids[file], "image": file}
        questions.append({**question, "question": _text(row, "question", where)})
        answers = _answers(row, where)
        if answers is not None:
            annotations.append(_annotation(question_id, ids[file], answers, row))
    if annotations and len(annotations) != len(questions):
        raise DataError(f"{shown(path)}: some rows have answers and some do not")
    return {"questions": questions}, ({"annotations": annotations} if annotations else None)


def _annotation(
    question_id: Any, image_id: int | str, answers: list[str], row: dict[str, Any]
) -> dict[str, Any]:
    majority = max(answers, key=answers.count)
    return {
        "question_id": question_id,
        "image_id": image_id,
        "answers": [
            {"answer": answer, "answer_confidence": "yes", "answer_id": index}
            for index, answer in enumerate(answers, start=1)
        ],
        "multiple_choice_answer": majority,
        "answer_type": str(row.get("answer_type") or "other"),
        "question_type": str(row.get("question_type") or "none"),
    }


def read_coco_captions_payload(path: str | Path) -> Any:
    """A COCO captions file's JSON, or a caption table read as one."""
    return caption_table_as_coco(path) if is_table(path) else read_json(path)


def read_vqa_questions_payload(path: str | Path) -> Any:
    """A VQAv2 questions file's JSON, or a VQA table's questions read as one."""
    return vqa_table_as_vqav2(path)[0] if is_table(path) else read_json(path)


def read_vqa_annotations_payload(path: str | Path) -> Any:
    """A VQAv2 annotations file's JSON, or a VQA table's answers read as one."""
    if not is_table(path):
        return read_json(path)
    annotations = vqa_table_as_vqav2(path)[1]
    if annotations is None:
        raise DataError(f"{shown(path)}: no 'answers' or 'answer' column to score against")
    return annotations


def vqa_table_has_answers(path: str | Path) -> bool:
    return is_table(path) and vqa_table_as_vqav2(path)[1] is not None


def read_instruction_table(path: str | Path, bad: BadSampleLog | None = None) -> list[Sample]:
    """Instruction data, one sample per row: its ``image`` (relative to the table's folder)
    with the ``instruction`` as the prompt and the ``response`` to learn."""
    path = Path(path)
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{shown(path)}: no rows")
    files = [_text(row, "image", where) for where, row in rows]
    ids = _image_ids(list(dict.fromkeys(files)), rows)
    samples = []
    for (where, row), file in zip(rows, files, strict=True):
        image = path.parent / file
        image_missing = not image.is_file()
        try:
            if image_missing:
                raise DataError(f"{where}: no image {shown(image)}")
            samples.append(
                Sample(
                    image=image,
                    image_id=ids[file],
                    instruction=_text(row, "instruction", where),
                    answer=_text(row, "response", where),
                    origin=where,
                    file=file,
                )
            )
        except DataError as error:
            raise_or_skip(bad, error, "missing image" if image_missing else "missing field")
    return samples
