"""Gradient-flow diagnostics: the per-layer figures that show why a network does or does not learn.

`GradientFlow` measures each Linear layer every `every_n_steps` training steps and writes the
figures to every logger (tags below, `layer_00` = input side). Between those steps it does
nothing: no hooks, no copies, no host-device syncs, so training runs at full speed.

- `grad_norm/layer_XX`      L2 norm of the weight gradient, after backward and before the step
- `weight_norm/layer_XX`    L2 norm of the weight
- `update_ratio/layer_XX`   norm of the applied update / weight norm (any optimizer)
- `act_mean/`, `act_std/`   the layer's post-activation output over the batch
- `dead_frac/layer_XX`      ReLU-family hidden layers: units that are <= 0 for every example
- `saturated_frac/layer_XX` sigmoid/tanh hidden layers: outputs within 2% of their bounds
- `grad_norm/first_over_last`  first layer's gradient norm over the last layer's
- `dead_outputs`            with an output ReLU: classes whose output is 0 for every example

Each `histograms_every_n_epochs` epochs it also writes histograms of weights, gradients and
activations (TensorBoard), and a gradient-flow image: per-layer gradient norm, one line per epoch.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.linalg import vector_norm
from torch.utils.tensorboard import SummaryWriter

RELU_FAMILY = {"relu", "leaky_relu", "gelu"}
BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}
SATURATION_MARGIN = 0.02  # of the output range


def layer_tag(family: str, index: int) -> str:
    return f"{family}/layer_{index:02d}"


class GradientFlow(pl.Callback):
    """Logs per-layer gradient flow; keeps the figures the run's verdict needs.

    After fit, `at_first_step` holds the per-layer gradient norms and their first-over-last
    ratio at the first logged step (the network as initialised), and `at_last_step` the
    ratio and the largest dead and saturated fractions at the last logged step.
    """

    def __init__(self, every_n_steps: int = 25, histograms_every_n_epochs: int = 1) -> None:
        self.every_n_steps = every_n_steps
        self.histograms_every_n_epochs = histograms_every_n_epochs
        self.at_first_step: dict[str, Any] = {}
        self.at_last_step: dict[str, float] = {}
        self.epoch_profiles: dict[int, list[float]] = {}  # mean grad norm per layer, per epoch
        self._logging = False

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints, so a resumed run keeps the figures of its first steps (and of
        its last, when it has no step left to train)."""
        return {
            "at_first_step": self.at_first_step,
            "at_last_step": self.at_last_step,
            "epoch_profiles": self.epoch_profiles,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.at_first_step = state_dict["at_first_step"]
        self.at_last_step = state_dict["at_last_step"]
        self.epoch_profiles = state_dict["epoch_profiles"]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = pl_module.net
        self.blocks: list[tuple[nn.Linear, nn.Module]] = net.blocks()
        self.activation: str = net.activation
        self.output_relu = net.output_activation == "relu"
        self._profiles_this_epoch: list[list[float]] = []
        self._figure = GradientFlowFigure(len(self.blocks))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        # With gradient accumulation several batches lead to one optimizer step: the hooks stay
        # on until that step, so the activations are those of its last batch.
        if self._logging or trainer.global_step % self.every_n_steps:
            return
        self._logging = True
        self._step = trainer.global_step
        self._histograms = (
            trainer.current_epoch % self.histograms_every_n_epochs == 0
            and not self._profiles_this_epoch
        )
        self._activations: list[Tensor] = [torch.empty(0)] * len(self.blocks)
        self._hooks = [
            activation.register_forward_hook(partial(self._capture, index))
            for index, (_, activation) in enumerate(self.blocks)
        ]

    def _capture(self, index: int, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self._activations[index] = output.detach()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module, optimizer) -> None:
        """The gradient as the optimizer will apply it: accumulated over its batches."""
        if not self._logging:
            return
        for hook in self._hooks:
            hook.remove()
        weights = [linear.weight for linear, _ in self.blocks]
        self._grad_norms = torch.stack([vector_norm(w.grad) for w in weights])
        self._weights_before = [w.detach().clone() for w in weights]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._logging or trainer.global_step == self._step:  # no optimizer step yet
            return
        self._logging = False
        params = [linear.weight for linear, _ in self.blocks]
        metrics = self._measure([p.detach() for p in params])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._step)
        n = len(self.blocks)
        profile = [metrics[layer_tag("grad_norm", i)] for i in range(n)]
        self._profiles_this_epoch.append(profile)
        if not self.at_first_step:
            ratio = metrics["grad_norm/first_over_last"]
            self.at_first_step = {"grad_norms": profile, "first_over_last": ratio}
        self.at_last_step = {
            "first_over_last": metrics["grad_norm/first_over_last"],
            "max_dead_frac": _max_of_family(metrics, "dead_frac"),
            "max_saturated_frac": _max_of_family(metrics, "saturated_frac"),
        }
        if self._histograms:
            self._write_histograms(trainer, params)

    def _measure(self, weights: list[Tensor]) -> dict[str, float]:
        """All figures of one logging step, computed on the device and synced once."""
        activations, hidden = self._activations, self._activations[:-1]
        weight_norms = torch.stack([vector_norm(w) for w in weights])
        update_norms = torch.stack(
            [vector_norm(w - b) for w, b in zip(weights, self._weights_before, strict=True)]
        )
        per_layer = {
            "grad_norm": self._grad_norms,
            "weight_norm": weight_norms,
            "update_ratio": update_norms / weight_norms,
            "act_mean": torch.stack([a.mean() for a in activations]),
            "act_std": torch.stack([a.std() for a in activations]),
        }
        if self.activation in RELU_FAMILY:
            per_layer["dead_frac"] = torch.stack([(a <= 0).all(0).float().mean() for a in hidden])
        if self.activation in BOUNDS:
            low, high = BOUNDS[self.activation]
            margin = SATURATION_MARGIN * (high - low)
            per_layer["saturated_frac"] = torch.stack(
                [((a < low + margin) | (a > high - margin)).float().mean() for a in hidden]
            )
        single = {"grad_norm/first_over_last": self._grad_norms[0] / self._grad_norms[-1]}
        if self.output_relu:
            single["dead_outputs"] = (activations[-1] <= 0).all(0).sum().float()
        values = torch.cat([*per_layer.values(), torch.stack(list(single.values()))]).tolist()
        names = [layer_tag(f, i) for f, t in per_layer.items() for i in range(len(t))]
        return dict(zip([*names, *single], values, strict=True))

    def _write_histograms(self, trainer: pl.Trainer, params: list[nn.Parameter]) -> None:
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            for i, (param, activation) in enumerate(zip(params, self._activations, strict=True)):
                for family, values in (
                    ("weights", param),
                    ("grads", param.grad),
                    ("activations", activation),
                ):
                    add_histogram(logger.experiment, layer_tag(family, i), values, self._step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._profiles_this_epoch:
            return
        layers = zip(*self._profiles_this_epoch, strict=True)
        self.epoch_profiles[trainer.current_epoch] = [sum(v) / len(v) for v in layers]
        self._profiles_this_epoch = []
        if trainer.current_epoch % self.histograms_every_n_epochs:
            return
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers:
            return
        figure = self._figure.update(self.epoch_profiles)
        for writer in writers:
            writer.add_figure("gradient_flow", figure, trainer.global_step, close=False)


def add_histogram(
    writer: SummaryWriter, tag: str, values: Tensor | None, step: int, bins: int = 64
) -> None:
    """A TensorBoard histogram binned on the device by `torch.histc` into `bins` equal buckets.

    Unlike `add_histogram`, which fails on them, non-finite values (an overflowing activation)
    are left out; so are cleared gradients (`None`, a step that StopOnDivergence dropped).
    """
    if values is None:
        return
    values = values.detach().float().flatten()
    values = values[torch.isfinite(values)]
    if not len(values):
        return
    low, high = values.min(), values.max()
    counts = torch.histc(values, bins, min=low.item(), max=high.item())
    limits = torch.linspace(low.item(), high.item(), bins + 1)[1:]
    writer.add_histogram_raw(
        tag,
        min=low.item(),
        max=high.item(),
        num=len(values),
        sum=values.sum().item(),
        sum_squares=values.square().sum().item(),
        bucket_limits=limits.tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
    )


def _max_of_family(metrics: dict[str, float], family: str) -> float:
    return max((v for k, v in metrics.items() if k.startswith(f"{family}/")), default=0.0)


class GradientFlowFigure:
    """Per-layer weight-gradient norm on a log axis, one line per epoch, light (first) to dark
    (last): a line that falls toward layer 0 is a vanishing gradient, one that rises an
    exploding one.

    It is drawn every epoch, so it is kept cheap: one figure is kept and redrawn (about 42 ms
    here, against 54 ms to build and draw a new one), and colours stand in for a legend (a
    legend costs half as much again, `tight_layout` a quarter)."""

    def __init__(self, n_layers: int) -> None:
        self.figure = Figure(figsize=(5, 3.5), dpi=80)
        self.axes = self.figure.add_subplot()
        self.axes.set_xticks(range(n_layers))
        self.axes.set_xlabel("layer (0 = input side)")
        self.axes.set_ylabel("log10 weight-gradient L2 norm")
        self.title = self.axes.set_title("")
        self.figure.subplots_adjust(left=0.15, bottom=0.13)  # room for the labels

    def update(self, epoch_profiles: dict[int, list[float]]) -> Figure:
        for line in list(self.axes.lines):
            line.remove()
        last = max(epoch_profiles)
        for epoch, norms in epoch_profiles.items():
            log_norms = [math.log10(n) if n > 0 else math.nan for n in norms]  # 0: not drawn
            colour = colormaps["viridis_r"](0.15 + 0.85 * epoch / max(last, 1))
            self.axes.plot(log_norms, marker="o", color=colour)
        self.axes.relim()
        self.axes.autoscale_view()
        self.title.set_text(f"gradient flow, epochs 0 (light) to {last} (dark)")
        return self.figure


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

    def on_before_backward(self, trainer: pl.Trainer, pl_module, loss: Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        total = self._loss + torch.stack([vector_norm(g) for g in grads]).sum()
        if torch.isfinite(total):
            return
        optimizer.zero_grad(set_to_none=True)
        trainer.should_stop = True
        self.diverged_at = {"step": trainer.global_step, "epoch": trainer.current_epoch}
