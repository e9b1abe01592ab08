"""Losses on raw network outputs: each `conf/loss/<name>.yaml` points at one function here.

Every loss takes `(outputs, targets)` with outputs of shape `(batch, classes)` and integer class
targets, and returns a scalar mean over the batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets)


def nll(outputs: Tensor, targets: Tensor) -> Tensor:
    """log_softmax then nll_loss: the two-step spelling of cross-entropy (equal to 1e-6)."""
    return F.nll_loss(F.log_softmax(outputs, dim=1), targets)


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Squared error of softmax probabilities against one-hot targets; its gradient vanishes
    when the softmax saturates on a wrong class, unlike cross-entropy's."""
    onehot = F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
    return F.mse_loss(outputs.softmax(dim=1), onehot)


def sigmoid_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Squared error of per-class sigmoids against one-hot targets, as in early MLP courses."""
    onehot = F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
    return F.mse_loss(outputs.sigmoid(), onehot)


def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """Half the squared error of the raw outputs against one-hot targets, summed over classes and
    averaged over the batch: the convention of Cohen et al. (2021), whose sharpness figures
    (the Hessian's top eigenvalue against 2/lr) depend on the loss's scale. Unlike `mse`, no
    softmax: the outputs themselves are regressed onto the targets."""
    onehot = F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
    return 0.5 * (outputs - onehot).square().sum(dim=1).mean()


def bce(outputs: Tensor, targets: Tensor) -> Tensor:
    """One-vs-rest binary cross-entropy on per-class sigmoids."""
    onehot = F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
    return F.binary_cross_entropy_with_logits(outputs, onehot)
