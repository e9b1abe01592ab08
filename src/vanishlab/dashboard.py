"""What vanishlab shows on TensorBoard beyond the raw scalars, made to be read on TensorBoard's
defaults (linear axes, outliers ignored, every card its own y-range):

- `Log10/<tag>`: log10 of the families that span decades (`LOG10_FAMILIES`), clamped to
  [`LOG10_FLOOR`, `LOG10_CEILING`]: a zero gradient shows as -30, not 0 or -inf. Capitals sort
  first, so the `Log10` group opens the Time Series tab. Display only: `metrics.json` and the raw
  tags keep the true values.
- a custom-scalars layout (`LAYOUT`): every layer of a family on one chart, and the backward
  signal's time steps (an RNN's h_t, an LSTM's c_t) and residual-stream blocks on charts of
  their own.
- per-probe histograms, and the gradient-flow figure on a fixed y-range that a key sets.

Loggers other than TensorBoard's are skipped for everything but the scalars. A TensorBoard gets
a measured step's scalars as one event (`write_scalars`), as TensorFlow's merged summaries were:
Lightning's `log_metrics` writes an event per value, about 40 us each here: a seed run's 25 values
a measured step took about 1 ms that way, more than measuring them, and 0.13 ms as one event.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from vanishlab.nets import Probe
from vanishlab.results import AXIS_LABELS

LOG10 = "Log10/"
LOG10_FAMILIES = ("grad_norm", "update_ratio", "backward")
LOG10_FLOOR, LOG10_CEILING = -30.0, 30.0  # below 1e-30 (zero included) / above 1e30 (inf)
PROBE = r"(layer|norm|recurrent|step|memory|stream)_\d+"
LAYER = r"(layer|norm|recurrent)_\d+"  # the probes with weights; the others are activations
# Custom Scalars tab: one multi-line chart per family, a line per probe (select one run to read
# a run's profile; every selected run adds its lines).
LAYOUT = {
    "gradient flow, one line per layer": {
        "log10 weight-gradient norm": ["Multiline", [rf"^{LOG10}grad_norm/{PROBE}$"]],
        "log10 update / weight norm": ["Multiline", [rf"^{LOG10}update_ratio/{PROBE}$"]],
        "log10 first / last layer gradient norm": [
            "Multiline",
            [rf"^{LOG10}grad_norm/first_over_last$"],
        ],
        "log10 backward signal ||dL/dh||": ["Multiline", [rf"^{LOG10}backward/{LAYER}$"]],
        "log10 backward signal through time, one line per time step": [
            "Multiline",
            [rf"^{LOG10}backward/step_\d+$"],
        ],
        "log10 backward signal through the LSTM cell state, one line per time step": [
            "Multiline",
            [rf"^{LOG10}backward/memory_\d+$"],
        ],
        "log10 backward signal along the residual stream, one line per block": [
            "Multiline",
            [rf"^{LOG10}backward/stream_\d+$"],
        ],
        "log10 first / last hidden layer backward signal": [
            "Multiline",
            [rf"^{LOG10}backward/first_over_last$"],
        ],
        "dead fraction (ReLU)": ["Multiline", [rf"^dead_frac/{PROBE}$"]],
        "saturated fraction (sigmoid, tanh)": ["Multiline", [rf"^saturated_frac/{PROBE}$"]],
        "activation std": ["Multiline", [rf"^act_std/{PROBE}$"]],
    }
}


def log10_display(values: Tensor) -> Tensor:
    """log10, clamped to [`LOG10_FLOOR`, `LOG10_CEILING`] (0 -> floor, inf -> ceiling); nan, a
    gradient StopOnDivergence dropped, stays nan and is not logged."""
    return values.log10().clamp(LOG10_FLOOR, LOG10_CEILING)


def tensorboard_writers(loggers: list[Logger]) -> list[SummaryWriter]:
    return [logger.experiment for logger in loggers if isinstance(logger, TensorBoardLogger)]


@rank_zero_only  # as Lightning's loggers write: other ranks' TensorBoards are placeholders
def write_scalars(loggers: list[Logger], metrics: dict[str, float], step: int) -> None:
    """`metrics` at `step` to every logger: to a TensorBoard as one event."""
    summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()])
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            # What every `SummaryWriter.add_*` writes through (it reopens a closed writer).
            logger.experiment._get_file_writer().add_summary(summary, step)
        else:
            logger.log_metrics(metrics, step)


def write_layout(loggers: list[Logger]) -> None:
    """Each run writes the same layout; TensorBoard merges them into one."""
    for writer in tensorboard_writers(loggers):
        writer.add_custom_scalars(LAYOUT)


def write_histograms(
    loggers: list[Logger],
    probes: list[Probe],
    grads: list[Tensor | None],
    activations: dict[str, Tensor],
    step: int,
) -> None:
    """Weights, their gradients (`grads`, in `probes`' order: a fused stack's job's slices)
    and output activations of every probe (`weights/layer_00`, ...)."""
    for writer in tensorboard_writers(loggers):
        for probe, grad in zip(probes, grads, strict=True):
            for family, values in (
                ("weights", probe.weight),
                ("grads", grad),
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
    summary = histogram_summary(values)
    if not all(map(math.isfinite, summary)):  # rare: a copy of the finite values is slow
        values = values[torch.isfinite(values)]
        if not len(values):
            return
        summary = histogram_summary(values)
    low, high, total, squares = summary
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


def histogram_summary(values: Tensor) -> list[float]:
    """Min, max, sum and sum of squares, in one host-device sync; all finite if `values` are.
    (`aminmax` and `dot` read the values once each, and copy nothing.)"""
    return torch.stack([*torch.aminmax(values), values.sum(), torch.dot(values, values)]).tolist()


@functools.lru_cache(maxsize=16)
def gradient_flow_figure(
    n_layers: int, positions: tuple[int, ...], axis: str, log10_range: tuple[float, float]
) -> GradientFlowFigure:
    """The figure for one layout, made once per process: rendering its axes is most of what it
    costs, and every job of a sweep with that layout draws on the same one in turn (each draw
    starts again from the rendered axes)."""
    return GradientFlowFigure(n_layers, positions, axis, log10_range)


class GradientFlowFigure:
    """Two panels, log10, one line per epoch, light (first) to dark (last): the weight-gradient
    norm per layer, and the backward signal ||dL/dh|| along its axis (`results.AXIS_LABELS`: the
    time steps, the residual stream's blocks or the hidden layers, at the probes' `positions`).
    A line that falls toward the input side (an RNN's first steps) is a vanishing gradient, one
    that rises an exploding one; the weight gradients can look balanced where the backward
    signal has vanished (`results`: why the verdicts read the backward signal).

    The y-range is fixed (`log10_range`, the same in every run of a sweep), so two runs' figures
    compare side by side; a value beyond it is drawn on its edge as a triangle pointing out.
    It is drawn every epoch, so it is kept cheap: the axes, ticks and labels (most of a draw's
    time: text layout) are rendered once, and each draw puts that image back and renders only
    the lines and the title on it (matplotlib's blitting): 38 ms a draw here before, 12 ms so,
    most of it now the PNG encoding.
    Colours stand in for a legend (a legend would be redrawn whole every time)."""

    def __init__(
        self, n_layers: int, positions: Sequence[int], axis: str, log10_range: tuple[float, float]
    ) -> None:
        self.low, self.high = log10_range
        self.figure = Figure(figsize=(9, 3.5), dpi=80)
        layers, signal = self.figure.subplots(1, 2)
        self.panels = (
            (layers, list(range(n_layers))),  # drawn from the weight-gradient profiles
            (signal, positions),  # from the backward profiles
        )
        labels = (
            (AXIS_LABELS["layer"], "log10 weight-gradient L2 norm"),
            (AXIS_LABELS[axis], "log10 backward signal ||dL/dh||"),
        )
        for (axes, xs), (xlabel, ylabel) in zip(self.panels, labels, strict=True):
            pad = max(0.5, (xs[-1] - xs[0]) / 40)
            axes.set_xlim(xs[0] - pad, xs[-1] + pad)
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_ylim(self.low, self.high)
            axes.set(xlabel=xlabel, ylabel=ylabel)
            axes.grid(alpha=0.3)
            axes.set_autoscale_on(False)  # the axes stay those of the rendered background
        self.title = self.figure.suptitle("")
        self.figure.subplots_adjust(left=0.08, right=0.98, bottom=0.14, wspace=0.25)
        self.canvas = FigureCanvasAgg(self.figure)
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(self.figure.bbox)

    def draw(
        self,
        loggers: list[Logger],
        epoch_profiles: dict[int, list[float]],
        epoch_backward_profiles: dict[int, list[float]],
        step: int,
    ) -> None:
        """Redraw with every epoch's profiles and write the image to each TensorBoard (a run
        resumed from a checkpoint older than the backward profile lacks its first epochs')."""
        writers = tensorboard_writers(loggers)
        if not writers:
            return
        last = max(epoch_profiles)
        for (axes, xs), profiles in zip(
            self.panels, (epoch_profiles, epoch_backward_profiles), strict=True
        ):
            for artist in [*axes.lines, *axes.collections]:
                artist.remove()
            for epoch, norms in profiles.items():
                colour = colormaps["viridis_r"](0.15 + 0.85 * epoch / max(last, 1))
                self.plot(axes, xs, norms, colour)
        self.title.set_text(f"gradient flow, epochs 0 (light) to {last} (dark)")
        self.canvas.restore_region(self.background)
        for axes, _ in self.panels:
            for artist in [*axes.lines, *axes.collections]:
                axes.draw_artist(artist)
        self.figure.draw_artist(self.title)
        image = np.asarray(self.canvas.buffer_rgba())[..., :3]  # what `add_figure` renders
        for writer in writers:
            writer.add_image("gradient_flow", image, step, dataformats="HWC")

    def plot(self, axes: Axes, xs: list[int], norms: list[float], colour: Any) -> None:
        """One epoch's line, log10, clamped to the y-range; a triangle where it leaves it."""
        log_norms = log10_display(torch.tensor(norms, dtype=torch.float64))
        shown = log_norms.clamp(self.low, self.high)
        x = torch.tensor(xs)
        axes.plot(x, shown, marker="o", markersize=4, color=colour)
        for beyond, marker in ((log_norms < self.low, "v"), (log_norms > self.high, "^")):
            if beyond.any():
                axes.scatter(x[beyond], shown[beyond], marker=marker, s=80, color=colour)
