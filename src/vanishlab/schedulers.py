"""Learning-rate schedules stepped every optimizer step, and the `lr_scheduler` entry that
`configure_optimizers` gives Lightning for any option of the `scheduler` group.

A `scheduler` option is a factory of the optimizer (`_partial_: true`). Its YAML says how often
it is stepped with the key `interval`: `epoch` (the default, as torch's epoch schedulers
`cosine` and `step` have it) or `step`, after every optimizer step. A factory that takes the
run's length has the key `total_steps: null`, which is given the run's optimizer steps (Lightning's
`estimated_stepping_batches`) when training starts: a step count no config key holds, since it
depends on the data's size, the batch size, `max_epochs` or `max_steps` and gradient
accumulation. Torch's `OneCycleLR` takes it so too.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytorch_lightning as pl
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

AFTER_WARMUP = ("constant", "cosine")
INTERVALS = ("epoch", "step")


def lr_scheduler(
    make_scheduler: functools.partial, optimizer: Optimizer, trainer: pl.Trainer
) -> dict[str, Any]:
    """Lightning's `lr_scheduler` dict for the `scheduler` option `make_scheduler` (its keys
    `interval` and `total_steps: null` read as the module docstring says) over `optimizer`."""
    keywords = dict(make_scheduler.keywords)
    interval = keywords.pop("interval", "epoch")
    if "total_steps" in keywords and keywords["total_steps"] is None:
        keywords["total_steps"] = trainer.estimated_stepping_batches
    scheduler = make_scheduler.func(optimizer, *make_scheduler.args, **keywords)
    return {"scheduler": scheduler, "interval": interval}


def warmup(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int,
    after: str = "constant",
    eta_min: float = 0.0,
) -> LRScheduler:
    """Each parameter group's lr rises linearly over `warmup_steps` steps to its own lr, then
    stays there (`after="constant"`) or falls along a half cosine to `eta_min` over the
    remaining `total_steps - warmup_steps` steps (`after="cosine"`).

    The rise is torch's `LinearLR(start_factor=1 / (warmup_steps + 1), total_iters=warmup_steps)`
    and the fall its `CosineAnnealingLR(T_max=total_steps - warmup_steps, eta_min=eta_min)`, in
    closed form, as one `LambdaLR` rather than their `SequentialLR`: its state holds one entry
    per parameter group and nothing nested, so a stacked job's checkpoint keeps its own
    (`stack.StackedClassifier.job_checkpoint` slices each per-group list), and a stacked job gets
    the lr sequence it gets alone, each group's own.
    """
    cosine_steps = max(total_steps - warmup_steps, 1) if after == "cosine" else None
    factors = [
        functools.partial(
            warmup_factor,
            warmup_steps=warmup_steps,
            cosine_steps=cosine_steps,
            floor=eta_min / group["lr"],
        )
        for group in optimizer.param_groups
    ]
    return LambdaLR(optimizer, factors)


def warmup_factor(step: int, warmup_steps: int, cosine_steps: int | None, floor: float) -> float:
    """The multiple of a group's lr that `warmup` gives it at optimizer step `step` (from 0):
    `(step + 1) / (warmup_steps + 1)` while warming up; then 1, or, with `cosine_steps`, the half
    cosine from 1 down to `floor` (eta_min over the group's lr), which it keeps after them."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if cosine_steps is None:
        return 1.0
    progress = min(step - warmup_steps, cosine_steps) / cosine_steps
    return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2
