"""What `GradientFlow` draws on the TensorBoard dashboard beyond scalars: per-probe histograms
and the gradient-flow figure. Loggers other than TensorBoard's are skipped."""

from __future__ import annotations

import math

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from vanishlab.nets import Probe


def tensorboard_writers(loggers: list[Logger]) -> list[SummaryWriter]:
    return [logger.experiment for logger in loggers if isinstance(logger, TensorBoardLogger)]


def write_histograms(
    loggers: list[Logger], probes: list[Probe], activations: dict[str, Tensor], step: int
) -> None:
    """Weights, gradients and output activations of every probe (`weights/layer_00`, ...)."""
    for writer in tensorboard_writers(loggers):
        for probe in probes:
            weight = probe.layer.weight
            for family, values in (
                ("weights", weight),
                ("grads", weight.grad),
                ("activations", activations[probe.name]),
            ):
                add_histogram(writer, f"{family}/{probe.name}", values, step)


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
    summary = torch.stack([values.min(), values.max(), values.sum(), values.square().sum()])
    low, high, total, squares = summary.tolist()  # one host-device sync for the four
    counts = torch.histc(values, bins, min=low, max=high)
    writer.add_histogram_raw(
        tag,
        min=low,
        max=high,
        num=len(values),
        sum=total,
        sum_squares=squares,
        bucket_limits=torch.linspace(low, high, bins + 1)[1:].tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
    )


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

    def draw(
        self, loggers: list[Logger], epoch_profiles: dict[int, list[float]], step: int
    ) -> None:
        """Redraw with every epoch's profile and write the image to each TensorBoard."""
        writers = tensorboard_writers(loggers)
        if not writers:
            return
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
        for writer in writers:
            writer.add_figure("gradient_flow", self.figure, step, close=False)
