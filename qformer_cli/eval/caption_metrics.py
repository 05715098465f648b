"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, optional SPICE) via pycocoevalcap.

The numbers are the ones pycocoevalcap 1.2's ``COCOEvalCap`` reports for the same files: the
same PTB tokenization (Stanford CoreNLP 3.4.1's ``PTBTokenizer`` with ``-preserveLines
-lowerCase``, then dropping the same punctuation tokens), the same scorer classes (``Bleu(4)``,
``Meteor``, ``Rouge``, ``Cider``) called on the same dicts in the same order (ground truth image
order, captions in annotation order). What differs is only where files go:

* ``PTBTokenizer.tokenize`` writes its input file next to its jar inside site-packages; here the
  same ``java`` command runs on a file in a private temporary directory.
* ``Spice`` downloads Stanford CoreNLP on first use and keeps its temp and cache folders inside
  site-packages; here SPICE runs only when the CoreNLP 3.6.0 jars are already in pycocoevalcap's
  ``spice/lib`` (otherwise it is reported as skipped with the reason), with its input and output
  in a temporary directory and no LMDB cache.
* ``Meteor`` writes no files (it talks to its jar over pipes); it is used as it is.

Everything runs offline. Scores are in the COCO fractional scale (CIDEr 1.0, not 100).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycocoevalcap
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from qformer_cli.data.json_files import read_json, require_field, require_list, shown
from qformer_cli.data.tables import read_coco_captions_payload
from qformer_cli.errors import DataError, QformerError

ImageId = int | str
"""An image id as it appears in the JSON files; matched by exact value and type."""

BLEU_KEYS: tuple[str, ...] = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4")
CAPTION_METRICS: tuple[str, ...] = (*BLEU_KEYS, "METEOR", "ROUGE_L", "CIDEr")

PYCOCOEVALCAP_DIR = Path(next(iter(pycocoevalcap.__path__)))
PTB_TOKENIZER_JAR = PYCOCOEVALCAP_DIR / "tokenizer" / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
SPICE_DIR = PYCOCOEVALCAP_DIR / "spice"
SPICE_JAR = SPICE_DIR / "spice-1.0.jar"
# The jars pycocoevalcap's get_stanford_models() would download into spice/lib.
SPICE_CORENLP_JARS: tuple[str, ...] = (
    "stanford-corenlp-3.6.0.jar",
    "stanford-corenlp-3.6.0-models.jar",
)

# Characters Java's PTBTokenizer treats as line ends besides "\n". pycocoevalcap only replaces
# "\n", so a caption holding one of these shifts every later caption onto the wrong image; they
# are turned into spaces here (the same token boundary), which changes nothing else.
_JAVA_LINE_BREAKS = ("\r", "\x0b", "\x0c", "\u2028", "\u2029")


@dataclass(frozen=True)
class CaptionScores:
    """Corpus-level caption scores; ``skipped`` maps a metric left out to the reason."""

    scores: dict[str, float]
    num_images: int
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``metrics.json`` form: metric -> score, plus ``"skipped"`` when any was."""
        result: dict[str, Any] = dict(self.scores)
        if self.skipped:
            result["skipped"] = dict(self.skipped)
        return result


# ----------------------------------------------------------------------------- file readers


def _first_few(ids: Sequence[ImageId], limit: int = 5) -> str:
    listed = ", ".join(repr(image_id) for image_id in ids[:limit])
    return listed + (", ..." if len(ids) > limit else "")


def load_caption_ground_truth(path: Path | str) -> dict[ImageId, list[str]]:
    """Reference captions per image from a COCO-format file, as ``COCOEvalCap`` gathers them.

    Images come in the order of ``"images"`` and captions in the order of ``"annotations"``.
    Every image needs at least one caption; annotations of images not listed are ignored, as
    pycocotools ignores them.
    """
    path = Path(path)
    data = read_coco_captions_payload(path)  # a caption table reads as COCO too
    references: dict[ImageId, list[str]] = {}
    for index, image in enumerate(require_list(data, path, "images")):
        image_id = require_field(image, "id", f"{shown(path)}: images[{index}]", (int, str))
        if image_id in references:
            raise DataError(f"{path}: images[{index}]: image id {image_id!r} is listed twice")
        references[image_id] = []
    for index, annotation in enumerate(require_list(data, path, "annotations")):
        where = f"{shown(path)}: annotations[{index}]"
        image_id = require_field(annotation, "image_id", where, (int, str))
        caption = require_field(annotation, "caption", where, str)
        if image_id in references:
            references[image_id].append(caption)
    uncaptioned = [image_id for image_id, captions in references.items() if not captions]
    if uncaptioned:
        raise DataError(
            f"{path}: {len(uncaptioned)} images have no reference caption "
            f"(first: {_first_few(uncaptioned)})"
        )
    return references


def load_caption_results(path: Path | str) -> dict[ImageId, str]:
    """Captions per image from a results file ``[{"image_id": ..., "caption": str}, ...]``.

    An image captioned twice is an error naming the repeated ids.
    """
    path = Path(path)
    entries = require_list(read_json(path), path, None)
    captions: dict[ImageId, str] = {}
    repeated: list[ImageId] = []
    for index, entry in enumerate(entries):
        where = f"{shown(path)}: entry {index}"
        image_id = require_field(entry, "image_id", where, (int, str))
        if image_id in captions and image_id not in repeated:
            repeated.append(image_id)
        captions[image_id] = require_field(entry, "caption", where, str)
    if repeated:
        raise DataError(
            f"{path}: {len(repeated)} images have more than one caption; one hypothesis per "
            f"image is scored (first: {_first_few(repeated)})"
        )
    return captions


def check_one_caption_per_image(
    references: Mapping[ImageId, Sequence[str]], predictions: Mapping[ImageId, str], source: str
) -> None:
    """Raise :class:`DataError` unless every ground truth image, and no other, has a caption."""
    missing = [image_id for image_id in references if image_id not in predictions]
    if missing:
        raise DataError(
            f"{source}: {len(missing)} of {len(references)} images have no caption "
            f"(first missing image ids: {_first_few(missing)})"
        )
    unknown = [image_id for image_id in predictions if image_id not in references]
    if unknown:
        raise DataError(
            f"{source}: {len(unknown)} captioned images are not in the ground truth "
            f"(first: {_first_few(unknown)})"
        )


# ----------------------------------------------------------------------------- tokenization


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise QformerError(
            "java was not found on PATH: the COCO caption metrics need it for PTB tokenization "
            "and METEOR (install a Java runtime, e.g. openjdk-17-jre-headless)"
        )
    return java


def _run_java(arguments: Sequence[str], cwd: Path, what: str) -> str:
    """Run ``java`` with ``arguments`` in ``cwd``; its stdout as UTF-8 text."""
    completed = subprocess.run(
        [_require_java(), *arguments],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if completed.returncode != 0:
        stderr_tail = completed.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise QformerError(f"{what} failed (exit {completed.returncode}): {' '.join(stderr_tail)}")
    return completed.stdout.decode()


def _one_line(caption: str) -> str:
    """A caption as one line of tokenizer input ("\\n" -> " " as in pycocoevalcap)."""
    line = caption.replace("\n", " ")
    for line_break in _JAVA_LINE_BREAKS:
        line = line.replace(line_break, " ")
    return line


def _drop_punctuation_tokens(tokenized_line: str) -> str:
    """pycocoevalcap's post-processing of one tokenizer output line."""
    tokens = tokenized_line.rstrip().split(" ")
    return " ".join(token for token in tokens if token not in ptbtokenizer.PUNCTUATIONS)


def ptb_tokenize(captions: Mapping[ImageId, Sequence[str]]) -> dict[ImageId, list[str]]:
    """``PTBTokenizer().tokenize`` without its temp file in site-packages.

    Runs the same command (``PTBTokenizer -preserveLines -lowerCase FILE``) on the same file
    content (captions joined by newlines, UTF-8), in a private temporary directory.
    """
    owners = [image_id for image_id, texts in captions.items() for _ in texts]
    lines = [_one_line(text) for texts in captions.values() for text in texts]
    with tempfile.TemporaryDirectory(prefix="qformer-ptb-") as work_dir:
        input_file = Path(work_dir) / "captions.txt"
        input_file.write_bytes("\n".join(lines).encode())
        output = _run_java(
            [
                "-cp",
                str(PTB_TOKENIZER_JAR),
                "edu.stanford.nlp.process.PTBTokenizer",
                "-preserveLines",
                "-lowerCase",
                input_file.name,
            ],
            Path(work_dir),
            "PTB tokenization",
        )
    tokenized_lines = output.split("\n")
    if len(tokenized_lines) < len(lines) or any(tokenized_lines[len(lines) :]):
        raise QformerError(
            f"PTB tokenizer returned {len(tokenized_lines)} lines for {len(lines)} captions"
        )
    tokenized: dict[ImageId, list[str]] = {}
    for image_id, tokenized_line in zip(owners, tokenized_lines, strict=False):
        tokenized.setdefault(image_id, []).append(_drop_punctuation_tokens(tokenized_line))
    return tokenized


# ----------------------------------------------------------------------------- scorers


@contextmanager
def _meteor_scorer() -> Iterator[Meteor]:
    """pycocoevalcap's ``Meteor`` (one JVM), always shut down afterwards, even on error."""
    _require_java()
    meteor = Meteor()
    try:
        yield meteor
    finally:
        if meteor.lock.locked():  # compute_score failed half-way and kept its lock
            meteor.lock.release()
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


def _meteor(gts: dict[ImageId, list[str]], res: dict[ImageId, list[str]]) -> float:
    with _meteor_scorer() as meteor:
        try:
            score, _ = meteor.compute_score(gts, res)
        except (ValueError, OSError) as error:
            raise QformerError(f"METEOR failed: {error}") from error
    return float(score)


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run offline here, or None when its CoreNLP jars are in place."""
    missing = [name for name in SPICE_CORENLP_JARS if not (SPICE_DIR / "lib" / name).is_file()]
    if not SPICE_JAR.is_file():
        return f"{SPICE_JAR} not found"
    if missing:
        return (
            f"Stanford CoreNLP jars not found in {SPICE_DIR / 'lib'} ({', '.join(missing)}); "
            "pycocoevalcap would download them, which needs network access"
        )
    if shutil.which("java") is None:
        return "java was not found on PATH"
    return None


def _spice_entries(
    gts: dict[ImageId, list[str]], res: dict[ImageId, list[str]]
) -> list[dict[str, Any]]:
    """The SPICE jar's input, images sorted by id as pycocoevalcap's ``Spice`` sorts them."""
    return [
        {"image_id": image_id, "test": res[image_id][0], "refs": gts[image_id]}
        for image_id in sorted(gts)
    ]


def _spice_average(results: list[dict[str, Any]]) -> float:
    """Mean of the per-image ``All`` F-scores, non-numbers counting as NaN, as in ``Spice``."""

    def as_float(value: Any) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            return float("nan")

    return float(np.mean(np.array([as_float(item["scores"]["All"]["f"]) for item in results])))


def _spice(gts: dict[ImageId, list[str]], res: dict[ImageId, list[str]]) -> float:
    with tempfile.TemporaryDirectory(prefix="qformer-spice-") as work_dir:
        input_file = Path(work_dir) / "spice_input.json"
        output_file = Path(work_dir) / "spice_output.json"
        input_file.write_text(json.dumps(_spice_entries(gts, res), indent=2), encoding="utf-8")
        arguments = ["-jar", "-Xmx8G", str(SPICE_JAR), input_file.name, "-out", output_file.name]
        _run_java([*arguments, "-subset", "-silent"], Path(work_dir), "SPICE")
        results = json.loads(output_file.read_text(encoding="utf-8"))
    return _spice_average(results)


def score_tokenized(
    gts: dict[ImageId, list[str]],
    res: dict[ImageId, list[str]],
    *,
    use_meteor: bool = True,
    use_spice: bool = True,
) -> CaptionScores:
    """Run the scorers on PTB-tokenized captions (``res`` holds one caption per image)."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = dict(zip(BLEU_KEYS, (float(value) for value in bleu), strict=True))
    skipped: dict[str, str] = {}
    if use_meteor:
        scores["METEOR"] = _meteor(gts, res)
    else:
        skipped["METEOR"] = "disabled"
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    spice_reason = spice_unavailable_reason() if use_spice else "disabled"
    if spice_reason is None:
        try:
            scores["SPICE"] = _spice(gts, res)
        except (QformerError, OSError, ValueError, KeyError, TypeError) as error:
            skipped["SPICE"] = f"SPICE failed: {error}"
    else:
        skipped["SPICE"] = spice_reason
    return CaptionScores(scores=scores, num_images=len(gts), skipped=skipped)


def score_captions(
    references: Mapping[ImageId, Sequence[str]],
    predictions: Mapping[ImageId, str],
    *,
    use_meteor: bool = True,
    use_spice: bool = True,
) -> CaptionScores:
    """Score one caption per image against the references, in the references' image order."""
    if not references:
        raise DataError("no ground truth images to score")
    check_one_caption_per_image(references, predictions, "predictions")
    gts = ptb_tokenize(references)
    res = ptb_tokenize({image_id: [predictions[image_id]] for image_id in references})
    return score_tokenized(gts, res, use_meteor=use_meteor, use_spice=use_spice)


def evaluate_caption_files(
    ground_truth_path: Path | str,
    results_path: Path | str,
    skipped: Collection[ImageId] = (),
    *,
    use_meteor: bool = True,
    use_spice: bool = True,
) -> CaptionScores:
    """Score a COCO results file against COCO-format ground truth, as ``COCOEvalCap`` would;
    images in ``skipped`` (bad samples left out on purpose) are left out of the scoring."""
    references = load_caption_ground_truth(ground_truth_path)
    left_out = set(skipped)
    references = {key: value for key, value in references.items() if key not in left_out}
    predictions = load_caption_results(results_path)
    if not references:
        raise DataError(f"{ground_truth_path}: no images to score")
    check_one_caption_per_image(references, predictions, str(results_path))
    return score_captions(references, predictions, use_meteor=use_meteor, use_spice=use_spice)
