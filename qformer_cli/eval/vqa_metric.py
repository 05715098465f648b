"""VQAv2 accuracy, computed exactly as the reference evaluation scripts compute it.

Two variants of the reference exist and give different numbers on the same files:

``official``
    GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at its latest revision
    (a013f00, "Fixed processing answers bug"), a Python 2 script. Every answer, ground truth and
    prediction, has newlines/tabs turned into spaces and is stripped; *only when the ten ground
    truth answers disagree* are both sides passed through punctuation processing and then
    digit/article/contraction processing. When the ground truth is unanimous the comparison is
    an exact string comparison (so ``"Yes"`` does not match ``"yes"``).

``lavis``
    The copy LAVIS ships (``lavis/common/vqa_tools/vqa_eval.py``), forked before that fix and
    used for BLIP-2's published numbers. The prediction is *always* whitespace-cleaned and fully
    normalized; the ground truth answers are never whitespace-cleaned and, when they disagree,
    get punctuation processing only (no lowercasing, number words or article removal).

Everything else is shared: the punctuation set, the comma-in-number and period rules, the tables
of number words, articles and contractions, the leave-one-out average over the answers,
``min(1, matches / 3)``, and the x100 aggregation rounded to 2 decimals, overall, per answer type
and per question type, each the plain mean of per-question accuracies.

Interpreter details of the reference that change results are reproduced too: ``\\d`` matches
ASCII digits only in the Python 2 official script and any Unicode decimal digit in LAVIS
(Python 3); ``round`` rounds exact halves away from zero in Python 2 and to even in Python 3;
sums of floats are plain left-to-right additions (as in the Python versions the reference ran
on, before Python 3.12's compensated ``sum``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Literal, get_args

from qformer_cli.data.json_files import read_json, require_field, require_list, shown
from qformer_cli.data.tables import read_vqa_annotations_payload, read_vqa_questions_payload
from qformer_cli.errors import DataError, UsageError

# official / lavis: the VQAv2 accuracy (10 answers per question) as each reference computes it;
# exact: right when the normalized prediction equals any normalized reference answer (datasets
# with one or a few answers per question, where min(1, matches / 3) cannot reach 100)
MetricVariant = Literal["official", "lavis", "exact"]
VQAV2_ANSWERS_PER_QUESTION = 10
METRIC_VARIANTS: tuple[str, ...] = get_args(MetricVariant)

QuestionId = int | str
"""A question id as it appears in the JSON files; matched by exact value and type."""

# Characters handled by the reference's ``processPunctuation`` (the same 21 in both variants).
# Apostrophe and colon are *not* in the set: "don't" and "10:30" keep them.
PUNCTUATION: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')

# ``processDigitArticle``: whole words only, after lowercasing. Note "none" -> "0".
NUMBER_WORDS: Mapping[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})


def _contraction_table() -> dict[str, str]:
    """The reference's contraction map, all with ASCII apostrophes (U+0027) in both variants.

    Its quirks are kept: entries that map a word to itself ("let's", "she's"), one that maps
    the other way ("somebody'd" -> "somebodyd"), and keys with capitals ("Im", "Ive", "Id've",
    "I'dve") that can never match because words are lowercased before the lookup. The table is
    written here as ``missing-apostrophe spelling: apostrophe spelling`` pairs, one per line.
    """
    pairs = """
        aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't
        couldn'tve couldn't've|couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't
        hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't|havent haven't
        hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's
        Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've
        it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
        mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't
        mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't
        ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|shed've she'd've
        she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't
        shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
        somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll
        somebodys somebody's|someoned someone'd|someoned've someone'd've
        someone'dve someone'd've|someonell someone'll|someones someone's
        somethingd something'd|somethingd've something'd've|something'dve something'd've
        somethingll something'll|thats that's|thered there'd|thered've there'd've
        there'dve there'd've|therere there're|theres there's|theyd they'd
        theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've
        twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't
        whatll what'll|whatre what're|whats what's|whatve what've|whens when's
        whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've
        who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're
        whys why's|wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've
        wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll
        yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd
        youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've
    """
    table = {}
    for pair in pairs.replace("\n", "|").split("|"):
        if pair.strip():
            key, value = pair.split()
            table[key] = value
    return table


CONTRACTIONS: Mapping[str, str] = _contraction_table()

# The reference's ``commaStrip``: a comma between two digits anywhere in the text switches
# punctuation handling from "replace by a space" to "delete" for every punctuation mark.
_COMMA_BETWEEN_DIGITS: Mapping[str, re.Pattern[str]] = {
    "official": re.compile(r"(\d)(,)(\d)", re.ASCII),
    "lavis": re.compile(r"(\d)(,)(\d)"),
}
_COMMA_BETWEEN_DIGITS["exact"] = _COMMA_BETWEEN_DIGITS["official"]  # type: ignore[index]
# The reference's ``periodStrip`` is ``(?!<=\d)(\.)(?!\d)``: its ``(?!<=\d)`` is a lookahead (a
# typo for a lookbehind) that always succeeds at a period, so the rule is "delete every period
# not followed by a digit": "5." -> "5", "3.5" and ".5" keep theirs.
_PERIOD_NOT_BEFORE_DIGIT: Mapping[str, re.Pattern[str]] = {
    "official": re.compile(r"\.(?!\d)", re.ASCII),
    "lavis": re.compile(r"\.(?!\d)"),
}
_PERIOD_NOT_BEFORE_DIGIT["exact"] = _PERIOD_NOT_BEFORE_DIGIT["official"]  # type: ignore[index]
# The reference calls ``periodStrip.sub("", text, re.UNICODE)``: the third positional argument
# of ``Pattern.sub`` is ``count``, and ``re.UNICODE == 32``, so at most 32 periods are deleted.
_MAX_PERIODS_DELETED = int(re.UNICODE)


def _check_variant(metric: str) -> MetricVariant:
    if metric not in METRIC_VARIANTS:
        choices = " or ".join(METRIC_VARIANTS)
        raise UsageError(f"unknown VQA metric {metric!r}: expected {choices}")
    return metric  # type: ignore[return-value]


def clean_whitespace(text: str) -> str:
    """Newlines and tabs become spaces, then the ends are stripped (the ``'answer'`` handling)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str, metric: MetricVariant = "official") -> str:
    """The reference's ``processPunctuation``.

    For each mark of :data:`PUNCTUATION`, decided on the *input* text: if the mark stands next
    to a space anywhere (``"p "`` or ``" p"``), or the text has a comma between two digits, every
    occurrence of the mark is deleted; otherwise every occurrence becomes a space. Then up to 32
    periods not followed by a digit are deleted. Spaces are not collapsed here.
    """
    has_digit_comma = _COMMA_BETWEEN_DIGITS[metric].search(text) is not None
    processed = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        processed = processed.replace(mark, "" if touches_space or has_digit_comma else " ")
    return _PERIOD_NOT_BEFORE_DIGIT[metric].sub("", processed, count=_MAX_PERIODS_DELETED)


def process_digit_article(text: str) -> str:
    """The reference's ``processDigitArticle``.

    Lowercase, split on whitespace, map number words to digits, drop the articles a/an/the
    (checked after the number mapping), expand contractions word by word, join with one space.
    """
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    kept = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in kept)


def normalize_answer(text: str, metric: MetricVariant = "official") -> str:
    """Whitespace cleaning, punctuation, then digit/article processing: the full normalization."""
    return process_digit_article(process_punctuation(clean_whitespace(text), metric))


def compared_answers(
    prediction: str, gt_answers: Sequence[str], metric: MetricVariant = "official"
) -> tuple[str, list[str]]:
    """The prediction and ground truth strings exactly as the chosen reference compares them."""
    metric = _check_variant(metric)
    if metric == "official":
        gts = [clean_whitespace(answer) for answer in gt_answers]
        if len(set(gts)) > 1:
            return normalize_answer(prediction, metric), [normalize_answer(a, metric) for a in gts]
        return clean_whitespace(prediction), gts
    gts = list(gt_answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(answer, metric) for answer in gts]
    return normalize_answer(prediction, metric), gts


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a JSON value that is equal exactly when the values are equal."""
    if isinstance(value, dict):
        return frozenset((key, _frozen(item)) for key, item in value.items())
    if isinstance(value, list):
        return tuple(_frozen(item) for item in value)
    return value


def _plain_sum(values: Iterable[float]) -> float:
    """Left-to-right float addition, as ``sum`` did before Python 3.12."""
    total = 0.0
    for value in values:
        total += value
    return total


def question_accuracy(
    prediction: str,
    answer_entries: Sequence[Mapping[str, Any]],
    metric: MetricVariant = "official",
) -> float:
    """One question's accuracy in [0, 1]: the leave-one-out average of ``min(1, matches / 3)``.

    For each ground truth entry, the reference drops from the list every entry *equal to it as a
    dict* (its answer after normalization, ``answer_id``, ``answer_confidence``, ...) and counts
    the remaining entries whose answer equals the prediction. With distinct ``answer_id`` values
    (all real VQAv2 data) that drops exactly one answer; entries that are identical dicts are
    all dropped together, as in the reference.
    """
    if not answer_entries:
        raise ValueError("a question needs at least one ground truth answer")
    if metric == "exact":
        answer = normalize_answer(prediction, "official")
        gts = [normalize_answer(entry["answer"], "official") for entry in answer_entries]
        return float(answer in gts)
    answer, gts = compared_answers(prediction, [e["answer"] for e in answer_entries], metric)
    entry_keys = [
        _frozen({**entry, "answer": gt}) for entry, gt in zip(answer_entries, gts, strict=True)
    ]
    copies = Counter(entry_keys)
    total_matches = sum(gt == answer for gt in gts)
    left_out_scores = []
    for key, gt in zip(entry_keys, gts, strict=True):
        matches = total_matches - (copies[key] if gt == answer else 0)
        left_out_scores.append(min(1.0, matches / 3))
    return _plain_sum(left_out_scores) / len(left_out_scores)


def round_like_reference(value: float, metric: MetricVariant = "official") -> float:
    """``round(value, 2)`` as the reference's interpreter does it.

    Python 2 (official) rounds the exact binary value half away from zero; Python 3 (LAVIS)
    rounds half to even. They differ only on exact ties such as 0.125.
    """
    if metric == "lavis":
        return round(value, 2)  # (exact: rounded as the official)
    return float(Decimal(value).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def _percent(accuracies: Sequence[float], metric: MetricVariant) -> float:
    return round_like_reference(100 * _plain_sum(accuracies) / len(accuracies), metric)


@dataclass(frozen=True)
class VqaAnnotation:
    """One question's ground truth: its types and its raw answer entries (usually ten)."""

    question_id: QuestionId
    question_type: str
    answer_type: str
    answers: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class VqaAccuracy:
    """VQA accuracy in percent (2 decimals), overall and per type, plus per question."""

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    metric: MetricVariant
    num_questions: int
    per_question: dict[QuestionId, float] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The ``metrics.json`` form (without the per-question accuracies)."""
        return {
            "overall": self.overall,
            "per_answer_type": dict(self.per_answer_type),
            "per_question_type": dict(self.per_question_type),
            "metric": self.metric,
            "num_questions": self.num_questions,
        }


def _group(
    annotations: Sequence[VqaAnnotation], accuracies: Sequence[float], attribute: str
) -> dict[str, list[float]]:
    """Accuracies grouped by an annotation attribute, groups in order of first appearance."""
    groups: dict[str, list[float]] = {}
    for annotation, accuracy in zip(annotations, accuracies, strict=True):
        groups.setdefault(getattr(annotation, attribute), []).append(accuracy)
    return groups


def score_vqa(
    annotations: Sequence[VqaAnnotation],
    predictions: Mapping[QuestionId, str],
    metric: MetricVariant = "official",
) -> VqaAccuracy:
    """Score predictions (question id -> answer) on every annotated question, in file order.

    Every annotated question must have a prediction (see :func:`check_coverage`); types are
    reported in order of first appearance.
    """
    metric = _check_variant(metric)
    if not annotations:
        raise DataError("no annotated questions to score")
    check_coverage([a.question_id for a in annotations], predictions.keys(), "predictions")
    accuracies = [
        question_accuracy(predictions[a.question_id], a.answers, metric) for a in annotations
    ]
    by_answer_type = _group(annotations, accuracies, "answer_type")
    by_question_type = _group(annotations, accuracies, "question_type")
    return VqaAccuracy(
        overall=_percent(accuracies, metric),
        per_answer_type={name: _percent(accs, metric) for name, accs in by_answer_type.items()},
        per_question_type={name: _percent(accs, metric) for name, accs in by_question_type.items()},
        metric=metric,
        num_questions=len(annotations),
        per_question={
            a.question_id: round_like_reference(100 * acc, metric)
            for a, acc in zip(annotations, accuracies, strict=True)
        },
    )


def _first_few(ids: Iterable[QuestionId], limit: int = 5) -> str:
    listed = list(ids)
    shown = ", ".join(repr(qid) for qid in listed[:limit])
    return shown + (", ..." if len(listed) > limit else "")


def check_coverage(
    expected_ids: Sequence[QuestionId],
    found_ids: Iterable[QuestionId],
    source: str,
    found: str = "answer",
) -> None:
    """Raise :class:`DataError` unless ``found_ids`` are exactly ``expected_ids``.

    The reference asserts the same set equality when it loads a results file; the message
    names how many ids are missing (or unexpected) and the first few, in file order.
    """
    found_set = set(found_ids)
    expected_set = set(expected_ids)
    missing = [qid for qid in expected_ids if qid not in found_set]
    if missing:
        raise DataError(
            f"{source}: {len(missing)} of {len(expected_set)} questions have no {found} "
            f"(first missing question ids: {_first_few(missing)})"
        )
    unexpected = sorted(found_set - expected_set, key=repr)
    if unexpected:
        raise DataError(
            f"{source}: {len(unexpected)} question ids with an {found} are not among the "
            f"{len(expected_set)} expected (first: {_first_few(unexpected)})"
        )


# ----------------------------------------------------------------------------- file readers


def _unique_ids(path: Path, ids: Sequence[QuestionId]) -> None:
    repeated = [qid for qid, count in Counter(ids).items() if count > 1]
    if repeated:
        raise DataError(
            f"{path}: {len(repeated)} question ids appear more than once "
            f"(first: {_first_few(repeated)})"
        )


def _read_answers(path: Path, index: int, entry: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    where = f"{shown(path)}: entry {index}"
    answers = require_field(entry, "answers", where, list)
    if not answers:
        raise DataError(f"{where}: field 'answers' is empty")
    for answer in answers:
        require_field(answer, "answer", where, str)
    return tuple(answers)


def load_vqa_annotations(path: Path | str) -> list[VqaAnnotation]:
    """Read a VQAv2 annotations file ``{"annotations": [...]}`` in file order."""
    path = Path(path)
    annotations = []
    payload = read_vqa_annotations_payload(path)  # a VQA table reads as VQAv2 too
    for index, entry in enumerate(require_list(payload, path, "annotations")):
        where = f"{shown(path)}: entry {index}"
        annotations.append(
            VqaAnnotation(
                question_id=require_field(entry, "question_id", where, (int, str)),
                question_type=require_field(entry, "question_type", where, str),
                answer_type=require_field(entry, "answer_type", where, str),
                answers=_read_answers(path, index, entry),
            )
        )
    _unique_ids(path, [a.question_id for a in annotations])
    return annotations


def _check_ten_answers(annotations: Sequence[VqaAnnotation], path: Path | str) -> None:
    """The VQAv2 accuracy needs its 10 human answers per question (with one, leave-one-out
    scores every prediction 0): refuse other counts rather than print a wrong number."""
    for annotation in annotations:
        count = len(annotation.answers)
        if count != VQAV2_ANSWERS_PER_QUESTION:
            raise DataError(
                f"{shown(path)}: question {annotation.question_id!r} has {count} answers; the "
                f"VQAv2 accuracy needs {VQAV2_ANSWERS_PER_QUESTION} per question (for other "
                "datasets use --metric exact)"
            )


def load_vqa_question_ids(path: Path | str) -> list[QuestionId]:
    """Read the question ids of a VQAv2 questions file ``{"questions": [...]}``."""
    path = Path(path)
    entries = require_list(read_vqa_questions_payload(path), path, "questions")
    ids = [
        require_field(entry, "question_id", f"{shown(path)}: entry {i}", (int, str))
        for i, entry in enumerate(entries)
    ]
    _unique_ids(path, ids)
    return ids


def load_vqa_results(path: Path | str) -> dict[QuestionId, str]:
    """Read a results file ``[{"question_id": int, "answer": str}, ...]``.

    A question answered twice is an error (the reference would silently keep the last answer).
    """
    path = Path(path)
    predictions: dict[QuestionId, str] = {}
    repeated: list[QuestionId] = []
    for index, entry in enumerate(require_list(read_json(path), path, None)):
        where = f"{shown(path)}: entry {index}"
        question_id = require_field(entry, "question_id", where, (int, str))
        if question_id in predictions:
            repeated.append(question_id)
        predictions[question_id] = require_field(entry, "answer", where, str)
    if repeated:
        raise DataError(
            f"{path}: {len(repeated)} question ids are answered more than once "
            f"(first: {_first_few(repeated)})"
        )
    return predictions


def evaluate_vqa_files(
    annotations_path: Path | str,
    results_path: Path | str,
    questions_path: Path | str | None = None,
    metric: MetricVariant = "official",
    skipped: Collection[int] = (),
    *,
    require_vqav2_answers: bool = False,
) -> VqaAccuracy:
    """Score a results file against VQAv2 annotations (and, if given, its questions file).

    The questions file, when given, must list exactly the annotated questions. The results must
    answer every annotated question and no other, except the ``skipped`` ones (bad samples
    left out on purpose), which are not scored; otherwise :class:`DataError` names how many and
    the first few ids. With ``require_vqav2_answers`` (the commands) the official and LAVIS
    variants refuse questions without exactly 10 answers, where the reference's number would
    mislead; without it (the reference's own behaviour) any count is scored.
    """
    metric = _check_variant(metric)
    annotations = load_vqa_annotations(annotations_path)
    annotated_ids = [a.question_id for a in annotations]
    if questions_path is not None:
        question_ids = load_vqa_question_ids(questions_path)
        check_coverage(question_ids, annotated_ids, str(annotations_path), found="annotation")
    if require_vqav2_answers and metric != "exact":
        _check_ten_answers(annotations, annotations_path)
    left_out = set(skipped)
    annotations = [a for a in annotations if a.question_id not in left_out]
    predictions = load_vqa_results(results_path)
    check_coverage([a.question_id for a in annotations], predictions.keys(), str(results_path))
    return score_vqa(annotations, predictions, metric)
