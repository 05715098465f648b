"""The ``lavis`` VQA metric against code this project did not write: LAVIS 1.0.2's own evaluator.

The set-up downloads the ``salesforce-lavis==1.0.2`` wheel from PyPI (``pip download
--no-deps``), takes ``lavis/common/vqa_tools/vqa.py`` and ``vqa_eval.py`` out of it and loads
them by file path. Nothing of theirs is stubbed: the two files import only the standard library
(``json``, ``datetime``, ``copy``, ``sys``, ``re``), so no stand-in modules are needed. Both
sides read the same questions / annotations / results files in the official VQAv2 format.

Without network the download fails and the tests skip; under ``QFORMER_NO_SKIPS=1`` (``.ci/run``)
that skip is a failure (tests/strict_skips.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import random
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from qformer_cli.cli import app
from qformer_cli.eval.vqa_metric import evaluate_vqa_files
from tests.eval.test_vqa_metric import TRICKY_TOKENS, answer_entry_lists, answer_text

LAVIS_WHEEL_REQUIREMENT = "salesforce-lavis==1.0.2"
VQA_TOOLS = "lavis/common/vqa_tools"
QUESTION_TYPES = ("what color is the", "how many", "is the")
ANSWER_TYPES = ("other", "number", "yes/no")

Case = tuple[str, list[dict[str, Any]]]  # (prediction, ground-truth answer entries)


def _load_by_path(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():  # their regexes are written with "\d" in non-raw strings
        warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def lavis_vqa_tools(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    """(vqa, vqa_eval) modules from the LAVIS 1.0.2 wheel on PyPI."""
    download_dir = tmp_path_factory.mktemp("lavis-wheel")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    completed = subprocess.run(
        [*command, LAVIS_WHEEL_REQUIREMENT, "-d", str(download_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    wheels = sorted(download_dir.glob("salesforce_lavis-1.0.2-*.whl"))
    if completed.returncode != 0 or not wheels:
        last_line = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"cannot download {LAVIS_WHEEL_REQUIREMENT} from PyPI: {last_line}")
    extract_dir = download_dir / "extracted"
    with zipfile.ZipFile(wheels[0]) as wheel:
        for member in ("vqa.py", "vqa_eval.py"):
            wheel.extract(f"{VQA_TOOLS}/{member}", extract_dir)
    tools = extract_dir / VQA_TOOLS
    return (
        _load_by_path("lavis_reference_vqa", tools / "vqa.py"),
        _load_by_path("lavis_reference_vqa_eval", tools / "vqa_eval.py"),
    )


def write_vqa_files(directory: Path, cases: list[Case]) -> tuple[Path, Path, Path]:
    """VQAv2-format questions, annotations and results files; question ids 1000, 1001, ..."""
    meta = {
        "info": {},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "data_subtype": "val2014",
        "license": {},
    }
    questions, annotations, results = [], [], []
    for index, (prediction, answers) in enumerate(cases):
        question_id = 1000 + index
        questions.append({"question_id": question_id, "image_id": index, "question": "?"})
        annotations.append(
            {
                "question_id": question_id,
                "image_id": index,
                "question_type": QUESTION_TYPES[index % len(QUESTION_TYPES)],
                "answer_type": ANSWER_TYPES[index % len(ANSWER_TYPES)],
                "answers": answers,
            }
        )
        results.append({"question_id": question_id, "answer": prediction})
    paths = (
        directory / "questions.json",
        directory / "annotations.json",
        directory / "results.json",
    )
    contents = ({**meta, "questions": questions}, {**meta, "annotations": annotations}, results)
    for path, content in zip(paths, contents, strict=True):
        path.write_text(json.dumps(content))
    return paths


def lavis_scores(
    tools: tuple[ModuleType, ModuleType], questions: Path, annotations: Path, results: Path
) -> Any:
    """LAVIS's VQAEval after evaluate(), as its vqa task runs it (n=2 decimals)."""
    vqa_module, vqa_eval_module = tools
    with contextlib.redirect_stdout(io.StringIO()):  # its progress bar and "loading..." lines
        ground_truth = vqa_module.VQA(str(annotations), str(questions))
        predicted = ground_truth.loadRes(str(results), str(questions))
        evaluator = vqa_eval_module.VQAEval(ground_truth, predicted, n=2)
        evaluator.evaluate()
    return evaluator


@settings(max_examples=150, deadline=None)
@given(cases=st.lists(st.tuples(answer_text, answer_entry_lists()), min_size=1, max_size=8))
def test_per_question_and_per_type_accuracy_equal_lavis_vqa_eval(
    lavis_vqa_tools: tuple[ModuleType, ModuleType], cases: list[Case]
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        questions, annotations, results = write_vqa_files(Path(directory), cases)
        reference = lavis_scores(lavis_vqa_tools, questions, annotations, results)
        ours = evaluate_vqa_files(annotations, results, questions, metric="lavis")
    assert ours.per_question == reference.evalQA
    assert ours.overall == reference.accuracy["overall"]
    assert ours.per_question_type == reference.accuracy["perQuestionType"]
    assert ours.per_answer_type == reference.accuracy["perAnswerType"]


def random_answer(rng: random.Random) -> str:
    """1-4 tricky tokens (punctuation, numbers, articles, contractions, odd whitespace) joined."""
    tokens = rng.choices(TRICKY_TOKENS, k=rng.randint(1, 4))
    return rng.choice((" ", "", "\t", "  ")).join(tokens)


def random_case(rng: random.Random) -> Case:
    """A prediction and 10 answers drawn from a small pool, so that they often match."""
    pool = [random_answer(rng) for _ in range(rng.randint(1, 4))]
    answers = [rng.choice(pool) for _ in range(10)]
    prediction = rng.choice((rng.choice(pool), random_answer(rng)))
    entries = [
        {"answer": answer, "answer_confidence": "yes", "answer_id": index + 1}
        for index, answer in enumerate(answers)
    ]
    return prediction, entries


def test_eval_vqa_command_equals_lavis_vqa_eval_on_2000_questions(
    lavis_vqa_tools: tuple[ModuleType, ModuleType], tmp_path: Path
) -> None:
    rng = random.Random(16)
    cases = [random_case(rng) for _ in range(2000)]
    questions, annotations, results = write_vqa_files(tmp_path, cases)
    reference = lavis_scores(lavis_vqa_tools, questions, annotations, results)
    out_dir = tmp_path / "eval"
    command = ["eval-vqa", "--predictions", str(results), "--annotations", str(annotations)]
    outcome = CliRunner().invoke(
        app, [*command, "--questions", str(questions), "--metric", "lavis", "--out", str(out_dir)]
    )
    assert outcome.exit_code == 0, outcome.output
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["overall"] == reference.accuracy["overall"]
    assert metrics["per_question_type"] == reference.accuracy["perQuestionType"]
    assert metrics["per_answer_type"] == reference.accuracy["perAnswerType"]
    per_question = evaluate_vqa_files(annotations, results, questions, "lavis").per_question
    assert per_question == reference.evalQA
    # The cases are not all trivial: a spread of partial scores, not only 0 and 100.
    assert len(set(reference.evalQA.values())) >= 5
