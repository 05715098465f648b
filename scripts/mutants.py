"""Mutation check: does the test suite fail when the toolkit is wrong?

Each mutant is one deliberate bug, written as exact text replacements in one source file. For
each mutant the script copies the checkout's tracked files (``git ls-files``) into a scratch
directory, applies the bug there (never in the checkout), runs the tests that target it with
``python -m pytest -x -q`` and records whether they failed (caught) or passed (missed).

    python scripts/mutants.py            # every mutant, its targeted tests (a few minutes)
    python scripts/mutants.py --full     # every mutant against the whole tests/ suite (slow,
                                         # authoritative: what ``make test`` would say)
    python scripts/mutants.py --only itm_labels_swapped --json
    python scripts/mutants.py --list

First the targeted tests run once without any mutant: they must pass there, or a failure would
prove nothing (exit 2). An old text that is not found exactly once is an error (exit 2): a mutant
can never silently stop applying when the code it breaks is edited. Exit 1 when any mutant is
missed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
# pytest -q prints "FAILED tests/x.py::test_y - ..." or "ERROR tests/x.py::test_y - ..."
FIRST_FAILURE = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (old text, new text); each old text occurs once
    tests: tuple[str, ...]  # test files or node ids that should catch it
    what: str


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "optimizer_step_removed",
        "qformer_cli/train/loop.py",
        (("            self.scaler.step(self.optimizer)\n", "            pass\n"),),
        ("tests/train/test_learning.py::test_stage1_lowers_itc_and_itg",),
        "the trainer never applies its gradients",
    ),
    Mutant(
        "itg_label_smoothing_changed",
        "qformer_cli/losses.py",
        (("        label_smoothing=LABEL_SMOOTHING,\n", "        label_smoothing=0.0,\n"),),
        ("tests/train/test_lavis_parity.py::test_blip2_settings_give_lavis_losses_and_gradients",),
        "ITG cross-entropy without BLIP-2's label smoothing 0.1",
    ),
    Mutant(
        "itg_causal_mask_bidirectional",
        "qformer_cli/models/qformer.py",
        (
            (
                "        text_sees_text = text_sees_text & causal\n",
                "        text_sees_text = text_sees_text\n",
            ),
        ),
        ("tests/models/test_qformer_patterns.py", "tests/train/test_lavis_parity.py"),
        "ITG text tokens see the tokens after them",
    ),
    Mutant(
        "itc_targets_off_by_one",
        "qformer_cli/losses.py",
        (
            (
                "    targets = torch.arange(batch, device=image_feats.device)"
                " + ranks.rank * batch\n",
                "    targets = (torch.arange(batch, device=image_feats.device) + 1) % batch"
                " + ranks.rank * batch\n",
            ),
        ),
        ("tests/test_losses.py::test_itc_matches_a_loop_reference",),
        "each image's ITC positive is the next caption in the batch",
    ),
    Mutant(
        "itm_labels_swapped",
        "qformer_cli/losses.py",
        (
            (
                "            torch.ones(batch, dtype=torch.long, device=itm_logits.device),\n"
                "            torch.zeros(2 * batch, dtype=torch.long, device=itm_logits.device),\n",
                "            torch.zeros(batch, dtype=torch.long, device=itm_logits.device),\n"
                "            torch.ones(2 * batch, dtype=torch.long, device=itm_logits.device),\n",
            ),
        ),
        (
            "tests/test_losses.py::test_itm_labels_are_positive_then_two_negatives",
            "tests/train/test_learning.py::"
            "test_stage1_itm_prefers_true_captions_to_held_out_hard_negatives",
        ),
        "ITM learns positives as non-matching and negatives as matching",
    ),
    Mutant(
        "query_ffn_bypassed",
        "qformer_cli/models/qformer.py",
        (
            (
                "            outputs.append(self.query_ffn(query_hidden))\n",
                "            outputs.append(query_hidden)\n",
            ),
        ),
        ("tests/models/test_qformer_parity.py",),
        "the queries skip their feed-forward branch",
    ),
    Mutant(
        "resume_rng_not_restored",
        "qformer_cli/train/loop.py",
        (('        torch.set_rng_state(own["torch_rng"])\n', ""),),
        (
            "tests/train/test_faults.py::"
            "test_crash_mid_step_keeps_the_last_checkpoint_and_resumes_exactly",
        ),
        "a resumed run continues with a fresh torch RNG (dropout differs from a straight run)",
    ),
    Mutant(
        "resume_generators_not_restored",
        "qformer_cli/train/loop.py",
        (
            (
                "        for key, generator in self.recipe.generators.items():\n"
                '            generator.set_state(own["generators"][key])\n',
                "",
            ),
        ),
        (
            "tests/train/test_faults.py::"
            "test_crash_mid_step_keeps_the_last_checkpoint_and_resumes_exactly",
        ),
        "a resumed run draws different ITM negatives than a straight run",
    ),
    Mutant(
        "onnx_decode_ignores_kv_cache",
        "qformer_cli/export/onnx_runtime.py",
        (
            (
                '    state.past = {\n        name.replace("present.", "past.", 1): value\n',
                "    state.past = {\n"
                '        name.replace("present.", "past.", 1): value[:, :, -1:]\n',
            ),
        ),
        ("tests/export/test_onnx_export.py::test_onnx_generation_matches_torch",),
        "the ONNX decode loop keeps only the last token of the KV cache",
    ),
    Mutant(
        "vqa_normalization_skipped",
        "qformer_cli/eval/vqa_metric.py",
        (
            (
                "    return process_digit_article(process_punctuation(clean_whitespace(text),"
                " metric))\n",
                "    return clean_whitespace(text)\n",
            ),
        ),
        ("tests/eval/test_vqa_metric.py",),
        "VQA answers are compared without punctuation/number/article normalization",
    ),
    Mutant(
        "checkpoint_written_in_place",
        "qformer_cli/checkpoint.py",
        (
            (
                '    temp = parent / f".{checkpoint_name(step)}.tmp"\n',
                "    temp = final\n",
            ),
            (
                "    if final.exists():\n"
                "        shutil.rmtree(final)\n"
                "    os.replace(temp, final)\n",
                "",
            ),
        ),
        (
            "tests/train/test_faults.py::test_crash_before_the_rename_leaves_the_previous_checkpoint",
        ),
        "a checkpoint is written straight under its final name, no temporary + rename",
    ),
)


class MutantRotted(Exception):
    """An old text is not in its file exactly once: the mutant no longer applies."""


def mutated_text(text: str, mutant: Mutant) -> str:
    """``text`` (the source of ``mutant.file``) with the mutant's edits applied."""
    for old, new in mutant.edits:
        count = text.count(old)
        if count != 1:
            raise MutantRotted(
                f"mutant {mutant.name}: {mutant.file} holds its old text {count} times, "
                f"not once:\n{old}"
            )
        text = text.replace(old, new)
    return text


def mutate(scratch: Path, mutant: Mutant) -> None:
    path = scratch / mutant.file
    path.write_text(mutated_text(path.read_text(), mutant))


def tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return [name for name in out.split("\0") if name and (ROOT / name).is_file()]


def copy_checkout(scratch: Path, files: list[str]) -> None:
    for name in files:
        target = scratch / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


@dataclass
class Outcome:
    mutant: str
    file: str
    caught: bool
    caught_by: str | None  # node id of the first failing test
    seconds: float


def run_tests(
    files: list[str], tests: list[str], mutant: Mutant | None
) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``tests`` in a scratch copy of the checkout, with ``mutant`` applied when given."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        scratch = Path(tmp)
        copy_checkout(scratch, files)
        if mutant is not None:
            mutate(scratch, mutant)
        env = dict(os.environ, PYTHONPATH=str(scratch), PYTHONDONTWRITEBYTECODE="1")
        start = time.monotonic()
        done = subprocess.run(
            [*PYTEST, *tests], cwd=scratch, env=env, capture_output=True, text=True
        )
        return done, time.monotonic() - start


def first_failure(done: subprocess.CompletedProcess) -> str:
    match = FIRST_FAILURE.search(done.stdout + done.stderr)
    return match.group(1) if match else f"pytest exit {done.returncode}"


def run_mutant(mutant: Mutant, files: list[str], full: bool) -> Outcome:
    done, seconds = run_tests(files, ["tests/"] if full else list(mutant.tests), mutant)
    if done.returncode == 0:
        return Outcome(mutant.name, mutant.file, False, None, seconds)
    # 5: nothing ran (a targeted test marked outside_ci is deselected by the project's pytest
    # addopts, so it cannot count); 3/4: pytest itself failed, e.g. a node id that is gone.
    if done.returncode not in (1, 2):
        raise RuntimeError(
            f"mutant {mutant.name}: pytest exited {done.returncode}\n{done.stdout + done.stderr}"
        )
    return Outcome(mutant.name, mutant.file, True, first_failure(done), seconds)


class BaselineFailed(Exception):
    """The targeted tests fail without any mutant: a failure would prove nothing."""


def check_baseline(chosen: list[Mutant], files: list[str], full: bool) -> None:
    tests = ["tests/"] if full else list(dict.fromkeys(t for m in chosen for t in m.tests))
    done, seconds = run_tests(files, tests, None)
    print(f"baseline (no mutant): exit {done.returncode} ({seconds:.0f} s)", file=sys.stderr)
    if done.returncode != 0:
        raise BaselineFailed(
            f"the targeted tests fail without any mutant ({first_failure(done)}):\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )


def markdown_table(outcomes: list[Outcome]) -> str:
    lines = ["| mutant | file | caught by |", "|---|---|---|"]
    for o in outcomes:
        caught = f"`{o.caught_by}`" if o.caught else "**MISSED**"
        lines.append(f"| {o.mutant} | `{o.file}` | {caught} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run this mutant only")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--full",
        action="store_true",
        help="run the whole tests/ suite per mutant instead of its targeted tests "
        "(slow; the authoritative mode)",
    )
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    unknown = [name for name in args.only or [] if name not in by_name]
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(unknown)} (see --list)")
    chosen = [by_name[name] for name in args.only] if args.only else list(MUTANTS)
    if args.list:
        for m in chosen:
            print(f"{m.name}  ({m.file}): {m.what}\n    tests: {' '.join(m.tests)}")
        return 0
    files = tracked_files()
    outcomes = []
    try:
        for mutant in chosen:  # every mutant still applies, before any test runs
            mutated_text((ROOT / mutant.file).read_text(), mutant)
        check_baseline(chosen, files, args.full)
        for mutant in chosen:
            outcome = run_mutant(mutant, files, args.full)
            status = f"caught by {outcome.caught_by}" if outcome.caught else "MISSED"
            print(f"{mutant.name}: {status} ({outcome.seconds:.0f} s)", file=sys.stderr)
            outcomes.append(outcome)
    except (MutantRotted, BaselineFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(o) for o in outcomes], indent=1))
    else:
        print(markdown_table(outcomes))
    return 0 if all(o.caught for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
