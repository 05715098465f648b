"""VQAv2 accuracy: every normalization rule, the leave-one-out arithmetic, aggregation, errors.

Expected scores are worked out by hand in each test from the reference scripts' rules
(GT-Vision-Lab/VQA vqaEval.py at a013f00 = "official"; LAVIS vqa_tools/vqa_eval.py = "lavis").
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qformer_cli.errors import DataError, UsageError
from qformer_cli.eval.vqa_metric import (
    ARTICLES,
    CONTRACTIONS,
    NUMBER_WORDS,
    PUNCTUATION,
    VqaAccuracy,
    VqaAnnotation,
    clean_whitespace,
    evaluate_vqa_files,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    round_like_reference,
    score_vqa,
)

VARIANTS = ("official", "lavis")


def entries(answers: list[str]) -> list[dict[str, Any]]:
    """Ground truth answer entries as in VQAv2: distinct answer ids."""
    return [
        {"answer": answer, "answer_confidence": "yes", "answer_id": index + 1}
        for index, answer in enumerate(answers)
    ]


def percent(prediction: str, answers: list[str], metric: str) -> float:
    """One question's accuracy as the reference reports it per question (x100, 2 decimals)."""
    return round(100 * question_accuracy(prediction, entries(answers), metric), 2)


# ------------------------------------------------------------------------- leave-one-out


@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        # 0 of 10 match: every left-out subset has 0 matches.
        (0, 0.0),
        # 1 matches: leaving it out -> 0/3; leaving out any of the 9 others -> 1/3.
        # (0 + 9 * 1/3) / 10 = 3/10.
        (1, 30.0),
        # 2 match: leaving out a match -> 1/3 (x2); a non-match -> 2/3 (x8).
        # (2/3 + 16/3) / 10 = 6/10.
        (2, 60.0),
        # 3 match: leaving out a match -> 2/3 (x3); a non-match -> min(1, 3/3) = 1 (x7).
        # (2 + 7) / 10 = 9/10.
        (3, 90.0),
        # 4 match: every left-out subset keeps at least 3 matches -> 1.
        (4, 100.0),
        (10, 100.0),
    ],
)
@pytest.mark.parametrize("metric", VARIANTS)
def test_leave_one_out_over_ten_answers(matching: int, expected: float, metric: str) -> None:
    answers = ["cat"] * matching + ["dog"] * (10 - matching)
    assert percent("cat", answers, metric) == expected


def test_leave_one_out_with_fewer_than_ten_answers() -> None:
    # 3 answers, all "red": each left-out subset has 2 matches -> 2/3; average 2/3.
    assert percent("red", ["red"] * 3, "official") == 66.67
    # 1 answer: leaving it out leaves nothing to match.
    assert percent("red", ["red"], "official") == 0.0


def test_identical_answer_entries_are_left_out_together() -> None:
    # The reference removes every entry *equal as a dict* to the left-out one. Without answer
    # ids, the 4 "red" entries are identical and so are the 6 "blue" ones:
    # leaving out a red drops all 4 reds -> 0 matches; leaving out a blue keeps 4 reds -> 1.
    # (4 * 0 + 6 * 1) / 10 = 0.6.
    answers = [{"answer": "red"}] * 4 + [{"answer": "blue"}] * 6
    assert question_accuracy("red", answers, "official") == pytest.approx(0.6)
    # Ten identical entries: every left-out drops all ten -> 0 (a reference quirk, kept).
    assert question_accuracy("yes", [{"answer": "yes"}] * 10, "lavis") == 0.0
    # With distinct answer ids the same answers score normally.
    assert percent("yes", ["yes"] * 10, "lavis") == 100.0


def test_entries_equal_only_after_normalization_are_left_out_together() -> None:
    # Official, disagreeing answers: "Red" and "red" both become "red", so two id-less entries
    # with the same confidence become identical dicts. Entries: 2 x red-like, 8 x "blue".
    # Leaving out a red drops both reds -> 0 matches; leaving out a blue (each blue entry is
    # identical too, so all 8 drop) keeps 2 reds -> 2/3. (2 * 0 + 8 * 2/3) / 10 = 16/30.
    answers = [{"answer": "Red"}, {"answer": "red"}] + [{"answer": "blue"}] * 8
    assert question_accuracy("red", answers, "official") == pytest.approx(16 / 30)


# ------------------------------------------------------------------------- whitespace


def test_clean_whitespace_turns_newlines_and_tabs_into_spaces_then_strips() -> None:
    assert clean_whitespace("\t yes\n") == "yes"
    assert clean_whitespace("red\nand\tblue") == "red and blue"
    assert clean_whitespace("red\r") == "red"  # str.strip() removes any whitespace at the ends


def test_prediction_whitespace_is_cleaned_in_both_variants() -> None:
    # Unanimous "yes": the prediction is stripped in both (official strips, LAVIS normalizes).
    for metric in VARIANTS:
        assert percent(" yes\n", ["yes"] * 10, metric) == 100.0


def test_ground_truth_whitespace_is_stripped_only_by_official() -> None:
    answers = ["dog "] * 3 + ["cat"] * 7
    # Official: GT stripped -> 3 x "dog": 3 matches -> 90.0.
    assert percent("dog", answers, "official") == 90.0
    # LAVIS: GT never stripped; punctuation processing keeps the space -> "dog " != "dog".
    assert percent("dog", answers, "lavis") == 0.0


def test_ground_truth_that_differs_only_in_whitespace_is_unanimous_for_official() -> None:
    # Official strips first, so {"Yes", " Yes"} is one answer: no normalization, exact match.
    answers = ["Yes"] * 9 + [" Yes"]
    assert percent("Yes", answers, "official") == 100.0
    assert percent("yes", answers, "official") == 0.0


# ------------------------------------------------------------------------- when to normalize


def test_official_compares_exactly_when_ground_truth_is_unanimous() -> None:
    assert percent("Yes", ["yes"] * 10, "official") == 0.0
    assert percent("two", ["2"] * 10, "official") == 0.0
    assert percent("the dog", ["the dog"] * 10, "official") == 100.0


def test_lavis_always_normalizes_the_prediction() -> None:
    assert percent("Yes", ["yes"] * 10, "lavis") == 100.0
    assert percent("two", ["2"] * 10, "lavis") == 100.0
    # The unanimous GT is left alone, so the normalized "dog" no longer matches "the dog".
    assert percent("the dog", ["the dog"] * 10, "lavis") == 0.0


def test_official_normalizes_both_sides_when_ground_truth_disagrees() -> None:
    # 9 x "Yes" vs 1 x "no": both sides lowercased -> 9 matches -> 100.
    assert percent("YES", ["Yes"] * 9 + ["no"], "official") == 100.0
    # Number words on both sides: "two" x 8 and "2" x 2 all become "2".
    assert percent("two", ["two"] * 8 + ["2"] * 2, "official") == 100.0


def test_lavis_gives_disagreeing_ground_truth_punctuation_processing_only() -> None:
    # GT keeps "two" (no number mapping), the prediction becomes "2": only the two "2" match.
    # 2 matches of 10 -> 60.0 (see the leave-one-out table).
    assert percent("two", ["two"] * 8 + ["2"] * 2, "lavis") == 60.0
    # GT "Yes" is not lowercased: the normalized "yes" matches nothing.
    assert percent("yes", ["Yes"] * 9 + ["no"], "lavis") == 0.0
    # GT punctuation is processed: "yes." loses its period.
    assert percent("yes", ["yes."] * 9 + ["no"], "lavis") == 100.0


def test_contraction_on_ground_truth_differs_between_variants() -> None:
    answers = ["dont"] * 5 + ["no"] * 5
    # Official: both sides become "don't" -> 5 matches -> 100.
    assert percent("dont", answers, "official") == 100.0
    # LAVIS: GT stays "dont", prediction becomes "don't" -> 0.
    assert percent("dont", answers, "lavis") == 0.0


# ------------------------------------------------------------------------- punctuation


@pytest.mark.parametrize("metric", VARIANTS)
def test_punctuation_set(metric: str) -> None:
    assert tuple(';/[]"{}()=+\\_-><@`,?!') == PUNCTUATION
    for mark in PUNCTUATION:
        # A mark between letters, touching no space, becomes a space.
        assert process_punctuation(f"a{mark}b", metric) == "a b", mark
    # Not in the set: apostrophe, colon, and others stay.
    for kept in ("don't", "10:30", "#1", "50%", "a&b", "a*b", "a|b", "a~b", "$5"):
        assert process_punctuation(kept, metric) == kept


def test_punctuation_touching_a_space_is_deleted_everywhere() -> None:
    # "-" touches a space somewhere ("- "), so every "-" is deleted, not only that one.
    assert process_punctuation("x-ray and - more") == "xray and  more"
    assert process_punctuation("black / white") == "black  white"
    assert process_punctuation("(left)") == " left "
    assert process_punctuation("on the (left)") == "on the left "


def test_each_mark_is_decided_on_its_own() -> None:
    # "/" touches no space -> space; "(" touches one (" (") -> deleted; ")" ends the text and
    # touches no space -> space.
    assert process_punctuation("a/b (c)") == "a b c "


def test_a_comma_between_digits_deletes_every_mark() -> None:
    assert process_punctuation("1,000") == "1000"
    assert process_punctuation("1,000/2") == "10002"
    assert process_punctuation("red,blue") == "red blue"
    # "1, 2": the comma touches a space (and no digit-comma-digit) -> deleted.
    assert process_punctuation("1, 2") == "1 2"


def test_period_rule_deletes_periods_not_followed_by_a_digit() -> None:
    assert process_punctuation("yes.") == "yes"
    assert process_punctuation("e.g.") == "eg"
    assert process_punctuation("5.") == "5"  # the reference's "(?!<=\d)" never fires
    assert process_punctuation("3.5") == "3.5"
    assert process_punctuation(".5") == ".5"


def test_period_rule_deletes_at_most_32_periods() -> None:
    # The reference passes re.UNICODE (= 32) as the count argument of Pattern.sub.
    assert process_punctuation("." * 40) == "." * 8
    assert process_punctuation("." * 32) == ""


def test_digits_are_ascii_for_official_and_unicode_for_lavis() -> None:
    arabic_three, arabic_four = "\u0663", "\u0664"
    # Official (Python 2 without re.UNICODE): Arabic-Indic digits are not \d.
    assert process_punctuation(f"{arabic_three}.{arabic_four}", "official") == "\u0663\u0664"
    assert process_punctuation(f"{arabic_three},{arabic_four}", "official") == "\u0663 \u0664"
    # LAVIS (Python 3): they are.
    assert process_punctuation(f"{arabic_three}.{arabic_four}", "lavis") == "\u0663.\u0664"
    assert process_punctuation(f"{arabic_three},{arabic_four}", "lavis") == "\u0663\u0664"


# ------------------------------------------------------------------------- digits, articles


def test_number_words_become_digits_as_whole_words() -> None:
    assert NUMBER_WORDS["none"] == "0"
    assert process_digit_article("Two Dogs") == "2 dogs"
    assert process_digit_article("none") == "0"
    assert process_digit_article("zero one ten") == "0 1 10"
    for unchanged in ("eleven", "twenty", "twos", "2nd"):
        assert process_digit_article(unchanged) == unchanged
    # Punctuation runs first: "one-way" -> "one way" -> "1 way".
    assert normalize_answer("one-way") == "1 way"


def test_articles_are_dropped_after_lowercasing() -> None:
    assert {"a", "an", "the"} == ARTICLES
    assert process_digit_article("The Cat") == "cat"
    assert process_digit_article("an apple and a pear") == "apple and pear"
    assert process_digit_article("A an THE") == ""
    assert process_digit_article("another theme") == "another theme"


def test_words_are_split_on_any_whitespace_and_joined_by_one_space() -> None:
    assert process_digit_article("  red \t\n blue  ") == "red blue"


# ------------------------------------------------------------------------- contractions


def test_contractions_expand_with_ascii_apostrophes() -> None:
    assert process_digit_article("dont") == "don't"
    assert process_digit_article("isnt it") == "isn't it"
    assert process_digit_article("whats up") == "what's up"
    assert process_digit_article("twas") == "'twas"
    assert all("\u2019" not in key + value for key, value in CONTRACTIONS.items())
    # A curly apostrophe is not in the table and not punctuation: left as it is.
    assert normalize_answer("don\u2019t") == "don\u2019t"


def test_contraction_table_quirks() -> None:
    # Capitalized keys can never match: words are lowercased before the lookup.
    assert process_digit_article("Im") == "im"
    assert process_digit_article("Ive") == "ive"
    # One entry removes the apostrophe, two map a word to itself.
    assert process_digit_article("somebody'd") == "somebodyd"
    assert process_digit_article("let's") == "let's"
    assert process_digit_article("she's") == "she's"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def test_tables_equal_the_reference_tables() -> None:
    # SHA-256 of json.dumps(table, sort_keys=True) for the dicts/lists in GT-Vision-Lab/VQA
    # vqaEval.py (a013f00) and LAVIS vqa_eval.py, which hold the same tables.
    assert len(CONTRACTIONS) == 120
    assert _digest(dict(CONTRACTIONS)) == (
        "52771f672b95913f862aae058e42219f9e1e4d7af64475a5cdf394301acf67a9"
    )
    assert _digest(dict(NUMBER_WORDS)) == (
        "524585ba19275a54801633a9f163e061695c76ac5cd9f19c2c335f94ba8d68bb"
    )
    assert _digest(list(PUNCTUATION)) == (
        "3b9f2ee76c69e88435f0c6025b28651351f579aa1c9eefc94c702552a2ee7a89"
    )


# ------------------------------------------------------------------------- aggregation


def annotation(qid: int, answer_type: str, question_type: str, answers: list[str]):
    return VqaAnnotation(qid, question_type, answer_type, tuple(entries(answers)))


def test_overall_per_answer_type_and_per_question_type() -> None:
    annotations = [
        annotation(1, "yes/no", "is the", ["yes"] * 10),  # "yes" -> 100
        annotation(2, "yes/no", "is the", ["yes"] + ["no"] * 9),  # "yes", 1 match -> 30
        annotation(3, "number", "how many", ["3"] * 3 + ["4"] * 7),  # "3", 3 matches -> 90
    ]
    predictions = {1: "yes", 2: "yes", 3: "3"}
    result = score_vqa(annotations, predictions, "official")
    assert result.to_dict() == {
        "overall": 73.33,  # (1 + 0.3 + 0.9) / 3 = 0.7333...
        "per_answer_type": {"yes/no": 65.0, "number": 90.0},  # (1 + 0.3) / 2, 0.9
        "per_question_type": {"is the": 65.0, "how many": 90.0},
        "metric": "official",
        "num_questions": 3,
    }
    assert result.per_question == {1: 100.0, 2: 30.0, 3: 90.0}


def test_rounding_follows_each_reference_interpreter() -> None:
    # 1 of 32 questions right: 100 * 1 / 32 = 3.125 exactly, a tie at 2 decimals.
    # Python 2 (official) rounds it away from zero, Python 3 (LAVIS) to the even 3.12.
    annotations = [annotation(qid, "other", "what", ["cat"] * 10) for qid in range(32)]
    predictions = {qid: "cat" if qid == 0 else "dog" for qid in range(32)}
    assert score_vqa(annotations, predictions, "official").overall == 3.13
    assert score_vqa(annotations, predictions, "lavis").overall == 3.12
    # 2.675 is stored below the tie, so both give 2.67.
    assert round_like_reference(2.675, "official") == round_like_reference(2.675, "lavis") == 2.67


def test_score_needs_every_annotated_question() -> None:
    annotations = [annotation(qid, "other", "what", ["cat"] * 10) for qid in range(10)]
    with pytest.raises(
        DataError, match=r"7 of 10 questions have no answer .*3, 4, 5, 6, 7, \.\.\."
    ):
        score_vqa(annotations, {0: "cat", 1: "cat", 2: "cat"})


# ------------------------------------------------------------------------- files


def write_files(tmp_path: Path, results: Any) -> tuple[Path, Path, Path]:
    meta = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}}
    questions = {**meta, "questions": [{"question_id": q, "image_id": 1} for q in (11, 12)]}
    annotations = {
        **meta,
        "annotations": [
            {
                "question_id": 11,
                "image_id": 1,
                "question_type": "what color is the",
                "answer_type": "other",
                "answers": entries(["Red."] * 6 + ["dark red"] * 4),
            },
            {
                "question_id": 12,
                "image_id": 1,
                "question_type": "how many",
                "answer_type": "number",
                "answers": entries(["2"] * 10),
            },
        ],
    }
    paths = tmp_path / "questions.json", tmp_path / "annotations.json", tmp_path / "results.json"
    for path, content in zip(paths, (questions, annotations, results), strict=True):
        path.write_text(json.dumps(content))
    return paths


def test_evaluate_files_both_variants(tmp_path: Path) -> None:
    results = [{"question_id": 11, "answer": "red"}, {"question_id": 12, "answer": "two"}]
    questions, annotations, results_path = write_files(tmp_path, results)
    # Q11 official: disagreeing GT normalized -> 6 x "red" -> 100. Q12: unanimous "2",
    # exact comparison with "two" -> 0. Overall 50.
    official = evaluate_vqa_files(annotations, results_path, questions, "official")
    assert official.to_dict() == {
        "overall": 50.0,
        "per_answer_type": {"other": 100.0, "number": 0.0},
        "per_question_type": {"what color is the": 100.0, "how many": 0.0},
        "metric": "official",
        "num_questions": 2,
    }
    # LAVIS: Q11 GT "Red." -> "Red" (punctuation only) != "red" -> 0; Q12 "two" -> "2" -> 100.
    lavis = evaluate_vqa_files(annotations, results_path, questions, "lavis")
    assert (lavis.overall, lavis.per_answer_type) == (50.0, {"other": 0.0, "number": 100.0})
    assert isinstance(lavis, VqaAccuracy)


def test_missing_questions_are_counted_and_named(tmp_path: Path) -> None:
    questions, annotations, results = write_files(tmp_path, [{"question_id": 12, "answer": "2"}])
    with pytest.raises(DataError) as error:
        evaluate_vqa_files(annotations, results, questions)
    assert str(error.value) == (
        f"{results}: 1 of 2 questions have no answer (first missing question ids: 11)"
    )


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ({"question_id": 11}, r"expected a JSON list, got dict"),
        ([{"question_id": 11}], r"entry 0: missing field 'answer'"),
        ([{"question_id": 11, "answer": 2}], r"entry 0: field 'answer' should be str, got int"),
        ([{"question_id": True, "answer": "x"}], r"entry 0: field 'question_id' should be int"),
        (["red"], r"entry 0: expected a JSON object, got str"),
        (
            [{"question_id": q, "answer": "x"} for q in (11, 12, 11)],
            r"1 question ids are answered more than once \(first: 11\)",
        ),
        (
            [{"question_id": q, "answer": "x"} for q in (11, 12, 99)],
            r"1 question ids with an answer are not among the 2 expected \(first: 99\)",
        ),
    ],
)
def test_malformed_results_name_the_file_and_entry(
    tmp_path: Path, results: Any, message: str
) -> None:
    questions, annotations, results_path = write_files(tmp_path, results)
    with pytest.raises(DataError, match=message) as error:
        evaluate_vqa_files(annotations, results_path, questions)
    assert str(error.value).startswith(str(results_path))
    assert "\n" not in str(error.value)


def test_unreadable_json_is_a_data_error(tmp_path: Path) -> None:
    questions, annotations, results = write_files(tmp_path, [])
    results.write_text("[{")
    with pytest.raises(DataError, match=r"results.json: malformed JSON"):
        evaluate_vqa_files(annotations, results, questions)


def test_malformed_annotations_name_the_entry(tmp_path: Path) -> None:
    questions, annotations, results = write_files(tmp_path, [])
    data = json.loads(annotations.read_text())
    data["annotations"][1]["answers"] = []
    annotations.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations.json: entry 1: field 'answers' is empty"):
        evaluate_vqa_files(annotations, results, questions)


def test_questions_and_annotations_must_agree(tmp_path: Path) -> None:
    questions, annotations, results = write_files(tmp_path, [])
    data = json.loads(questions.read_text())
    data["questions"].append({"question_id": 13, "image_id": 1})
    questions.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"1 of 3 questions have no annotation .*13"):
        evaluate_vqa_files(annotations, results, questions)


# ------------------------------------------------------------------------- properties

TRICKY_TOKENS = [
    "yes", "Yes", "no", "two", "2", "none", "0", "the", "a", "an", "dog", "red", "dont",
    "don't", "Im", "1,000", "1000", "3.5", "5.", ".", ",", "!", "?", "-", "/", "(", ")",
    "'", ":", "e.g.", "somebody'd", "x-ray", '"', "@", ";", "1,2", "ten", " ", "\t", "\n",
    "\u0663,\u0664", "\u00a0", "\u2028", "\u0130", "." * 33,
]  # fmt: skip
answer_text = st.one_of(
    st.text(max_size=12),
    st.lists(st.sampled_from(TRICKY_TOKENS), max_size=4).map(" ".join),
    st.lists(st.sampled_from(TRICKY_TOKENS), max_size=4).map("".join),
)
variant = st.sampled_from(VARIANTS)


@settings(max_examples=300, deadline=None)
@given(text=st.text(), metric=variant)
def test_normalization_never_crashes_and_returns_single_spaced_words(text: str, metric) -> None:
    normalized = normalize_answer(text, metric)
    assert normalized == " ".join(normalized.split())
    assert process_digit_article(normalized) == normalized  # digit/article step is idempotent


@settings(max_examples=200, deadline=None)
@given(
    prediction=answer_text,
    answers=st.lists(answer_text, min_size=1, max_size=10),
    metric=variant,
)
def test_accuracy_is_a_multiple_of_one_thirtieth_at_most_one(prediction, answers, metric) -> None:
    accuracy = question_accuracy(prediction, entries(answers), metric)
    assert 0.0 <= accuracy <= 1.0
    if len(answers) == 10:
        assert math.isclose(accuracy * 30, round(accuracy * 30), abs_tol=1e-9)


@settings(max_examples=200, deadline=None)
@given(prediction=answer_text, answer=answer_text)
def test_official_with_unanimous_answers_is_exact_match(prediction: str, answer: str) -> None:
    expected = 1.0 if clean_whitespace(prediction) == clean_whitespace(answer) else 0.0
    assert question_accuracy(prediction, entries([answer] * 10), "official") == expected


# ------------------------------------------------------------------------- agreement

# An independent transliteration of the two reference scripts' logic (processPunctuation,
# processDigitArticle, the evaluate() loop with in-place answer mutation and dict-equality
# leave-one-out, setAccuracy), sharing only the tables verified above.


class ReferenceTransliteration:
    def __init__(self, metric: str) -> None:
        self.metric = metric
        flags = re.ASCII if metric == "official" else 0  # Python 2 vs Python 3 "\d"
        self.period_strip = re.compile(r"(?!<=\d)(\.)(?!\d)", flags)
        self.comma_strip = re.compile(r"(\d)(\,)(\d)", flags)
        self.punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                      ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip
        self.manual_map = dict(NUMBER_WORDS)
        self.articles = ["a", "an", "the"]

    def process_punctuation(self, in_text: str) -> str:
        out_text = in_text
        for p in self.punct:
            if (p + " " in in_text or " " + p in in_text) or (
                re.search(self.comma_strip, in_text) is not None
            ):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        return self.period_strip.sub("", out_text, re.UNICODE)  # count=32, as in the reference

    def process_digit_article(self, in_text: str) -> str:
        out_text = []
        for word in in_text.lower().split():
            word = self.manual_map.setdefault(word, word)
            if word not in self.articles:
                out_text.append(word)
        for word_id, word in enumerate(out_text):
            if word in CONTRACTIONS:
                out_text[word_id] = CONTRACTIONS[word]
        return " ".join(out_text)

    def round(self, value: float) -> float:
        if self.metric == "lavis":
            return round(value, 2)
        scaled = Fraction(value) * 100  # Python 2: exact value, halves away from zero
        whole = math.floor(scaled)
        return float(Fraction(whole + (1 if scaled - whole >= Fraction(1, 2) else 0), 100))

    def question(self, res_ans: str, answers: list[dict[str, Any]]) -> float:
        answers = [dict(answer) for answer in answers]
        if self.metric == "official":
            for ans_dic in answers:
                ans_dic["answer"] = ans_dic["answer"].replace("\n", " ").replace("\t", " ").strip()
        res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
        if self.metric == "lavis":
            res_ans = self.process_digit_article(self.process_punctuation(res_ans))
        if len({ans["answer"] for ans in answers}) > 1:
            for ans_dic in answers:
                ans_dic["answer"] = self.process_punctuation(ans_dic["answer"])
                if self.metric == "official":
                    ans_dic["answer"] = self.process_digit_article(ans_dic["answer"])
            if self.metric == "official":
                res_ans = self.process_digit_article(self.process_punctuation(res_ans))
        gt_acc = []
        for gt_ans_datum in answers:
            other_gt_ans = [item for item in answers if item != gt_ans_datum]
            matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
            gt_acc.append(min(1, float(len(matching_ans)) / 3))
        total = 0.0
        for acc in gt_acc:
            total += acc
        return total / len(gt_acc)

    def overall(self, cases: list[tuple[str, list[dict[str, Any]]]]) -> float:
        total = 0.0
        for prediction, answers in cases:
            total += self.question(prediction, answers)
        return self.round(100 * total / len(cases))


def answer_entry_lists() -> st.SearchStrategy[list[dict[str, Any]]]:
    with_ids = st.lists(answer_text, min_size=1, max_size=10).map(entries)
    without_ids = st.lists(
        st.fixed_dictionaries({"answer": answer_text, "answer_confidence": st.sampled_from("ym")}),
        min_size=1,
        max_size=10,
    )
    return st.one_of(with_ids, without_ids)


@settings(max_examples=300, deadline=None)
@given(
    cases=st.lists(st.tuples(answer_text, answer_entry_lists()), min_size=1, max_size=6),
    metric=variant,
)
def test_agrees_with_a_transliteration_of_the_reference(cases, metric: str) -> None:
    reference = ReferenceTransliteration(metric)
    for prediction, answers in cases:
        assert question_accuracy(prediction, answers, metric) == reference.question(
            prediction, answers
        )
    annotations = [
        VqaAnnotation(qid, "what", "other", tuple(answers))
        for qid, (_, answers) in enumerate(cases)
    ]
    predictions = {qid: prediction for qid, (prediction, _) in enumerate(cases)}
    assert score_vqa(annotations, predictions, metric).overall == reference.overall(cases)


def test_unknown_metric_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="expected official or lavis"):
        question_accuracy("yes", entries(["yes"] * 10), "vqav1")  # type: ignore[arg-type]
