"""The hidden stack's input-output Jacobian: does a deep network pass a signal through its depth
undistorted (Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep learning
through dynamical isometry")?

The Jacobian J = dh_last/dh_first of the hidden stack, from the first hidden layer's output to
the last's, maps a change of the first hidden state to the change it makes at the last; its
transpose carries the backward signal the other way. Its singular values are how much it
stretches each direction. Their mean square is what mean-field theory predicts: chi_1^(L-1) for
L hidden layers (`theory.jacobian_log10_mean_sq_singular_value`), 1 at the critical point, where
gradients neither vanish nor explode on average. Their spread is what the mean does not tell:
Pennington et al. found that at the critical point Gaussian weights still spread them over more
decades the deeper the network, while orthogonal weights keep them near 1 (dynamical isometry),
and that networks train faster the narrower the spread.

`Jacobian` measures them at the first measured step (the network as initialised; a resumed run
keeps that figure from its checkpoint) and at the end of training, at the first `inputs`
examples of the first training batch, and logs to every logger:

- `jacobian/log10_max_over_median`         log10 of the largest over the median singular value,
                                           averaged over the inputs: the spread (0: isometry;
                                           a ReLU stack's median is its nonzero values')
- `jacobian/log10_mean_sq_singular_value`  log10 of the mean squared singular value
- `jacobian/theory_log10_mean_sq_singular_value`  the mean-field prediction of that, where it
                                           applies (`mean_field_point`, and a square Jacobian)

and to TensorBoard a histogram of the singular values' log10 (`SINGULAR_VALUES`). The figures
at the end, and at the start as `evidence/jacobian_..._at_start`, are its evidence in
`metrics.json`, with the spectrum in brief for the sweep report to draw: `QUANTILES` quantiles
of the singular values' log10, all inputs' together, from the smallest to the largest
(`results.JACOBIAN_QUANTILES`; a singular value of 0 reads `dashboard.LOG10_FLOOR`, as on the
dashboards).

It needs the network's optional `hidden_map()` (`nets.BlockNet.hidden_map`): the module that
maps the first probe's output to the last hidden layer's output. The Jacobian is exact:
`torch.func.jacrev`, vmapped over the inputs, then `torch.linalg.svdvals`. It is computed in
float64, since a deep stack's median singular value falls below float32's resolution: float32
would read the floor of its own rounding, not the spectrum. An exact Jacobian holds inputs x
width^2 numbers, so a hidden state wider than `max_width` units per example is refused when
the callback first measures, before the first update (a CNN's first hidden state is 16 x 14 x
14 = 3,136 units). Power iteration on Jacobian-vector products would estimate a wider one's
largest singular value, not the median: the spread needs the whole spectrum.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from vanishlab import ConfigError, theory
from vanishlab.dashboard import (
    job_histograms,
    log10_display,
    shows_histograms,
    write_histograms,
    write_scalars,
)
from vanishlab.nets import Probe
from vanishlab.results import (
    JACOBIAN_MEAN_SQ,
    JACOBIAN_MEAN_SQ_START,
    JACOBIAN_QUANTILES,
    JACOBIAN_QUANTILES_START,
    JACOBIAN_SPREAD,
    JACOBIAN_SPREAD_START,
    JACOBIAN_THEORY,
)

SINGULAR_VALUES = "jacobian/log10_singular_values"  # TensorBoard histogram, all inputs' together
QUANTILES = 21  # of the log10 singular values in the record: 0, 0.05, ..., 1
# A figure's record key when measured at the first step (the prediction does not change).
AT_START = {
    JACOBIAN_SPREAD: JACOBIAN_SPREAD_START,
    JACOBIAN_MEAN_SQ: JACOBIAN_MEAN_SQ_START,
    JACOBIAN_THEORY: JACOBIAN_THEORY,
    JACOBIAN_QUANTILES: JACOBIAN_QUANTILES_START,
}


def first_hidden_state(net: nn.Module, x: Tensor) -> Tensor:
    """The first probe's output (the first hidden layer's activation) for the inputs `x`."""
    captured = []
    hook = net.probes()[0].output.register_forward_hook(lambda m, i, out: captured.append(out))
    net(x)
    hook.remove()
    return captured[0]


@torch.no_grad()  # builds no graph of the parameters; the transforms differentiate in `h` anyway
def singular_values(hidden_map: nn.Module, h: Tensor) -> Tensor:
    """The singular values of `hidden_map`'s Jacobian at each example of `h`, largest first:
    (examples, min(in, out) units), in float64 (the module's parameters and buffers taken as
    float64 copies, so the module itself is left as it is)."""
    tensors = {**dict(hidden_map.named_parameters()), **dict(hidden_map.named_buffers())}
    as_float64 = {k: t.double() if t.is_floating_point() else t for k, t in tensors.items()}

    def one(example: Tensor) -> Tensor:
        return functional_call(hidden_map, as_float64, (example.unsqueeze(0),)).flatten()

    jacobians = vmap(jacrev(one))(h.double())  # (examples, out, *example's shape)
    return torch.linalg.svdvals(jacobians.flatten(2))


def log10_max_over_median(singular_values: Tensor, exact_zeros: bool) -> float:
    """log10 of each example's largest over its median singular value, averaged over the
    examples; nan where the Jacobian is 0.

    A ReLU layer's inactive units have slope 0, so a stack with one (`exact_zeros`) has a
    Jacobian of rank about half its size or less: half its singular values or more are 0, a
    median of 0 says nothing, and the median is that of the nonzero ones, those float64
    resolves (above the largest times their count times its epsilon, numpy's `matrix_rank`
    tolerance). A smooth activation's are all nonzero: a deep tanh stack's smallest fall below
    that tolerance, though not its median, which is the median of all, as Pennington et al.
    take it."""
    eps = torch.finfo(singular_values.dtype).eps
    spreads = []
    for row in singular_values:
        nonzero = row[row > row[0] * len(row) * eps] if exact_zeros else row
        spreads.append((row[0] / nonzero.median()).log10().item())  # median of none: nan
    return sum(spreads) / len(spreads)


def log10_quantiles(singular_values: Tensor) -> list[float]:
    """`QUANTILES` evenly spaced quantiles of the singular values' log10, every example's
    together: the first is the smallest's, the last the largest's (0 reads `LOG10_FLOOR`)."""
    levels = torch.linspace(0, 1, QUANTILES, dtype=singular_values.dtype)
    return torch.quantile(log10_display(singular_values.flatten()), levels).tolist()


def mean_field_point(config: dict[str, Any] | None) -> tuple[str, float, float] | None:
    """(activation, sigma_w2, sigma_b2) where the run's composed config (`Classifier`'s
    hyperparameter) is a network mean-field theory describes: `init=variance_scaling` (its
    sigma_w2 and sigma_b2) or `init=orthogonal` (gain^2, and biases 0 as `init.initialise` leaves
    them), a `model.activation` that `theory` has, and a plain stack (no `model.norm`, no
    `model.residual`, which the theory leaves out). None elsewhere, and without a config."""
    if config is None:
        return None
    cfg = OmegaConf.create(config)
    model, init = cfg.get("model") or {}, cfg.get("init") or {}
    activation = model.get("activation")
    plain = model.get("norm", "none") == "none" and not model.get("residual", False)
    if not plain or activation not in theory.ACTIVATIONS:
        return None
    if init.get("_target_") == "vanishlab.init.variance_scaling":
        return activation, init.sigma_w2, init.sigma_b2
    if init.get("_target_") == "vanishlab.init.orthogonal":
        return activation, init.gain**2, 0.0
    return None


def hidden_layers(net: nn.Module, hidden_map: nn.Module) -> list[Probe]:
    """The weighted layers' probes inside `hidden_map`: the L - 1 of chi_1^(L-1)."""
    inside = {id(module) for module in hidden_map.modules()}
    return [p for p in net.probes() if not p.is_norm and id(p.layer) in inside]


def model_name(net: nn.Module) -> str:
    """The network's class as a `model._target_` names it."""
    return f"{type(net).__module__}.{type(net).__qualname__}"


class Jacobian(pl.Callback):
    """Measures the hidden stack's Jacobian (module docstring) at the first measured step and at
    the end of training; the figures are its evidence.

    Everything comes from the hooks' `pl_module` and `batch` and goes out through
    `trainer.loggers`, so under the stacked launcher each job measures its own network at its
    own examples and writes to its own loggers. The examples are the first `inputs` of the
    first training batch (the whole batch, at most), a draw the run's seed fixes, kept (with the
    figures) in checkpoints, so a resumed run measures its end at the same examples and keeps
    its start figures. Nothing runs between the two measurements.

    Measuring leaves the training as it was: the network is measured in eval mode (a function of
    one input, BatchNorm with its running statistics, as a Jacobian per input needs) and put
    back in the mode it was in, under `torch.no_grad` (no `.grad` written, no graph of the
    parameters kept), with float64 copies of the hidden stack's parameters, and no random draw.
    """

    def __init__(self, inputs: int = 16, max_width: int = 1024) -> None:
        self.inputs = inputs
        self.max_width = max_width
        self.examples: Tensor | None = None
        self.at_start: dict[str, Any] = {}
        self.at_end: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "at_start": self.at_start, "at_end": self.at_end}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.examples = state_dict["examples"]
        self.at_start = state_dict["at_start"]
        self.at_end = state_dict["at_end"]

    def evidence(self) -> dict[str, Any]:
        return {**{AT_START[k]: v for k, v in self.at_start.items()}, **self.at_end}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse a network without `hidden_map()` before anything trains."""
        if stage != "fit":
            return
        self._ended = False
        net = pl_module.net
        if not callable(getattr(net, "hidden_map", None)):
            raise ConfigError(
                f"model={model_name(net)} has no hidden_map() method, so callbacks.jacobian "
                f"cannot differentiate its hidden stack. Fix: add `def hidden_map(self) -> "
                f"nn.Module`, the map from its first probe's output to its last hidden layer's "
                f"output (see vanishlab.nets.BlockNet.hidden_map), or leave the callback off "
                f"(callbacks=default)."
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        """The first step's: the examples and the start figures (a resumed run has them)."""
        if self.at_start:
            return
        x, _ = batch
        self.examples = x[: self.inputs].detach()
        self.at_start = self.measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.measure_end(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run that trains on from its final checkpoint (it was killed while testing) has no
        step left: Lightning runs no training loop, so no `on_train_end`, and its end is
        measured here, at the final weights that checkpoint holds. (A stack calls no job's
        `on_fit_end`: its jobs train from scratch.)"""
        if not self._ended:
            self.measure_end(trainer, pl_module)

    def measure_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ended = True
        if self.examples is not None:  # else no step ran (max_epochs=0): nothing to compare
            self.at_end = self.measure(trainer, pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The figures at the module's current weights, logged at the current step, and the
        spectrum's quantiles."""
        net = pl_module.net
        hidden_map = net.hidden_map()
        training = net.training
        net.eval()
        with torch.no_grad():
            first = first_hidden_state(net, self.examples.to(pl_module.device))
            last = hidden_map(first[:1])
        self.check_width(net, first[0].numel(), last[0].numel())
        values = singular_values(hidden_map, first)
        net.train(training)
        layers = hidden_layers(net, hidden_map)
        relu = any(p.kind == "relu" for p in layers)
        figures = {
            JACOBIAN_SPREAD: log10_max_over_median(values, exact_zeros=relu),
            JACOBIAN_MEAN_SQ: values.square().mean().log10().item(),
        }
        point = mean_field_point(pl_module.hparams.get("config"))
        if point is not None and first[0].numel() == last[0].numel():
            figures[JACOBIAN_THEORY] = theory.jacobian_log10_mean_sq_singular_value(
                *point, len(layers)
            )
        step = trainer.global_step
        write_scalars(trainer.loggers, figures, step)
        if shows_histograms(trainer):
            (histograms,) = job_histograms({SINGULAR_VALUES: values.log10()[None]})
            write_histograms(trainer.loggers, histograms, step)
        return {**figures, JACOBIAN_QUANTILES: log10_quantiles(values)}

    def check_width(self, net: nn.Module, first: int, last: int) -> None:
        """Refuse a hidden state wider than `max_width` units per example (module docstring)."""
        if max(first, last) <= self.max_width:
            return
        examples = len(self.examples)
        raise ConfigError(
            f"model={model_name(net)}'s hidden state is {max(first, last):,} units per example, "
            f"wider than callbacks.jacobian.max_width={self.max_width}: the exact Jacobian at "
            f"{examples} examples would hold {examples * first * last:,} numbers, and power "
            f"iteration, which estimates a wider one's largest singular value, cannot give the "
            f"median its spread needs. Fix: measure a narrower network (model.width), raise "
            f"callbacks.jacobian.max_width where memory allows, or leave the callback off "
            f"(callbacks=default)."
        )
