"""Sharpness: the top eigenvalue of the training loss's Hessian, against gradient descent's limit.

Gradient descent at learning rate lr is stable on a quadratic only where every Hessian eigenvalue
is below 2/lr. Cohen et al. (2021, "Gradient Descent on Neural Networks Typically Occurs at the
Edge of Stability") found that full-batch training raises the top eigenvalue (the sharpness)
until it reaches about 2/lr, then hovers there while the loss keeps falling, non-monotonically.

`Sharpness` measures it every `every_n_steps` optimizer steps, and at the last step, on one
fixed batch, by power iteration on Hessian-vector products (double backward through one forward
pass), warm-started from the last eigenvector, and logs to every logger:

- `sharpness/top_eigenvalue`   the eigenvalue of largest magnitude (near a minimum, the top one)
- `sharpness/times_lr_over_2`  that times lr / 2: 1 and above is past the stability limit of
                               gradient descent at that learning rate

The last values are its evidence in `metrics.json`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.linalg import vector_norm

from vanishlab.dashboard import write_scalars
from vanishlab.losses import mean_loss
from vanishlab.nets import buffers_kept
from vanishlab.results import SHARPNESS, SHARPNESS_TIMES_LR


def hessian_vector_products(losses: Tensor, params: list[Tensor]) -> Callable[[Tensor], Tensor]:
    """V -> each job's H_k v_k, for the Hessian of each job's loss (`losses`, (K,)) in its own
    parameters, with V (K, P): `params` hold the jobs along dim 0 (a fused stack's), or are one
    job's own (a single run, K = 1). The jobs' parameters are disjoint, so the summed loss's
    Hessian is block-diagonal and one backward gives every job's product. The gradient's graph
    is built once: each product costs one backward pass through it, not a new forward pass."""
    jobs = len(losses)
    grads = torch.autograd.grad(losses.sum(), params, create_graph=True)
    gradient = torch.cat([g.reshape(jobs, -1) for g in grads], dim=1)

    def product(v: Tensor) -> Tensor:
        hv = torch.autograd.grad((gradient * v).sum(), params, retain_graph=True)
        return torch.cat([h.reshape(jobs, -1) for h in hv], dim=1)

    return product


def power_iteration(
    product: Callable[[Tensor], Tensor], start: Tensor, max_iterations: int, tolerance: float
) -> tuple[Tensor, Tensor]:
    """Each job's eigenvalue of largest magnitude of the symmetric map `product` ((K, P) to
    (K, P), a block per job), and its unit eigenvector, from `start` (K, P): the Rayleigh
    quotient, iterated until it changes by less than `tolerance` (relative) or
    `max_iterations` products are spent. A job whose quotient has settled keeps its values
    while the others iterate on, so each job gets what it gets alone."""
    v = start / vector_norm(start, dim=1, keepdim=True)
    eigenvalue = v.new_full((len(v),), float("nan"))
    settled = torch.zeros(len(v), dtype=torch.bool, device=v.device)
    for _ in range(max_iterations):
        hv = product(v)
        previous, quotient = eigenvalue, (v * hv).sum(1)
        eigenvalue = torch.where(settled, previous, quotient)
        v = torch.where(settled[:, None], v, hv / vector_norm(hv, dim=1, keepdim=True))
        settled |= (eigenvalue - previous).abs() <= tolerance * eigenvalue.abs()
        if settled.all():
            break
    return eigenvalue, v


class Sharpness(pl.Callback):
    """Logs the training loss's sharpness (module docstring) and keeps the last as evidence.

    Everything comes from the hooks' `pl_module` and `batch` and goes out through
    `trainer.loggers`, so under the stacked launcher each job measures its own network on its
    own data and writes to its own loggers. The fixed batch is the first `batch_size` examples
    of the first training batch (the whole batch, at most), kept on the device; the learning
    rate is that of the optimizer's parameter group holding the module's parameters (the job's
    own in a stack; a scheduler's current value).

    Measuring leaves the training as it was: the products use `torch.autograd.grad` (no `.grad`
    is written), the start vector comes from the callback's own generator (the global RNG is
    not drawn from), and the module stays in training mode, so the Hessian is that of the loss
    the optimizer descends (BatchNorm normalises with the batch's statistics), while its
    buffers (BatchNorm's running statistics) are restored after the forward pass.
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        batch_size: int = 1000,
        max_iterations: int = 20,
        tolerance: float = 1e-3,
        seed: int = 0,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.max_iterations = max_iterations
        self.tolerance = tolerance
        self.generator = torch.Generator().manual_seed(seed)
        self.batch: tuple[Tensor, Tensor] | None = None
        self.eigenvector: Tensor | None = None
        self.last: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints, so a resumed run measures on the same batch, from the same
        eigenvector, and keeps its evidence."""
        return {"batch": self.batch, "eigenvector": self.eigenvector, "last": self.last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batch = state_dict["batch"]
        self.eigenvector = state_dict["eigenvector"]
        self.last = state_dict["last"]

    def evidence(self) -> dict[str, Any]:
        return dict(self.last)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.estimated_stepping_batches - 1
        self._measured_step = -1

    @property
    def settings(self) -> tuple[int, int, int, float]:
        """What decides when and how it measures (a fused stack's jobs must share them)."""
        return self.every_n_steps, self.batch_size, self.max_iterations, self.tolerance

    def due(self, step: int) -> bool:
        """Whether step `step` is measured (once: with gradient accumulation several batches
        share a step)."""
        if step == self._measured_step or (step % self.every_n_steps and step != self._last_step):
            return False
        self._measured_step = step
        return True

    def fix_batch(self, batch: tuple[Tensor, Tensor]) -> None:
        """Keep the first `batch_size` examples of the first measured step's batch: copies, as
        a view would keep (and a checkpoint save) the whole batch it slices, a fused stack's K
        jobs' batches."""
        if self.batch is None:
            x, y = batch
            self.batch = (x[: self.batch_size].clone(), y[: self.batch_size].clone())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self.due(trainer.global_step):
            self.fix_batch(batch)
            x, y = (t.to(pl_module.device) for t in self.batch)
            params = [p for p in pl_module.parameters() if p.requires_grad]

            def loss() -> Tensor:
                return mean_loss(pl_module.loss_fn, pl_module(x), y)[None]

            (eigenvalue,), (self.eigenvector,) = top_eigenpairs(pl_module, loss, params, [self])
            self.keep(trainer, pl_module, eigenvalue)

    def start(self, size: int) -> Tensor:
        """Where the power iteration starts: the last eigenvector, or a draw of the callback's
        own generator (the global RNG is not drawn from)."""
        if self.eigenvector is None:
            self.eigenvector = torch.randn(size, generator=self.generator)
        return self.eigenvector

    def keep(self, trainer: pl.Trainer, pl_module: pl.LightningModule, eigenvalue: float) -> None:
        """Log the measured step's figures and keep them as the evidence."""
        lr = learning_rate(trainer, pl_module)
        self.last = {SHARPNESS: eigenvalue, SHARPNESS_TIMES_LR: eigenvalue * lr / 2}
        write_scalars(trainer.loggers, self.last, self._measured_step)


def top_eigenpairs(
    module: nn.Module,
    losses: Callable[[], Tensor],
    params: list[Tensor],
    measures: list[Sharpness],
) -> tuple[list[float], list[Tensor]]:
    """Each job's top Hessian eigenvalue (`measures[k]`'s start; the first's iteration
    settings) and eigenvector, for the jobs' `losses()` (K,) in `params`
    (`hessian_vector_products`): a single run's (K = 1) or a fused stack's. `module` stays in
    training mode, so the Hessian is that of the loss the optimizer descends (BatchNorm
    normalises with the batch's statistics); its buffers (running statistics) are put back."""
    size = sum(p.numel() for p in params) // len(measures)
    start = torch.stack([m.start(size) for m in measures]).to(params[0])
    first = measures[0]
    with buffers_kept(module), torch.enable_grad():
        product = hessian_vector_products(losses(), params)
        eigenvalues, vectors = power_iteration(
            product, start, first.max_iterations, first.tolerance
        )
    # Each its own copy: a row of `vectors` would keep (and a checkpoint save) all K.
    return eigenvalues.tolist(), [v.clone() for v in vectors]


def learning_rate(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
    """The current lr of the optimizer's parameter group that holds `pl_module`'s parameters
    (the same tensor, or a view of the same memory: a fused stack's job's optimizer alone):
    the module's own group in a stack, the only one alone."""
    first = next(pl_module.parameters()).data_ptr()
    for group in trainer.optimizers[0].param_groups:
        if any(p.data_ptr() == first for p in group["params"]):
            return group["lr"]
    raise LookupError("no optimizer parameter group holds the module's parameters")
