"""Stop a run at its first non-finite step, keeping the weights of the last good one."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.linalg import vector_norm

from vanishlab.results import DIVERGED_AT_EPOCH, DIVERGED_AT_STEP, EPOCHS, STATUS, STEPS, Status


class StopOnDivergence(pl.Callback):
    """Stops training at the first step whose loss or gradient is not finite.

    The bad update is dropped (the gradients are cleared before the optimizer step), so the
    weights, and the last checkpoint, stay those of the last good step, and the run ends as
    `diverged` rather than training on NaNs. A gradient whose norm overflows (a sum of squares
    past float32's 3e38) counts as divergence too: checking sums instead let the lr=1e4 test's
    next step turn the weights non-finite. The check costs one host-device sync per step, which
    is free on the CPU.
    """

    def __init__(self) -> None:
        self.diverged_at: dict[str, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        """In checkpoints: a diverged run killed before its record was written is still
        diverged when it trains on from its last checkpoint (`on_train_start`)."""
        return {"diverged_at": self.diverged_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diverged_at = state_dict["diverged_at"]

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        if self.diverged_at is not None:
            trainer.should_stop = True

    def evidence(self) -> dict[str, Any]:
        """A diverged run's status and where it diverged, and so its step and epoch counts: it
        stops after the bad step, at the end of that epoch. They are stated here, not read off
        the trainer, because a diverged stacked job killed before its record was written trains
        on from a checkpoint whose loops are the stack's."""
        if self.diverged_at is None:
            return {}
        step, epoch = self.diverged_at["step"], self.diverged_at["epoch"]
        return {
            STATUS: Status.DIVERGED,
            DIVERGED_AT_STEP: step,
            DIVERGED_AT_EPOCH: epoch,
            STEPS: step + 1,
            EPOCHS: epoch + 1,
        }

    def on_before_backward(self, trainer: pl.Trainer, pl_module, loss: Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module, optimizer) -> None:
        # A stacked job's optimizer is its own group of the stack's.
        total = (
            self._loss + torch.stack([vector_norm(g) for g in applied_gradients(optimizer)]).sum()
        )
        if math.isfinite(total.item()):
            return
        optimizer.zero_grad(set_to_none=True)
        self.diverge(trainer)

    def diverge(self, trainer: pl.Trainer) -> None:
        """Stop at this step, whose update is dropped (a fused stack, which checks its jobs at
        once, masks the job's update instead of clearing its gradients)."""
        trainer.should_stop = True
        self.diverged_at = {"step": trainer.global_step, "epoch": trainer.current_epoch}


def applied_gradients(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The gradients `optimizer` is about to apply: its parameters' that have one."""
    return [
        p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    ]
