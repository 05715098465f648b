"""The training loop's pieces on a tiny objective, without a whole run: gradient accumulation,
skipping non-finite steps, the divergence stop, and signal handling at step boundaries."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from qformer_cli import checkpoint
from qformer_cli.checkpoint import CheckpointMeta
from qformer_cli.config import TrainConfig
from qformer_cli.models.config import qformer_preset
from qformer_cli.runtime import Ranks
from qformer_cli.train.loop import Preempted, StageRecipe, Trainer, TrainingDiverged

CPU = torch.device("cpu")


@dataclass
class MeanSquaredError:
    mse: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.mse

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"mse": self.mse}


class Regression(nn.Module):
    """Linear regression with a mean loss; ``on_forward`` runs inside each forward (a signal)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.on_forward = lambda: None

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> MeanSquaredError:
        self.on_forward()
        inputs, targets = batch
        return MeanSquaredError(((self.linear(inputs) - targets) ** 2).mean())


class ListLoader(list):
    def set_epoch(self, epoch: int) -> None: ...

    def skip_batches(self, count: int) -> None: ...

    def data_state(self) -> None: ...

    def restore_data_state(self, saved: None) -> None: ...


class SilentProgress:
    def start(self, *args) -> None: ...

    def update(self, *args) -> None: ...

    def stop(self) -> None: ...


def batch(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, generator=generator), torch.randn(size, 1, generator=generator)


def trainer(out_dir: Path, batches: list, **config) -> Trainer:
    torch.manual_seed(0)  # the same initial weights for every trainer
    objective = Regression()
    recipe = StageRecipe(
        name="units",
        objective=objective,
        trainable=objective,
        prepare=lambda b: b,
        loader=ListLoader(batches),
        checkpoint_meta=CheckpointMeta(stage=1, qformer=qformer_preset("tiny"), run={}),
        batch_size_of=lambda b: len(b[0]),
    )
    settings = TrainConfig(**{"warmup_steps": 0, "log_every": 1, "precision": "fp32", **config})
    return Trainer(recipe, settings, out_dir, CPU, Ranks(), SilentProgress())


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.recipe.trainable.state_dict().items()}


def test_micro_batches_step_as_their_whole_batch_once(tmp_path: Path) -> None:
    """Two halves with the loop's 1/J scaling: the gradient of the whole batch's mean loss, and
    one optimizer step for the two."""
    whole = batch(8, seed=1)
    halves = [(whole[0][:4], whole[1][:4]), (whole[0][4:], whole[1][4:])]
    accumulated = trainer(tmp_path / "a", [batch(4, seed=0)])
    one = trainer(tmp_path / "b", [batch(4, seed=0)])
    totals, images = accumulated._step(halves)
    expected, _ = one._step([whole])
    assert images == 8
    assert totals["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    # the gradients themselves (AdamW's update would hide a wrong scale)
    for mine, reference in zip(
        accumulated.recipe.trainable.parameters(), one.recipe.trainable.parameters(), strict=True
    ):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-6, atol=1e-7)
    for key, value in weights(one).items():
        torch.testing.assert_close(weights(accumulated)[key], value, rtol=1e-6, atol=1e-7)
    steps = {int(s["step"]) for s in accumulated.optimizer.state_dict()["state"].values()}
    assert steps == {1}


def test_a_nonfinite_step_changes_nothing_and_is_counted(tmp_path: Path) -> None:
    run = trainer(tmp_path, [batch(4, seed=0)])
    before = weights(run)
    inputs, targets = batch(4, seed=2)
    totals, _ = run._step([(inputs, targets * float("nan"))])
    assert totals["loss"] != totals["loss"]  # NaN, and logged as such
    for key, value in before.items():
        assert torch.equal(weights(run)[key], value), key
    assert run.optimizer.state_dict()["state"] == {}  # AdamW took no step: no moments yet
    assert (run.state.skipped_nonfinite, run.state.nonfinite_in_a_row) == (1, 1)
    run._step([(inputs, targets)])  # a finite step: applied, and the streak starts again
    assert (run.state.skipped_nonfinite, run.state.nonfinite_in_a_row) == (1, 0)
    assert not torch.equal(weights(run)["linear.weight"], before["linear.weight"])


def test_the_streak_limit_stops_with_advice(tmp_path: Path) -> None:
    run = trainer(tmp_path, [batch(4, seed=0)], max_nonfinite_steps=3)
    run.state.nonfinite_in_a_row = 2
    run._stop_if_diverged()  # below the limit: goes on
    run.state.nonfinite_in_a_row = 3
    with pytest.raises(TrainingDiverged, match=r"3 non-finite steps in a row .* lower train.lr"):
        run._stop_if_diverged()
    unlimited = trainer(tmp_path / "unlimited", [batch(4, seed=0)], max_nonfinite_steps=0)
    unlimited.state.nonfinite_in_a_row = 100
    unlimited._stop_if_diverged()


def test_a_signal_mid_step_stops_at_the_step_boundary_with_a_checkpoint(tmp_path: Path) -> None:
    """SIGTERM arriving during step 2's forward: step 2 completes, is checkpointed, and the run
    ends with exit code 128 + 15; the handlers in place before the run are back."""
    run = trainer(tmp_path, [batch(4, seed=s) for s in range(6)], max_steps=5)
    calls = []

    def signal_in_step_2() -> None:
        calls.append(1)
        if len(calls) == 2:
            run._on_signal(signal.SIGTERM, None)

    run.recipe.objective.on_forward = signal_in_step_2
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stopped:
        run.run()
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert run.state.step == 2 and len(calls) == 2
    assert [int(p.name.split("-")[1]) for p in checkpoint.list_checkpoints(tmp_path)] == [2]
    assert signal.getsignal(signal.SIGTERM) == before
