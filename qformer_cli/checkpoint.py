"""The one on-disk checkpoint format, written atomically, and ``--model PATH`` resolution.

A checkpoint is a directory ``<run>/checkpoints/step-00000100/``:

* ``model.safetensors`` -- the trainable weights, under this package's parameter names;
* ``vision.safetensors`` -- the vision tower's weights, when it was trained too
  (``train.vision_lr``), under its transformers names;
* ``config.json`` -- what is needed to rebuild the model (:class:`CheckpointMeta`: stage, step,
  Q-Former sizes, the run config it was trained with);
* ``train_state.pt`` -- optimizer, scheduler, RNG and data position (tensors and plain values
  only, read back with ``torch.load(weights_only=True)``);
* ``tokenizer/`` -- the Q-Former's tokenizer, when the stage has one;
* ``manifest.json`` -- size and SHA-256 of every file, written last.

Everything is written into a temporary sibling directory that is renamed into place, so a
crash leaves either the previous checkpoints or the complete new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qformer_cli import faults
from qformer_cli.errors import CheckpointError, UsageError
from qformer_cli.models.config import QFormerConfig

WEIGHTS = "model.safetensors"
VISION_WEIGHTS = "vision.safetensors"
# A checkpoint's metadata (CheckpointMeta). A run directory's resolved config has its own name,
# run_config.json (train/common.py RUN_CONFIG): another schema, a RunConfig alone.
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
BEST = "best"  # checkpoints/best: the best by train.keep_best_by (train.eval_every)
BEST_SUFFIX = ":best"


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint's ``config.json``: what rebuilds its model without the training run.

    On disk the keys are, in this order: ``stage``, ``qformer``, ``llm_family`` and
    ``llm_embedding_dim`` (stage 2 only), ``run``, ``step``.
    """

    stage: int  # 1: Stage1Model (Q-Former with text, heads); 2: Stage2Model (bridge to an LLM)
    qformer: QFormerConfig  # fitted to the backbones it was trained with
    # The RunConfig it was trained with, as recorded (RunConfig.to_dict()): kept a plain mapping
    # so that a checkpoint stays readable when run-config keys change; readers validate the
    # sections they use (pretrained.py: the whole RunConfig; train.common.trained_vision).
    run: dict[str, Any]
    step: int = 0  # the optimizer step it was saved at (the loop sets it: at_step)
    llm_family: str | None = None  # stage 2: "decoder-only" / "encoder-decoder"
    llm_embedding_dim: int | None = None  # stage 2: the LLM's token-embedding width

    def at_step(self, step: int) -> CheckpointMeta:
        return replace(self, step=step)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"stage": self.stage, "qformer": asdict(self.qformer)}
        if self.stage == 2:
            data["llm_family"] = self.llm_family
            data["llm_embedding_dim"] = self.llm_embedding_dim
        data["run"] = self.run
        data["step"] = self.step
        return data

    @classmethod
    def from_dict(cls, data: Any, source: Path) -> CheckpointMeta:
        """Validate a checkpoint's recorded metadata; :class:`CheckpointError` naming ``source``
        (the file) for a missing key or a value of the wrong type."""

        def refuse(problem: str) -> CheckpointError:
            return CheckpointError(f"{source}: {problem} (not a checkpoint of this package?)")

        if not isinstance(data, dict):
            raise refuse("expected a JSON object")
        stage = _entry(data, "stage", int, refuse)
        if stage not in (1, 2):
            raise refuse(f"'stage' must be 1 or 2, got {stage!r}")
        qformer = _entry(data, "qformer", dict, refuse)
        try:
            qformer_config = QFormerConfig(**qformer)
        except (TypeError, UsageError) as exc:  # TypeError: a key QFormerConfig does not have
            raise refuse(f"'qformer' is not a Q-Former config ({exc})") from None
        llm = {}
        if stage == 2:
            llm = {
                "llm_family": _entry(data, "llm_family", str, refuse),
                "llm_embedding_dim": _entry(data, "llm_embedding_dim", int, refuse),
            }
        run = _entry(data, "run", dict, refuse)
        step = _entry(data, "step", int, refuse)
        return cls(stage=stage, qformer=qformer_config, run=run, step=step, **llm)


def _entry(data: dict[str, Any], key: str, kind: type, refuse: Callable[[str], Exception]) -> Any:
    if key not in data:
        raise refuse(f"no '{key}' entry")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise refuse(f"'{key}' must be {kind.__name__}, got {value!r}")
    return value


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where checkpoint ``step`` of a run is published."""
    return Path(run_dir) / CHECKPOINTS / checkpoint_name(step)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in files
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    meta: CheckpointMeta,
    train_state: dict[str, Any] | None = None,
    extra_files: Callable[[Path], None] | None = None,
    vision_weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``run_dir/checkpoints`` atomically; return its path.
    ``vision_weights``: a trained vision tower's."""
    final = checkpoint_path(run_dir, step)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    temp = parent / f".{checkpoint_name(step)}.tmp"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    _save_tensors(weights, temp / WEIGHTS)
    if vision_weights is not None:
        _save_tensors(vision_weights, temp / VISION_WEIGHTS)
    (temp / CONFIG).write_text(json.dumps(meta.to_dict(), indent=1, default=str))
    if train_state is not None:
        torch.save(train_state, temp / TRAIN_STATE)
    if extra_files is not None:
        extra_files(temp)
    write_manifest(temp)
    _fsync_tree(temp)
    faults.maybe_fail("before_rename", step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(temp, final)
    return final


def verify_checkpoint(directory: Path) -> None:
    """Raise :class:`CheckpointError` unless every file matches the manifest."""
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: incomplete checkpoint (no {MANIFEST})") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{manifest_path}: corrupt manifest") from None
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"{path}: truncated ({path.stat().st_size} of {expected['bytes']} bytes)"
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch (corrupted)")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (temporary ones excluded)."""
    parent = Path(run_dir) / CHECKPOINTS
    if not parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in parent.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_good_checkpoint(run_dir: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint that passes verification; broken ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            if warn is not None:
                warn(f"skipping {exc}")
    return None


def keep_as_best(directory: Path) -> Path:
    """Copy checkpoint ``directory`` to ``<run>/checkpoints/best`` (``--model RUN:best``),
    replacing the previous best; written beside it and renamed, like every checkpoint."""
    parent = directory.parent
    best, temp, old = parent / BEST, parent / f".{BEST}.tmp", parent / f".{BEST}.old"
    for leftover in (temp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    shutil.copytree(directory, temp)
    _fsync_tree(temp)
    if best.exists():
        os.replace(best, old)  # a directory cannot be renamed onto a non-empty one
    os.replace(temp, best)
    shutil.rmtree(old, ignore_errors=True)
    return best


def best_of(path: Path) -> Path:
    """``RUN:best`` -> ``RUN/checkpoints/best``; any other path as it is."""
    text = str(path)
    if text.endswith(BEST_SUFFIX) and not Path(text).exists():
        return Path(text[: -len(BEST_SUFFIX)]) / CHECKPOINTS / BEST
    return Path(path)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for path in list_checkpoints(run_dir)[: -keep_last or None] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    return _load_tensors(directory / WEIGHTS)


def load_vision_weights(directory: Path) -> dict[str, torch.Tensor] | None:
    """The trained vision tower's weights of a checkpoint; None where the tower stayed frozen."""
    path = directory / VISION_WEIGHTS
    return _load_tensors(path) if path.is_file() else None


def load_config(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``config.json`` as written (see :func:`load_meta` for the typed record)."""
    try:
        return json.loads((directory / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory / CONFIG}: unreadable ({exc})") from None


def load_meta(directory: Path) -> CheckpointMeta:
    """A checkpoint's metadata, validated."""
    return CheckpointMeta.from_dict(load_config(directory), directory / CONFIG)


def load_train_state(directory: Path) -> dict[str, Any]:
    try:
        return torch.load(directory / TRAIN_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything beyond tensors and plain values
        raise CheckpointError(f"{directory / TRAIN_STATE}: unreadable ({exc})") from None


def resolve_checkpoint(path: Path) -> Path:
    """``--model PATH``: a run directory (its newest good checkpoint), ``RUN:best`` (its best
    validated checkpoint) or a checkpoint directory."""
    path = best_of(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    if (path / MANIFEST).is_file():
        verify_checkpoint(path)
        return path
    problems: list[str] = []
    newest = newest_good_checkpoint(path, warn=problems.append)
    if newest is None:
        if problems:  # checkpoints there, none usable: say why the newest is not
            raise CheckpointError(
                f"{path}: no complete checkpoint ({len(problems)} broken; the newest: "
                f"{problems[0].removeprefix('skipping ')})"
            )
        raise CheckpointError(
            f"{path}: no checkpoint found (a run directory holds checkpoints/step-N/; a "
            "checkpoint directory holds manifest.json)"
        )
    return newest
