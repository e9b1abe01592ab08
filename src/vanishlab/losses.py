"""Losses on raw network outputs: each `conf/loss/<name>.yaml` points at one function here.

Every loss takes `(outputs, targets)`, outputs of shape `(N, classes)` and integer class targets
`(N,)`, and returns each sample's loss, `(N,)`. The training loss is their mean over the batch
(`mean_loss`), taken in one place: so a fused stack's K jobs, whose outputs are `(K, B,
classes)`, go through a loss in one call on their K * B samples, and each job's loss is the mean
of its own B (`stack.FusedStack`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from vanishlab import ConfigError

LossFn = Callable[[Tensor, Tensor], Tensor]


def mean_loss(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    """The mean of `loss_fn`'s per-sample losses over the batch, the last dim of `targets`:
    a scalar for a run's outputs `(B, classes)`, each job's loss `(K,)` for a stack's
    `(K, B, classes)`, from one call of `loss_fn` on all the samples."""
    samples = targets.flatten()
    per_sample = loss_fn(outputs.flatten(0, -2), samples)
    if per_sample.shape != samples.shape:
        name = getattr(getattr(loss_fn, "func", loss_fn), "__qualname__", repr(loss_fn))
        raise ConfigError(
            f"The loss {name!r} returned a tensor of shape {tuple(per_sample.shape)} for "
            f"{len(samples)} samples, where a loss returns each sample's loss, of shape "
            f"({len(samples)},): vanishlab takes their mean over the batch itself, so that a "
            f"fused stack computes its jobs' losses in one call. Fix: return the per-sample "
            f"values (for torch.nn.functional's losses, reduction='none', averaged over any "
            f"class dimension), as the losses in vanishlab/losses.py do."
        )
    return per_sample.view(targets.shape).mean(-1)


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def nll(outputs: Tensor, targets: Tensor) -> Tensor:
    """log_softmax then nll_loss: the two-step spelling of cross-entropy (equal to 1e-6)."""
    return F.nll_loss(F.log_softmax(outputs, dim=1), targets, reduction="none")


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Squared error of softmax probabilities against one-hot targets, averaged over the
    classes; its gradient vanishes when the softmax saturates on a wrong class, unlike
    cross-entropy's."""
    onehot = F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
    return F.mse_loss(outputs.softmax(dim=1), onehot, reduction="none").mean(1)


def sigmoid_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Squared error of per-class sigmoids against one-hot targets, averaged over the classes,
    as in early MLP courses."""
    onehot = F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
    return F.mse_loss(outputs.sigmoid(), onehot, reduction="none").mean(1)


def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """Half the squared error of the raw outputs against one-hot targets, summed over classes
    (averaged over the batch by `mean_loss`): the convention of Cohen et al. (2021), whose
    sharpness figures (the Hessian's top eigenvalue against 2/lr) depend on the loss's scale.
    Unlike `mse`, no softmax: the outputs themselves are regressed onto the targets."""
    onehot = F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
    return 0.5 * (outputs - onehot).square().sum(dim=1)


def bce(outputs: Tensor, targets: Tensor) -> Tensor:
    """One-vs-rest binary cross-entropy on per-class sigmoids, averaged over the classes."""
    onehot = F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
    return F.binary_cross_entropy_with_logits(outputs, onehot, reduction="none").mean(1)
