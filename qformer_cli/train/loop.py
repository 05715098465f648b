"""The one training loop, shared by both stages.

A stage supplies an *objective* (an ``nn.Module`` whose forward takes a prepared batch and
returns named losses with a ``total``), a function preparing a data batch (tokenize, run the
frozen vision encoder), and the data loader. The loop owns everything else: devices and DDP,
autocast, gradient accumulation, AdamW with warmup + cosine, non-finite-step skipping,
atomic checkpoints and exact resume, preemption, progress, metrics and the loss plot.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from qformer_cli import checkpoint, faults
from qformer_cli.config import TrainConfig
from qformer_cli.errors import Interrupted, QformerError, UsageError
from qformer_cli.flops import count_flops
from qformer_cli.losses import global_sum
from qformer_cli.models.backbones import VisionEncoder
from qformer_cli.runtime import (
    PRECISION_DTYPES,
    Ranks,
    autocast,
    matmul_rate,
    resolve_precision,
)
from qformer_cli.train.vision import vision_param_groups


class Losses(Protocol):
    @property
    def total(self) -> torch.Tensor: ...

    def as_dict(self) -> dict[str, torch.Tensor]: ...


class TrainingDiverged(QformerError):
    """Too many non-finite steps in a row: the run stops (exit 1) and names where to go back to."""


class Preempted(Interrupted):
    """SIGTERM / Ctrl-C: a checkpoint was written; the exit code says which signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------------------------
# Devices and processes


# --------------------------------------------------------------------------------------------
# Optimizer and schedule


def learning_rate(step: int, config: TrainConfig, total_steps: int) -> float:
    """Linear warmup from ``warmup_start_lr`` to ``lr``, then cosine down to ``min_lr``."""
    if step < config.warmup_steps:
        fraction = step / max(1, config.warmup_steps)
        return config.warmup_start_lr + fraction * (config.lr - config.warmup_start_lr)
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, config: TrainConfig, vision: VisionEncoder | None = None
) -> torch.optim.AdamW:
    """AdamW; biases, norms, embeddings of queries and the temperature get no weight decay.
    A trained ``vision`` encoder's groups carry an ``lr_scale`` (train/vision.py).

    Fused: one kernel updates every parameter (CPU and CUDA), instead of about 15 per parameter
    tensor; the same update to float rounding (1.5e-8 after three steps). On the BLIP-2 stage-1
    step (343 tensors, 187 M parameters) AdamW takes 192 ms instead of 919 on the 2-core CPU."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or "norm" in name or "query_tokens" in name or "ln_vision" in name
        (no_decay if skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if vision is not None:
        groups += vision_param_groups(vision, config)
    betas = (config.betas[0], config.betas[1])
    return torch.optim.AdamW(groups, lr=config.lr, betas=betas, fused=True)


# --------------------------------------------------------------------------------------------
# Measuring the machine (for MFU)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """The machine's achievable dense matmul rate (FLOP/s), the MFU denominator: the median of
    a few 1024^3 products (8192^3 on a GPU)."""
    return matmul_rate(device, dtype, size=1024 if device.type == "cpu" else 8192)


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_nonfinite: int = 0
    nonfinite_in_a_row: int = 0  # not saved: a resumed run starts with a fresh allowance
    best: float | None = None  # the best validation value of train.keep_best_by so far
    # samples trained on per mixture source (data.sources), on this rank
    source_seen: Counter[str] = field(default_factory=Counter)


@dataclass
class StageRecipe:
    """What a stage gives the loop."""

    name: str  # "stage1" / "stage2"
    objective: nn.Module
    trainable: nn.Module  # whose state_dict is the checkpoint's weights
    prepare: Callable[[Any], Any]  # data batch -> objective input
    # iterable of data batches with set_epoch / skip_batches / __len__ / data_state /
    # restore_data_state (a SampleLoader)
    loader: Any
    checkpoint_meta: checkpoint.CheckpointMeta  # its step is set at each save
    save_extra: Callable[[Path], None] | None = None
    batch_size_of: Callable[[Any], int] = len
    # Gradient accumulation: prepared micro-batches -> the same, carrying what they share
    # (stage 1: every micro-batch's ITC features); None: micro-batches are independent.
    accumulate: Callable[[list[Any]], list[Any]] | None = None
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    # train.eval_every: a validation pass -> {"val_...": value}, and the metric kept best by
    validate: Callable[[], dict[str, float]] | None = None
    best_metric: str = ""
    # called with the 0-based step before each optimizer step (stage 1: the ITM negatives' mix)
    start_step: Callable[[int], None] | None = None
    # the vision encoder whose tower weights every checkpoint carries (vision.safetensors): one
    # trained here (train.vision_lr; inside ``objective``, VisionInFront) or fine-tuned by the
    # run this one started from. None: the configured tower as it is.
    vision: VisionEncoder | None = None
    # after the run, its checkpoints written, on every rank: raises where the run did not train
    # what was asked (stage 1: streamed captions none of which had a listed ITM negative)
    check_result: Callable[[], None] | None = None

    @property
    def trains_vision(self) -> bool:
        return self.vision is not None and self.vision.trains


class Trainer:
    def __init__(
        self,
        recipe: StageRecipe,
        config: TrainConfig,
        out_dir: Path,
        device: torch.device,
        ranks: Ranks,
        progress: Any,
    ) -> None:
        self.recipe = recipe
        # a library caller's "auto" (the training commands decide it before building the recipe)
        config = replace(config, precision=resolve_precision(config.precision, device)[0])
        self.config = config
        self.out_dir = out_dir
        self.device = device
        self.ranks = ranks
        self.progress = progress
        self.state = TrainState()
        model = recipe.objective
        if ranks.world_size > 1:
            model = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                # a trained tower's parts after the layer read (final blocks, pooler) get none
                find_unused_parameters=recipe.trains_vision,
            )
        self.eager_model = model
        if config.compile:
            model = torch.compile(model)  # after DDP: its optimizer splits graphs at buckets
        self.model = model
        trained_vision = recipe.vision if recipe.trains_vision else None
        self.optimizer = build_optimizer(recipe.trainable, config, trained_vision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        self.steps_per_epoch = len(recipe.loader) // config.grad_accum
        if self.steps_per_epoch == 0:
            raise UsageError(
                f"not enough data for one step: {len(recipe.loader)} batches per epoch "
                f"with grad_accum {config.grad_accum}"
            )
        self.total_steps = config.max_steps or self.steps_per_epoch * config.epochs
        self.stop_signal: int | None = None
        self.history: list[dict[str, float]] = []
        self.flops_per_step: float | None = None
        self.started = time.perf_counter()
        self.peak_flops = measure_matmul_flops(device, PRECISION_DTYPES[config.precision])

    # ---- checkpoints -------------------------------------------------------------------------

    def _random_states(self) -> list[dict[str, Any]]:
        """Every rank's random streams, in rank order (a collective under torchrun).

        Each rank has its own: dropout masks of its own batch shapes advance its torch stream
        by its own amount, and stage 2 seeds its prefix splits by rank. Resuming every rank from
        rank 0's streams would train differently from the run that was not interrupted."""
        own = {
            "torch_rng": torch.get_rng_state(),
            "generators": {k: g.get_state() for k, g in self.recipe.generators.items()},
            "data": self.recipe.loader.data_state(),  # a streamed set's places; else None
        }
        if self.ranks.world_size == 1:
            return [own]
        states: list[Any] = [None] * self.ranks.world_size
        dist.all_gather_object(states, own)
        return states

    def _train_state(self, random_states: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "batch_in_epoch": self.state.batch_in_epoch,
            "skipped_nonfinite": self.state.skipped_nonfinite,
            "best": self.state.best,
            "source_seen": dict(self.state.source_seen),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "random_states": random_states,
        }

    def save(self) -> Path:
        """Write a checkpoint of this step (rank 0 writes, every rank waits); returns its path."""
        random_states = self._random_states()
        if self.ranks.rank != 0:
            self._barrier()
            return checkpoint.checkpoint_path(self.out_dir, self.state.step)
        path = checkpoint.save_checkpoint(
            self.out_dir,
            self.state.step,
            self.recipe.trainable.state_dict(),
            self.recipe.checkpoint_meta.at_step(self.state.step),
            self._train_state(random_states),
            self.recipe.save_extra,
            vision_weights=self._vision_tower().state_dict() if self.recipe.vision else None,
        )
        checkpoint.prune_checkpoints(self.out_dir, self.config.keep_last)
        self._barrier()
        return path

    def _vision_tower(self) -> nn.Module:
        assert self.recipe.vision is not None
        return self.recipe.vision.model

    def resume(self, directory: Path) -> None:
        weights = checkpoint.load_weights(directory)
        self.recipe.trainable.load_state_dict(weights)
        vision_weights = checkpoint.load_vision_weights(directory)
        if (vision_weights is None) != (self.recipe.vision is None):
            holds = "no" if vision_weights is None else "its own"
            raise UsageError(
                f"{directory}: holds {holds} vision-encoder weights; resume with the "
                "train.vision_lr and --init the run was started with"
            )
        if vision_weights is not None:
            self._vision_tower().load_state_dict(vision_weights)
        state = checkpoint.load_train_state(directory)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        # A run resumed on another number of processes cannot replay the same random streams;
        # each rank then takes the saved rank's of the same index modulo their number.
        # Checkpoints written before per-rank states kept one rank's streams at the top level.
        saved = state.get("random_states") or [
            {"torch_rng": state["torch_rng"], "generators": state["generators"]}
        ]
        own = saved[self.ranks.rank % len(saved)]
        if own.get("data") is not None and len(saved) != self.ranks.world_size:
            raise UsageError(
                f"a streamed run resumes on the {len(saved)} processes it had, "
                f"not {self.ranks.world_size}"
            )
        self.recipe.loader.restore_data_state(own.get("data"))
        torch.set_rng_state(own["torch_rng"])
        for key, generator in self.recipe.generators.items():
            generator.set_state(own["generators"][key])
        self.state = TrainState(
            step=state["step"],
            epoch=state["epoch"],
            batch_in_epoch=state["batch_in_epoch"],
            skipped_nonfinite=state["skipped_nonfinite"],
            best=state.get("best"),
            source_seen=Counter(state.get("source_seen", {})),
        )

    def _load_history(self) -> None:
        """Keep the metrics rows up to the step we (re)start from, once each.

        A crash can leave a torn last line and rows for steps after the checkpoint; both are
        dropped, so the resumed run appends to a file that reads as one clean run.
        """
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return
        rows_by_step: dict[int, dict[str, Any]] = {}
        for row in map(_parse_metrics_line, path.read_text().splitlines()):
            if row is not None and row["step"] <= self.state.step:
                rows_by_step[row["step"]] = row
        self.history = [rows_by_step[step] for step in sorted(rows_by_step)]
        if self.ranks.rank == 0:
            path.write_text("".join(json.dumps(row) + "\n" for row in self.history))

    def _barrier(self) -> None:
        if self.ranks.world_size > 1:
            dist.barrier()

    # ---- signals -----------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum  # acted on at the next step boundary

    def _should_stop(self) -> int | None:
        if faults.stop_requested(self.state.step):
            self.stop_signal = signal.SIGTERM  # as a signal would: agreed on below
        if self.ranks.world_size > 1:  # every rank agrees on the step at which to stop
            flag = torch.tensor([self.stop_signal or 0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return int(flag.item()) or None
        return self.stop_signal

    # ---- steps -------------------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[int, Any]]:
        """(epoch, batch) from the saved data position onwards."""
        loader = self.recipe.loader
        while True:
            loader.set_epoch(self.state.epoch)
            skip = self.state.batch_in_epoch * self.config.grad_accum
            loader.skip_batches(skip)
            per_epoch = self.steps_per_epoch * self.config.grad_accum  # leftovers are dropped
            for index, batch in enumerate(loader, start=skip):
                if index >= per_epoch:
                    break
                yield self.state.epoch, batch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def _prepare(self, micro_batches: list[Any]) -> list[Any]:
        """The objective's inputs for one step's micro-batches (with what the objective shares
        across them under gradient accumulation)."""
        prepared = [self.recipe.prepare(batch) for batch in micro_batches]
        if len(prepared) > 1 and self.recipe.accumulate is not None:
            with autocast(self.device, self.config.precision):
                prepared = self.recipe.accumulate(prepared)
        return prepared

    def _forward_backward(self, batch: Any, scale: float) -> dict[str, float]:
        with autocast(self.device, self.config.precision):
            losses = self.model(batch)
        total = losses.total
        if faults.fault_armed("nan_loss", self.state.step + 1):
            total = total * float("nan")
        self.scaler.scale(total * scale).backward()
        values = {k: v.detach().float().item() for k, v in losses.as_dict().items()}
        values["loss"] = total.detach().float().item()
        return values

    def _step(self, micro_batches: list[Any]) -> tuple[dict[str, float], int]:
        lr = learning_rate(self.state.step, self.config, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        if self.recipe.start_step is not None:
            self.recipe.start_step(self.state.step)
        totals: dict[str, float] = {}
        for batch in self._prepare(micro_batches):
            values = self._forward_backward(batch, 1.0 / len(micro_batches))
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value / len(micro_batches)
        totals = self._mean_over_ranks(totals)
        self.scaler.unscale_(self.optimizer)
        faults.maybe_fail("mid_step", self.state.step + 1)
        grads = [
            p.grad
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        finite = math.isfinite(totals["loss"]) and bool(
            torch.stack([torch.isfinite(g).all() for g in grads]).all()
        )
        if finite:
            self.scaler.step(self.optimizer)
            self.state.nonfinite_in_a_row = 0
        else:
            self.state.skipped_nonfinite += 1
            self.state.nonfinite_in_a_row += 1
        self.scaler.update()
        totals["lr"] = lr
        return totals, sum(self.recipe.batch_size_of(b) for b in micro_batches)

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """The mean of every rank's ``values``: each rank's loss is its share of the global
        batch's loss times R (DDP averages gradients), so the mean is the global batch's loss,
        what one process would log."""
        if self.ranks.world_size == 1:
            return values
        stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        mean = global_sum(stacked, self.ranks) / self.ranks.world_size
        return dict(zip(values, mean.tolist(), strict=True))

    def _measure_flops(self, micro_batches: list[Any]) -> None:
        # Eagerly: dynamo refuses frames under FlopCounterMode's dispatch mode, and remembers the
        # refusal, so counting through the compiled model would leave it uncompiled for good.
        compiled, self.model = self.model, self.eager_model
        try:
            self.flops_per_step, result = count_flops(lambda: self._step(micro_batches))
        finally:
            self.model = compiled
        self._after_step(*result, elapsed=None)

    def run(self, resume_from: Path | None = None) -> dict[str, Any]:
        if resume_from is not None:
            self.resume(resume_from)
        self._load_history()  # a fresh run in a used --out starts a fresh metrics file
        previous_handlers = self._install_signal_handlers()
        try:
            return self._run()
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)

    def _run(self) -> dict[str, Any]:
        # elapsed_s goes on from where a resumed run's metrics left off
        resumed_after = self.history[-1].get("elapsed_s", 0.0) if self.history else 0.0
        self.started = time.perf_counter() - resumed_after
        batches = self._batches()
        self.recipe.objective.train()
        self.progress.start(self.total_steps, self.state.step)
        while self.state.step < self.total_steps:
            micro = [next(batches)[1] for _ in range(self.config.grad_accum)]
            if self.config.log_sample_ids:
                self._log_sample_ids(micro)
            self.state.source_seen.update(
                sample.source for sample in _samples_of(micro) if sample.source
            )
            started = time.perf_counter()
            if self.flops_per_step is None and self.state.step == 0:
                self._measure_flops(micro)
            else:
                totals, images = self._step(micro)
                self._after_step(totals, images, time.perf_counter() - started)
            signum = self._should_stop()
            if signum:
                path = self.save()
                raise Preempted(
                    f"{signal.Signals(signum).name} at step {self.state.step}; "
                    f"checkpoint {path}; continue with --resume auto --out {self.out_dir}",
                    128 + signum,
                )
        self.progress.stop()
        final = self.save()
        return {"final_checkpoint": str(final), "steps": self.state.step, "history": self.history}

    def _log_sample_ids(self, micro: list[Any]) -> None:
        """One line per step: the step it will become, then the image id of every sample."""
        ids = " ".join(str(sample.image_id) for sample in _samples_of(micro))
        path = self.out_dir / f"sample_ids.rank{self.ranks.rank}.txt"
        with path.open("a") as handle:
            handle.write(f"{self.state.step + 1} {ids}\n")

    def _stop_if_diverged(self) -> None:
        limit = self.config.max_nonfinite_steps
        if not limit or self.state.nonfinite_in_a_row < limit:
            return
        last_good = checkpoint.newest_good_checkpoint(self.out_dir)
        advice = f"--resume {last_good}" if last_good else "a fresh start"
        raise TrainingDiverged(
            f"step {self.state.step}: {self.state.nonfinite_in_a_row} non-finite steps in a row "
            f"(train.max_nonfinite_steps {limit}); last good checkpoint: {last_good or 'none'}; "
            f"lower train.lr or use --precision fp32, then {advice}"
        )

    def _append_metrics(self, row: dict[str, Any]) -> None:
        line = json.dumps(row) + "\n"
        with (self.out_dir / "metrics.jsonl").open("a") as handle:

            def write_half() -> None:
                handle.write(line[: len(line) // 2])
                handle.flush()

            faults.maybe_fail("torn_metrics", self.state.step, last_words=write_half)
            handle.write(line)

    def _after_step(self, totals: dict[str, float], images: int, elapsed: float | None) -> None:
        self.state.step += 1
        self.state.batch_in_epoch += 1
        global_images = images * self.ranks.world_size
        row = dict(totals, step=self.state.step, epoch=self.state.epoch)
        row["elapsed_s"] = round(time.perf_counter() - self.started, 2)
        if elapsed:
            row["images_per_s"] = global_images / elapsed
            if self.flops_per_step:
                row["mfu"] = self.flops_per_step / elapsed / self.peak_flops
        row["skipped_nonfinite"] = self.state.skipped_nonfinite
        if self.state.source_seen:  # a mixture: each source's share of the samples so far
            seen = self.state.source_seen
            row["source_shares"] = {name: n / seen.total() for name, n in sorted(seen.items())}
        validated = self._validation_due()
        if validated:
            row.update(self._validate())
        log_now = self.state.step % self.config.log_every == 0 or self.state.step == 1
        if log_now or validated or self.state.step == self.total_steps:
            self.history.append(row)
            if self.ranks.rank == 0:
                self._append_metrics(row)
        self.progress.update(self.state.step, row)
        self._stop_if_diverged()  # before a periodic save, so no checkpoint ends a bad streak
        saved = self._keep_if_best(row) if validated else False
        periodic = self.config.save_every and self.state.step % self.config.save_every == 0
        if periodic and self.state.step < self.total_steps and not saved:
            self.save()

    # ---- validation (train.eval_every) ---------------------------------------------------------

    def _validation_due(self) -> bool:
        every = self.config.eval_every
        if not every or self.recipe.validate is None:
            return False
        return self.state.step % every == 0 or self.state.step == self.total_steps

    def _validate(self) -> dict[str, float]:
        """Every rank runs the same pass (same data, frozen encoder, no collectives), so every
        rank knows whether to save the best checkpoint, which is a collective."""
        assert self.recipe.validate is not None
        self.recipe.objective.eval()
        try:
            return self.recipe.validate()
        finally:
            self.recipe.objective.train()

    def _keep_if_best(self, row: dict[str, Any]) -> bool:
        """Save this step and copy it to ``checkpoints/best`` when its validation value of
        ``train.keep_best_by`` beats every earlier one (higher is better); True if it saved."""
        value = row[self.recipe.best_metric]
        if self.state.best is not None and value <= self.state.best:
            return False
        self.state.best = value
        path = self.save()
        if self.ranks.rank == 0:
            checkpoint.keep_as_best(path)
        self._barrier()
        return True


def _samples_of(micro: list[Any]) -> Iterator[Any]:
    """The samples of data batches that carry them (``data.Batch``); other batches have none."""
    for batch in micro:
        yield from getattr(batch, "samples", ())


def _parse_metrics_line(line: str) -> dict[str, Any] | None:
    """A metrics row, or None for a blank or torn line (a crash mid-write)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None
