"""The classifier: a network, a loss and an optimizer, trained by Lightning's own loop."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from vanishlab.losses import LossFn, mean_loss
from vanishlab.schedulers import lr_scheduler

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = functools.partial  # a `scheduler` option: `schedulers.lr_scheduler` reads it


def accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """The share of correct predictions over the batch: a scalar for a run's outputs
    `(B, classes)`, each job's `(K,)` for a stack's `(K, B, classes)`."""
    return (outputs.argmax(dim=-1) == targets).float().mean(-1)


def stage_names(stage: str) -> list[str]:
    """What a batch of `stage` logs, in `stage_metrics`' order (a stack logs its jobs' values
    under them too)."""
    return [f"{stage}/loss", f"{stage}/acc"]


def stage_metrics(stage: str, loss: Tensor, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """What a batch logs: `<stage>/loss` and `<stage>/acc`."""
    return dict(zip(stage_names(stage), (loss, accuracy(outputs, targets)), strict=True))


def logs_this_step(module: pl.LightningModule) -> bool:
    """Lightning writes on_step values when (global_step + 1) % log_every_n_steps == 0; the
    training step computes its metrics only then."""
    return (module.global_step + 1) % module.trainer.log_every_n_steps == 0


class Classifier(pl.LightningModule):
    """Trains `net` on `loss_fn` with the optimizer that `make_optimizer` builds, its learning
    rate set each epoch, or each step, by the scheduler `make_scheduler` builds (if any).
    `config`, the composed config it was built from, is its one hyperparameter: Lightning saves
    it in every checkpoint (`hyper_parameters`), so a checkpoint describes itself. It is not
    logged, since the run's HParams row is written from its record when it ends (`hparams.py`).

    The training step stays lean: it logs only on the trainer's logging steps
    (`log_every_n_steps`), because a `self.log` costs a sizeable share of a step of the small
    MLPs we study.
    """

    def __init__(
        self,
        net: nn.Module,
        loss_fn: LossFn,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self.make_optimizer = make_optimizer
        self.make_scheduler = make_scheduler
        self.save_hyperparameters({"config": config}, logger=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        outputs = self.net(x)
        loss = mean_loss(self.loss_fn, outputs, y)
        if logs_this_step(self):
            self.log_dict(stage_metrics("train", loss, outputs, y), batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        metrics, _ = self.evaluation(batch, stage)
        self.log_dict(metrics, batch_size=len(batch[1]), sync_dist=True)  # DDP: over all ranks

    def evaluation(
        self, batch: tuple[Tensor, Tensor], stage: str
    ) -> tuple[dict[str, Tensor], Tensor]:
        """A validation or test batch's metrics, and the outputs they come from (a stack also
        gathers its jobs' test-split evidence from them)."""
        x, y = batch
        outputs = self.net(x)
        return stage_metrics(stage, mean_loss(self.loss_fn, outputs, y), outputs, y), outputs

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer, and the scheduler stepped as its config's `interval` says
        (`schedulers.lr_scheduler`)."""
        optimizer = self.make_optimizer(self.parameters())
        if self.make_scheduler is None:
            return {"optimizer": optimizer}
        schedule = lr_scheduler(self.make_scheduler, optimizer, self.trainer)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


class ValidationMetrics(pl.Callback):
    """Keeps the last validation's metrics (`val/...`) for the run's record, and in its
    checkpoints: a run that trains on from its final checkpoint (it was killed while testing)
    validates no more, yet its record must hold what the uninterrupted run's holds."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics.items()
            self.metrics = {k: float(v) for k, v in metrics if k.startswith("val/")}

    def evidence(self) -> dict[str, float]:
        return dict(self.metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.metrics = dict(state_dict["metrics"])
