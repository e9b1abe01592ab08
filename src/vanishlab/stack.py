"""Stacked sweeps: a sweep's compatible jobs trained in one process by one Lightning loop.

A stack is K jobs whose configs differ only in what does not change the network's shape or the
data it sees: the init and its keys, the loss, the optimizer's hyperparameters (one optimizer
class) and the seed (`stack_key`). One Lightning step trains every job of the stack:

- each job keeps its own network, built and initialised under its own seed, its own loss, and
  its own batches (its data module's own shuffle generator);
- the step's loss is the sum of the jobs' losses. Their parameters are disjoint, so backward
  gives each job exactly the gradient its own loss gives it alone;
- one optimizer holds one parameter group per job, with that job's hyperparameters (lr,
  momentum, weight decay, ...), so each job's update, and its optimizer state (momentum
  buffers, Adam's moments), are its own. A scheduler scales every group as it would scale each
  job's (the scheduler is part of the stack key);
- gradient clipping is applied per job (`configure_gradient_clipping`), not over the stack.

So a stacked job runs the float operations it would run alone, and Lightning's per-step cost is
paid once for the K jobs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from vanishlab.data import MNISTDataModule, TensorBatches
from vanishlab.module import Classifier
from vanishlab.results import SEED, job_id

# Keys a stack's jobs may differ in (besides the optimizer's hyperparameters).
STACKABLE_KEYS = ("init", "loss", SEED)


def stack_key(identity: dict[str, Any]) -> str:
    """Jobs with the same key train as one stack: their identities (`results.job_identity`)
    are equal but for `STACKABLE_KEYS`, the data's seed (a copy of `seed`) and the optimizer's
    hyperparameters; the optimizer's class must match."""
    shape = copy.deepcopy(identity)
    for key in STACKABLE_KEYS:
        shape.pop(key, None)
    shape.get("data", {}).pop(SEED, None)
    shape["optimizer"] = {"_target_": identity["optimizer"]["_target_"]}
    return job_id(shape)


class StackedBatches:
    """One batch of each job per step, each from that job's own order."""

    def __init__(self, streams: list[TensorBatches]) -> None:
        self.streams = streams

    def __len__(self) -> int:
        return len(self.streams[0])

    def __iter__(self) -> Iterator[list[tuple[Tensor, Tensor]]]:
        return (list(batches) for batches in zip(*self.streams, strict=True))


class StackedData(pl.LightningDataModule):
    """The jobs' data modules as one: training yields a batch per job; validation and testing
    use the first job's splits, which are every job's (the split has its own fixed seed)."""

    def __init__(self, jobs: list[MNISTDataModule]) -> None:
        super().__init__()
        self.jobs = jobs

    def prepare_data(self) -> None:
        for job in self.jobs:
            job.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for job in self.jobs:
            job.trainer = self.trainer
            job.setup(stage)

    def state_dict(self) -> dict[str, Any]:
        return {"jobs": [job.state_dict() for job in self.jobs]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for job, state in zip(self.jobs, state_dict["jobs"], strict=True):
            job.load_state_dict(state)

    def train_dataloader(self) -> StackedBatches:
        return StackedBatches([job.train_dataloader() for job in self.jobs])

    def val_dataloader(self) -> TensorBatches:
        return self.jobs[0].val_dataloader()

    def test_dataloader(self) -> TensorBatches:
        return self.jobs[0].test_dataloader()


class StackedClassifier(pl.LightningModule):
    """K `Classifier`s trained by one Lightning loop (rules: module docstring)."""

    def __init__(self, jobs: list[Classifier]) -> None:
        super().__init__()
        self.jobs = nn.ModuleList(jobs)

    def training_step(self, batches: list[tuple[Tensor, Tensor]], batch_idx: int) -> Tensor:
        losses = [job.loss_fn(job(x), y) for job, (x, y) in zip(self.jobs, batches, strict=True)]
        return torch.stack(losses).sum()

    def configure_optimizers(self) -> dict[str, Any]:
        """One optimizer, a parameter group per job with that job's hyperparameters."""
        factories = [job.make_optimizer for job in self.jobs]
        groups = [
            {"params": list(job.parameters()), **make.keywords}
            for job, make in zip(self.jobs, factories, strict=True)
        ]
        optimizer = factories[0].func(groups)
        make_scheduler = self.jobs[0].make_scheduler
        if make_scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": make_scheduler(optimizer)}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Each job's gradient clipped as it would be alone, over its own parameters."""
        if gradient_clip_val is None:
            return
        for group in optimizer.param_groups:
            params = group["params"]
            if gradient_clip_algorithm == "value":
                nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                nn.utils.clip_grad_norm_(params, gradient_clip_val)
