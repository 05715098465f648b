"""Fuzzing the annotation readers: any bytes either load or raise DataError, nothing else."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qformer_cli.data import read_coco_captions, read_karpathy, read_vqa
from qformer_cli.data.sample import BadSampleLog
from qformer_cli.errors import DataError

# The keys the readers look for, so that generated objects get past the first checks.
KEYS = [
    "images", "annotations", "questions", "id", "image_id", "file_name", "caption", "image",
    "question_id", "question", "answers", "answer", "multiple_choice_answer", "answer_type",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", " ", "a.png", "x/../y.jpg", "\x00", "0", "COCO_val2014_000000000001.jpg"]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=4)), children, max_size=5
        ),
    ),
    max_leaves=25,
)


@st.composite
def annotation_bytes(draw: st.DrawFn) -> bytes:
    """JSON of schema-shaped values, sometimes cut short or with a byte flipped, or raw bytes."""
    kind = draw(st.sampled_from(["json", "cut", "flipped", "raw"]))
    if kind == "raw":
        return draw(st.binary(max_size=200))
    data = json.dumps(draw(json_values)).encode()
    if kind == "cut":
        return data[: draw(st.integers(0, len(data)))]
    if kind == "flipped" and data:
        position = draw(st.integers(0, len(data) - 1))
        return data[:position] + bytes([draw(st.integers(0, 255))]) + data[position + 1 :]
    return data


def read_every_way(folder: Path, payload: bytes, skip: bool) -> None:
    path = folder / "annotations.json"
    path.write_bytes(payload)
    for read in (
        lambda bad: read_karpathy(path, bad=bad),
        lambda bad: read_coco_captions(path, folder, bad=bad),
        lambda bad: read_vqa(path, path, folder, bad=bad),
        lambda bad: read_vqa(path, None, folder, bad=bad),
    ):
        try:
            read(BadSampleLog(skip=skip))
        except DataError as error:
            assert "\n" not in str(error)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=annotation_bytes(), skip=st.booleans())
def test_readers_load_or_raise_data_error(payload: bytes, skip: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        read_every_way(Path(folder), payload, skip)
