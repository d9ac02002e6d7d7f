"""The training loop: SGD with mmdetection's schedules, mixed precision, DDP, exact resume.

One step reads top to bottom: batch to device, forward, the criterion's flat dict of losses, a
check that each is finite, their sum backward (scaled under fp16), gradient clipping where the
preset has it, the optimiser and schedule steps, the weight average's update (``ema_decay``), a
log record. Checkpoints hold the model, the optimiser, the scaler, the weight average, the
position (epoch, step within it, iteration) and every random state, and are written atomically,
so a run killed at any moment resumes from its last checkpoint and goes on with the same losses
as an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from solo_fast.config import TrainConfig
from solo_fast.engine.checkpoint import (
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_atomically,
    write_json_atomically,
)

__all__ = ["NonFiniteLossError", "RunSettings", "Trainer", "build_optimizer", "lr_factor"]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names it, the epoch and the iteration."""


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """How a training run is executed (what it trains is in the model's ``TrainConfig``).

    Attributes:
        work_dir: Checkpoints (``latest.pt``, ``epoch_<n>.pt``) and logs (``log.jsonl``) go here.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:<local rank>"`` under torchrun); None: CUDA
            when a GPU is visible.
        amp: Mixed precision: fp16 with loss scaling on CUDA, bf16 on CPU.
        epochs: Epochs to train; None takes the config's.
        max_iters: Stop after this many iterations in total (a time budget; a checkpoint is
            written there); None trains every epoch.
        checkpoint_interval: Iterations between checkpoints (and at every epoch's end).
        keep_epoch_checkpoints: Also keep each epoch's end as ``epoch_<n>.pt`` (one model and
            optimizer state each); False keeps ``latest.pt`` only.
        log_interval: Iterations between progress lines.
        resume: Continue from ``work_dir/latest.pt`` when it exists.
        progress: Print a progress line with ETA and the losses (rank 0 only).
    """

    work_dir: str
    device: str | None = None
    amp: bool = False
    epochs: int | None = None
    max_iters: int | None = None
    checkpoint_interval: int = 100
    keep_epoch_checkpoints: bool = True
    log_interval: int = 10
    resume: bool = True
    progress: bool = True


def lr_factor(iteration: int, *, iters_per_epoch: int, warmup_iters: int, warmup_ratio: float,
              milestones: Sequence[int], gamma: float) -> float:
    """mmdetection's schedule as a factor of the base learning rate at ``iteration``.

    A linear warmup by iteration from ``warmup_ratio`` to 1 over ``warmup_iters`` (mmengine
    ``LinearLR``), times ``gamma`` for every epoch milestone reached (``MultiStepLR``, by epoch:
    milestone 8 applies from the ninth epoch, index 8, on).
    """
    warmup = 1.0
    if iteration < warmup_iters:
        warmup = warmup_ratio + (1.0 - warmup_ratio) * iteration / warmup_iters
    epoch = iteration // max(1, iters_per_epoch)
    return warmup * gamma ** sum(epoch >= milestone for milestone in milestones)


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """``train_cfg.optimizer`` over the trainable parameters, weight decay on all of them
    (mmdetection's default): SGD with momentum (every SOLO config), or AdamW (what a model
    trained from scratch on a small set, like the CPU demo's, learns faster with)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=train_cfg.lr,
                                 weight_decay=train_cfg.weight_decay)
    return torch.optim.SGD(parameters, lr=train_cfg.lr, momentum=train_cfg.momentum,
                           weight_decay=train_cfg.weight_decay)


class _SkipBatches(Sampler[list[int]]):
    """The batches of ``batch_sampler`` after the first ``skip`` (a resume inside an epoch)."""

    def __init__(self, batch_sampler, skip: int) -> None:
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self) -> Iterator[list[int]]:
        for index, batch in enumerate(self.batch_sampler):
            if index >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)


class WeightAverage:
    """An exponential moving average of a model's weights and buffers (``TrainConfig.ema_decay``).

    After step t the average keeps ``min(decay, (1 + t) / (10 + t))`` of itself and takes the rest
    from the model: the ramp keeps the random initialisation from dominating the first hundred
    steps. Integer buffers (BatchNorm's step counts) are copied. The average is a separate module
    in eval mode without gradients; it is what training returns and what evaluation loads.

    Args:
        model: The module being trained (not a DDP wrapper).
        decay: The fraction of itself the average keeps per step, in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        keep = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged, current = [], []
        for mine, theirs in zip(self.module.state_dict().values(), model.state_dict().values()):
            if mine.dtype.is_floating_point:
                averaged.append(mine)
                current.append(theirs.detach())
            else:
                mine.copy_(theirs)
        torch._foreach_lerp_(averaged, current, 1.0 - keep)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


class Trainer:
    """Trains a :class:`~solo_fast.models.detector.SOLODetector` on a loader of ``Batch``.

    Args:
        model: The detector (its ``criterion`` computes the losses).
        train_cfg: Optimiser and schedule settings (the preset's ``TrainConfig``).
        loader: A ``solo_fast.data`` training loader (``set_epoch`` and a ``batch_sampler``).
        settings: How to run.
    """

    def __init__(self, *, model: nn.Module, train_cfg: TrainConfig, loader,
                 settings: RunSettings) -> None:
        self.settings = settings
        self.train_cfg = train_cfg
        self.loader = loader
        self.device = torch.device(settings.device or
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        if self.distributed:
            self.model.criterion.sync_num_pos = True
            self.network = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.network = self.model
        self.optimizer = build_optimizer(self.model, train_cfg)
        self.average = (WeightAverage(self.model, train_cfg.ema_decay)
                        if train_cfg.ema_decay is not None else None)
        self.epochs = settings.epochs if settings.epochs is not None else train_cfg.epochs
        self.iters_per_epoch = len(loader)
        if self.iters_per_epoch == 0:
            raise ValueError("the training loader yields no batch: the data set is empty")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: lr_factor(
            it, iters_per_epoch=self.iters_per_epoch, warmup_iters=train_cfg.warmup_iters,
            warmup_ratio=train_cfg.warmup_ratio, milestones=train_cfg.lr_steps,
            gamma=train_cfg.lr_gamma))
        fp16 = settings.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.autocast_dtype = torch.float16 if fp16 else torch.bfloat16
        self.epoch, self.step_in_epoch, self.iteration = 0, 0, 0
        self.work_dir = Path(settings.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._tensorboard = None

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "iteration": self.iteration, "rng": rng_state(),
                # plain values only (a work_dir given as a Path is written as its string), so
                # that the checkpoint loads with weights_only=True
                "settings": {key: os.fspath(value) if isinstance(value, os.PathLike) else value
                             for key, value in asdict(self.settings).items()},
                **({"ema": self.average.state_dict()} if self.average is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.iteration = state["iteration"]
        if self.average is not None:
            if "ema" not in state:
                raise ValueError("the checkpoint has no weight average (it was trained without "
                                 "ema_decay); resume it without ema_decay or start a new run")
            self.average.load_state_dict(state["ema"])
        restore_rng_state(state["rng"])

    def save_checkpoint(self, *, end_of_epoch: bool = False) -> None:
        if self.rank != 0:
            return
        state = self.state_dict()
        save_atomically(state, self.work_dir / "latest.pt")
        if end_of_epoch and self.settings.keep_epoch_checkpoints:
            save_atomically(state, self.work_dir / f"epoch_{self.epoch}.pt")

    def _maybe_resume(self) -> None:
        latest = self.work_dir / "latest.pt"
        if self.settings.resume and latest.is_file():
            state = load_checkpoint(latest)
            self.load_state_dict(state)
            self._print(f"resumed from {latest}: epoch {self.epoch + 1}, step "
                        f"{self.step_in_epoch}, iteration {self.iteration}")

    # ------------------------------------------------------------------ the loop

    def fit(self) -> list[dict[str, Any]]:
        """Trains to the last epoch (or ``max_iters``); returns this call's log records."""
        self._maybe_resume()
        records: list[dict[str, Any]] = []
        self.network.train()
        start_time, start_iteration = time.perf_counter(), self.iteration
        total = self.epochs * self.iters_per_epoch
        if self.settings.max_iters is not None:
            total = min(total, self.settings.max_iters)
        while self.epoch < self.epochs and self.iteration < total:
            self.loader.set_epoch(self.epoch)
            for batch in self._batches():
                record = self.train_step(batch)
                records.append(record)
                self._log(record, start_time, start_iteration, total)
                if self.iteration % self.settings.checkpoint_interval == 0:
                    self.save_checkpoint()
                if self.iteration >= total:
                    break
            if self.step_in_epoch == self.iters_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self.save_checkpoint(end_of_epoch=True)
            elif self.iteration >= total:
                self.save_checkpoint()
        if self._tensorboard:
            self._tensorboard.flush()
        return records

    def _batches(self):
        if self.step_in_epoch == 0:
            return iter(self.loader)
        # Resuming inside an epoch: the same order (the sampler is seeded by epoch), minus the
        # batches already trained on; they are skipped without being loaded.
        loader = self.loader
        resumed = type(loader)(loader.dataset, batch_sampler=_SkipBatches(
            loader.batch_sampler, self.step_in_epoch), num_workers=loader.num_workers,
            collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)
        return iter(resumed)

    def train_step(self, batch) -> dict[str, Any]:
        """One optimisation step on one batch; returns its log record."""
        batch = batch.to(self.device)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.settings.amp else nullcontext())
        with autocast:
            outputs = self.network(batch.images)
        # Losses in float32: the focal and dice sums lose too much in half precision.
        outputs = type(outputs)(*[_to_float(value) for value in outputs])
        losses = self.model.loss(outputs, batch.targets)
        for name, value in losses.items():
            if not torch.isfinite(value):
                raise NonFiniteLossError(
                    f"{name} is {value.item()} at epoch {self.epoch + 1}, iteration "
                    f"{self.iteration + 1} (images {list(batch.image_ids)}); the last good "
                    f"checkpoint is {self.work_dir / 'latest.pt'}")
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        grad_norm = None
        if self.train_cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad],
                self.train_cfg.grad_clip).item()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.average is not None:
            self.average.update(self.model)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.iteration += 1
        self.step_in_epoch += 1
        record = {"epoch": self.epoch + 1, "iteration": self.iteration, "lr": lr,
                  **{name: _mean_over_processes(value) for name, value in losses.items()}}
        record["loss"] = sum(record[name] for name in losses)
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        return record

    # ------------------------------------------------------------------ logging

    def _print(self, message: str) -> None:
        if self.rank == 0 and self.settings.progress:
            print(message, file=sys.stderr, flush=True)

    def _log(self, record: dict[str, Any], start_time: float, start_iteration: int,
             total: int) -> None:
        if self.rank != 0:
            return
        with open(self.work_dir / "log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        writer = self._writer()
        if writer is not None:
            for name, value in record.items():
                if name not in ("epoch", "iteration"):
                    writer.add_scalar(f"train/{name}", value, record["iteration"])
        done = self.iteration - start_iteration
        if self.iteration % self.settings.log_interval == 0 or self.iteration == total:
            seconds = (time.perf_counter() - start_time) / max(1, done)
            eta = seconds * (total - self.iteration)
            losses = "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss"))
            self._print(f"[epoch {record['epoch']}/{self.epochs}  iter {self.iteration}/{total}"
                        f"  {100 * self.iteration / total:3.0f}%  ETA {_clock(eta)}]  "
                        f"lr {record['lr']:.2e}  {losses}")

    def _writer(self):
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: the JSON-lines log always exists
                self._tensorboard = False
            else:
                self._tensorboard = SummaryWriter(str(self.work_dir / "tensorboard"))
        return self._tensorboard or None


def _to_float(value):
    if isinstance(value, torch.Tensor):
        return value.float()
    return [v.float() for v in value]


def _mean_over_processes(value: torch.Tensor) -> float:
    value = value.detach().float()
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


def train_on_coco(*, preset: str, overrides: dict[str, Any], annotation_file: str,
                  image_dir: str, settings: RunSettings, batch_size: int, num_workers: int = 0,
                  seed: int = 0) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Trains a preset on a COCO-format data set (``solo-fast train``; also under torchrun).

    The class count comes from the data set unless ``overrides`` sets ``num_classes``. The run's
    preset, overrides and class names are written to ``work_dir/run.json`` so that evaluation and
    prediction can rebuild the model from the checkpoint.

    Args:
        preset: A name of :data:`solo_fast.config.PRESETS`.
        overrides: Config overrides (``--set key=value``).
        annotation_file, image_dir: The training set.
        settings: How to run.
        batch_size: Images per process and step.
        num_workers: Data-loading worker processes.
        seed: Shuffling and augmentation seed.

    Returns:
        The trained model (its weight average when ``ema_decay`` is set) and the log
        records of this call.
    """
    from solo_fast.builder import build_model
    from solo_fast.config import apply_overrides, get_preset
    from solo_fast.data import CocoInstances, build_train_loader, build_train_transform
    from solo_fast.engine.distributed import init_from_environment

    rank, world_size, device = init_from_environment(settings.device)
    config = get_preset(preset)
    train_config = apply_overrides(config, overrides).train
    dataset = CocoInstances(annotation_file=annotation_file, image_dir=image_dir, train=True,
                            seed=seed, transform=build_train_transform(
                                scales=train_config.train_scales,
                                flip_prob=train_config.flip_prob))
    overrides = {"num_classes": dataset.num_classes, **overrides}
    config = apply_overrides(config, overrides)
    if config.head.num_classes != dataset.num_classes:
        raise ValueError(f"num_classes={config.head.num_classes} but {annotation_file} has "
                         f"{dataset.num_classes} categories")
    torch.manual_seed(seed)
    model = build_model(config)
    loader = build_train_loader(dataset, batch_size=batch_size, num_workers=num_workers,
                                seed=seed, rank=rank, world_size=world_size)
    settings = RunSettings(**{**asdict(settings), "device": device})
    if rank == 0:
        Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
        run = {"preset": preset, "overrides": overrides,
               "category_names": list(dataset.category_names),
               "label_to_category_id": list(dataset.label_to_category_id)}
        write_json_atomically(run, Path(settings.work_dir) / "run.json")
    trainer = Trainer(model=model, train_cfg=config.train, loader=loader, settings=settings)
    records = trainer.fit()
    return (trainer.average.module if trainer.average is not None else model), records
