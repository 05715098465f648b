"""The proof table at the end of ``make demo``: each objective's result beside the baseline it
must beat (chance, the model without its images, ITC alone), read from the runs' metrics files.

Floors fail the demo (exit 1): what a working recipe reaches with headroom and a broken mask,
loss or optimizer does not (measured over settings and seeds; README "What make demo shows").
Targets are issue #22's goals, printed met or not without failing the demo.

    python scripts/demo_summary.py runs/demo
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

# VQA question types (the VQAv2 `question_type` the sample data writes) by what they ask.
QUESTION_KINDS = {
    "number": "how many",
    "colour": "what color is the",
    "shape": "what shape is",
    "size": "what size is the",
}


@dataclass(frozen=True)
class Check:
    kind: str  # "floor" | "target"
    goal: str
    met: bool

    def __str__(self) -> str:
        return f"{self.kind} {self.goal}: {'met' if self.met else 'MISSED'}"


@dataclass(frozen=True)
class Row:
    what: str
    value: float
    baseline_name: str
    baseline: float
    checks: tuple[Check, ...] = ()


def floor(goal: str, met: bool) -> tuple[Check, ...]:
    return (Check("floor", goal, met),)


def target(goal: str, met: bool, shown: bool = True) -> tuple[Check, ...]:
    return (Check("target", goal, met),) if shown else ()


def load(out: Path, name: str) -> dict:
    return json.loads((out / name / "metrics.json").read_text())


def retrieval_rows(out: Path) -> list[Row]:
    r = load(out, "retrieval")
    chance = 100 / r["num_images"]
    rows = []
    for direction, label in (("text_to_image", "text->image"), ("image_to_text", "image->text")):
        itc, itm = r[f"{direction}_itc_only"]["R@1"], r[direction]["R@1"]
        itc_floor = floor(">= 10", itc >= 10) if direction == "text_to_image" else ()
        rows += [
            Row(f"retrieval {label} R@1, ITC", itc, "chance", chance, itc_floor),
            Row(
                f"retrieval {label} R@1, ITM re-ranked",
                itm,
                "ITC only",
                itc,
                target(">= ITC only", itm >= itc),
            ),
        ]
    pairs = r["hard_negatives"]
    itm = pairs["itm"]
    rows.append(
        Row(
            f"ITM prefers the caption to a hard negative, % ({pairs['pairs']})",
            itm,
            "chance",
            50.0,
            floor(">= 65", itm >= 65) + target(">= 75", itm >= 75),
        )
    )
    for kind, values in pairs["per_kind"].items():
        rows.append(Row(f"  one {kind} swapped: ITM (ITC)", values["itm"], "ITC", values["itc"]))
    return rows


def caption_rows(out: Path) -> list[Row]:
    real, shuffled = load(out, "caption")["CIDEr"], load(out, "caption-shuffled")["CIDEr"]
    return [
        Row(
            "caption CIDEr",
            real,
            "images shuffled",
            shuffled,
            floor(">= 1.8x", real >= 1.8 * shuffled),
        )
    ]


def vqa_rows(out: Path, run: str, label: str, targets: bool) -> list[Row]:
    """Overall (a floor), yes/no (issue #22's target: blind + 10) and each other kind of
    question (size: above blind, the target) against the same model answering blind."""
    real, blind = load(out, run), load(out, f"{run}-blind")
    overall, yes_no = real["overall"], real["per_answer_type"]["yes/no"]
    blind_yes_no = blind["per_answer_type"]["yes/no"]
    rows = [
        Row(
            f"{label} VQA accuracy",
            overall,
            "blind",
            blind["overall"],
            floor(">= blind + 5", overall >= blind["overall"] + 5),
        ),
        Row(
            "  yes/no",
            yes_no,
            "blind",
            blind_yes_no,
            target(">= blind + 10", yes_no >= blind_yes_no + 10, shown=targets),
        ),
    ]
    for kind, question_type in QUESTION_KINDS.items():
        value = real["per_question_type"][question_type]
        without = blind["per_question_type"][question_type]
        shown = targets and kind == "size"
        rows.append(
            Row(
                f"  {kind}",
                value,
                "blind",
                without,
                target("> blind", value > without, shown=shown),
            )
        )
    return rows


def main(out: Path) -> int:
    rows = [
        *retrieval_rows(out),
        *caption_rows(out),
        *vqa_rows(out, "vqa", "stage 2", targets=True),
    ]
    if (out / "vqa-instruct").is_dir():  # DEMO_INSTRUCT=1
        rows += vqa_rows(out, "vqa-instruct", "instruction-aware", targets=False)
    width = max(len(row.what) for row in rows)
    print(f"  {'':{width}}  {'model':>7}  {'baseline':>22}  check")
    for row in rows:
        baseline = f"{row.baseline_name} {row.baseline:.2f}"
        checks = "; ".join(str(check) for check in row.checks)
        print(f"  {row.what:{width}}  {row.value:7.2f}  {baseline:>22}  {checks}".rstrip())
    missed = [
        row.what.strip()
        for row in rows
        for check in row.checks
        if check.kind == "floor" and not check.met
    ]
    if missed:
        print(f"the demo's model is not grounded: {'; '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
