"""What vanishlab shows on its loggers beyond the raw scalars, made to be read on TensorBoard's
defaults (linear axes, outliers ignored, every card its own y-range):

- `Log10/<tag>`: log10 of the families that span decades (`Family.log10`), clamped to
  [`LOG10_FLOOR`, `LOG10_CEILING`]: a zero gradient shows as -30, not 0 or -inf. Capitals sort
  first, so the `Log10` group opens the Time Series tab. Display only: `metrics.json` and the raw
  tags keep the true values.
- a custom-scalars layout (`LAYOUT`, from `FAMILIES`): every layer of a family on one chart,
  and the backward signal's time steps (an RNN's h_t, an LSTM's c_t) and residual-stream blocks
  on charts of their own.
- per-probe histograms, and the gradient-flow figure on a fixed y-range that a key sets.

Every logger gets the scalars. The gradient-flow figure goes to TensorBoard, Weights & Biases
and MLflow (`IMAGE_LOGGERS`), the job's record to the last two (`write_record`); the layout and
the histograms are TensorBoard's own. A TensorBoard gets a measured step's scalars as one event
(`write_scalars`), as TensorFlow's merged summaries were: Lightning's `log_metrics` writes an
event per value, which costs more than measuring them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from pytorch_lightning.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from vanishlab.nets import Probe
from vanishlab.results import AXIS_LABELS

LOG10 = "Log10/"
LOG10_FLOOR, LOG10_CEILING = -30.0, 30.0  # below 1e-30 (zero included) / above 1e30 (inf)
PROBE = r"(layer|norm|recurrent|step|memory|stream)_\d+"
LAYER = r"(layer|norm|recurrent)_\d+"  # the probes with weights; the others are activations
RATIO = "first_over_last"  # a family's first probe over its last (`results.FIRST_OVER_LAST`)


@dataclass(frozen=True)
class Family:
    """A family of `GradientFlow`'s figures, logged as `<name>/<probe>` (`tag`). One that spans
    decades (`log10`) is also logged as `Log10/<name>/<probe>`, for a linear axis. `charts` are
    its Custom Scalars charts (`LAYOUT`): each a title and a regex of what follows `<name>/`,
    one line per matching tag (select one run to read its profile; every run adds its lines)."""

    name: str
    log10: bool = False
    charts: tuple[tuple[str, str], ...] = ()

    def tag(self, probe: str) -> str:
        return f"{self.name}/{probe}"

    def layout(self) -> dict[str, list]:
        """The family's charts, on its log10 tags if it has them."""
        prefix, title = (LOG10, "log10 ") if self.log10 else ("", "")
        return {
            title + chart: ["Multiline", [rf"^{prefix}{self.tag(regex)}$"]]
            for chart, regex in self.charts
        }


# GradientFlow's families (`diagnostics.GradientFlow.measure` measures each), in chart order.
GRAD_NORM = Family(
    "grad_norm",
    log10=True,
    charts=(
        ("weight-gradient norm", PROBE),
        ("first / last layer gradient norm", RATIO),
    ),
)
WEIGHT_NORM = Family("weight_norm")
UPDATE_RATIO = Family("update_ratio", log10=True, charts=(("update / weight norm", PROBE),))
BACKWARD = Family(
    "backward",
    log10=True,
    charts=(
        ("backward signal ||dL/dh||", LAYER),
        ("backward signal through time, one line per time step", r"step_\d+"),
        (
            "backward signal through the LSTM cell state, one line per time step",
            r"memory_\d+",
        ),
        ("backward signal along the residual stream, one line per block", r"stream_\d+"),
        ("first / last hidden layer backward signal", RATIO),
    ),
)
DEAD_FRAC = Family("dead_frac", charts=(("dead fraction (ReLU)", PROBE),))
SATURATED_FRAC = Family("saturated_frac", charts=(("saturated fraction (sigmoid, tanh)", PROBE),))
ACT_MEAN = Family("act_mean")
ACT_STD = Family("act_std", charts=(("activation std", PROBE),))
FAMILIES = (
    GRAD_NORM,
    WEIGHT_NORM,
    UPDATE_RATIO,
    BACKWARD,
    DEAD_FRAC,
    SATURATED_FRAC,
    ACT_MEAN,
    ACT_STD,
)
LOG10_FAMILIES = tuple(family.name for family in FAMILIES if family.log10)
LAYOUT = {
    "gradient flow, one line per layer": {
        title: chart for family in FAMILIES for title, chart in family.layout().items()
    }
}
# What keeps images of a run: the gradient-flow figure goes to each (`write_image`).
IMAGE_LOGGERS = (TensorBoardLogger, WandbLogger, MLFlowLogger)


def log10_display(values: Tensor) -> Tensor:
    """log10, clamped to [`LOG10_FLOOR`, `LOG10_CEILING`] (0 -> floor, inf -> ceiling); nan, a
    gradient StopOnDivergence dropped, stays nan and is not logged."""
    return values.log10().clamp(LOG10_FLOOR, LOG10_CEILING)


def tensorboard_writers(loggers: list[Logger]) -> list[SummaryWriter]:
    return [logger.experiment for logger in loggers if isinstance(logger, TensorBoardLogger)]


def shows_histograms(trainer: pl.Trainer) -> bool:
    """Whether histograms binned now would reach a TensorBoard: this rank has one (other
    ranks' are placeholders, `write_histograms` writes on rank 0 only). Bin nothing otherwise."""
    return trainer.is_global_zero and bool(tensorboard_writers(trainer.loggers))


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


@rank_zero_only
def write_image(loggers: list[Logger], tag: str, image: np.ndarray, step: int) -> None:
    """`image` (height, width, RGB) at `step` to every logger that keeps images
    (`IMAGE_LOGGERS`): MLflow keeps it as a step of the run's image series `tag`."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(tag, [image], step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, image, key=tag, step=step)


class OneFileTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger, writing a job's fit and test to one event file.

    Lightning finalizes its loggers after fitting and again after testing, and a writer closed
    after fitting opens a second file for the test's values. TensorBoard's Python loader
    (`EventAccumulator`) reads a run's files in name order
    (`events.out.tfevents.<second>.<host>.<pid>.<counter>`): two begun in the same second sort by
    their counters as text (`.14` before `.6`), so after a fit of under a second it could read
    the test's file first and drop the training's steps as out of order. Here a
    successful `finalize` flushes the writer and leaves it open, and the job's end closes it
    (`write_record`); a failure closes it at once."""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if status != "success":
            super().finalize(status)
            return
        if self._experiment is not None:
            self.experiment.flush()
        self.save()

    def close(self) -> None:
        """The job has ended: its writer closes (`finalize` flushed it and saved the hparams)."""
        if self._experiment is not None:
            self._experiment.close()


@rank_zero_only
def write_record(loggers: list[Logger], record: dict[str, Any], step: int) -> None:
    """The numbers of a job's record, as `record/<key>` at its last `step`, to its W&B and
    MLflow runs, which live apart from the job's directory (TensorBoard reads the record as its
    HParams row); then the job's runs end: a stacked job's W&B run or TensorBoard writer is one
    of several in the process, and would otherwise stay open until the process ends."""
    numbers = {f"record/{k}": v for k, v in record.items() if isinstance(v, int | float)}
    for logger in loggers:
        if isinstance(logger, WandbLogger | MLFlowLogger):
            logger.log_metrics(numbers, step)
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
        if isinstance(logger, OneFileTensorBoardLogger):
            logger.close()


def write_layout(loggers: list[Logger]) -> None:
    """Each run writes the same layout; TensorBoard merges them into one."""
    for writer in tensorboard_writers(loggers):
        writer.add_custom_scalars(LAYOUT)


def probe_histograms(
    probes: list[Probe],
    weights: list[Tensor],
    grads: list[Tensor | None],
    activations: dict[str, Tensor],
) -> dict[str, Tensor | None]:
    """What `GradientFlow` shows as histograms, by tag, every tensor with the jobs along dim 0:
    the probes' weights and their gradients (both in `probes`' order) and the output
    activations of every probe (`weights/layer_00`, ...)."""
    return {
        f"{family}/{probe.name}": tensor
        for probe, weight, grad in zip(probes, weights, grads, strict=True)
        for family, tensor in (
            ("weights", weight),
            ("grads", grad),
            ("activations", activations[probe.name]),
        )
    }


def job_histograms(
    values: dict[str, Tensor | None], bins: int = 64
) -> list[dict[str, HistogramProto]]:
    """Each job's histograms of `values` by tag, every tensor with the jobs along dim 0 (one
    for a single run, a fused stack's K), binned at once (`histogram_protos`). A tag is left out
    of a job's where its tensor is None (a gradient StopOnDivergence cleared) or none of the
    job's values is finite (`SummaryWriter.add_histogram` fails on non-finite values)."""
    protos = {tag: histogram_protos(t, bins) for tag, t in values.items() if t is not None}
    jobs = len(next(iter(protos.values()), []))
    return [{tag: p[k] for tag, p in protos.items() if p[k] is not None} for k in range(jobs)]


@rank_zero_only  # as write_scalars: other ranks' TensorBoards are placeholders
def write_histograms(
    loggers: list[Logger], histograms: dict[str, HistogramProto], step: int
) -> None:
    """`histograms` by tag (`job_histograms`) to every TensorBoard as one event, as
    `write_scalars` writes scalars (`SummaryWriter`'s `add_histogram_raw` writes an event per
    histogram)."""
    summary = Summary()
    for tag, histogram in histograms.items():
        summary.value.add(tag=tag, histo=histogram)
    if summary.value:
        for writer in tensorboard_writers(loggers):
            writer._get_file_writer().add_summary(summary, step)  # as in `write_scalars`


def job_rows(values: Tensor) -> Tensor:
    """`values` (K, ...) as (K, n), each job's values in the order they lie in memory: a view
    where each job's values are dense in some order (a weight laid out as its gradient), which
    `flatten` would copy. A histogram does not depend on the order of its values."""
    dims = sorted(range(1, values.ndim), key=lambda d: values.stride(d), reverse=True)
    return values.permute(0, *dims).flatten(1)


def histogram_protos(values: Tensor, bins: int) -> list[HistogramProto | None]:
    """Each job's (dim 0) finite values binned on the device into `bins` equal buckets from
    their least to their greatest (the last bucket holds the greatest), as `torch.histc` bins
    them; None for a job with no finite value or none at all. The jobs share the passes over
    their values, one host-device sync and one `bincount` (of each value's bucket, offset by
    its job's: it costs the CPU less than `histc`), where one by one each would pay its own."""
    rows = job_rows(values.detach().float())
    if not rows.shape[1]:
        return [None] * len(rows)
    squares = torch.linalg.vecdot(rows, rows)
    # (`aminmax` along a dim is many times slower than `amin` and `amax` on the CPU)
    summaries = torch.stack([rows.amin(1), rows.amax(1), rows.sum(1), squares], dim=1)
    summary = summaries.tolist()
    # A job's least and greatest are finite where all its values are (its sum of squares may
    # still overflow, as TensorBoard's own histogram would).
    if not all(math.isfinite(v) for row in summary for v in row[:2]):
        # rare (an overflowing activation): a copy of each job's finite values is slow
        return [histogram_protos(row[torch.isfinite(row)][None], bins)[0] for row in rows]
    low, high = summaries[:, 0:1], summaries[:, 1:2]
    same = low == high  # histc's range is then widened by 1 each way
    first, last = torch.where(same, low - 1, low), torch.where(same, high + 1, high)
    # histc's own order of operations, in the values' dtype (another rounds some values into
    # the next bucket), in place past the first: each new large tensor costs fresh pages
    buckets = (rows - first).mul_(bins).div_(last - first).int().clamp_(0, bins - 1)
    buckets += torch.arange(0, len(rows) * bins, bins, device=rows.device, dtype=torch.int)[:, None]
    counts = torch.bincount(buckets.flatten(), minlength=len(rows) * bins).view(-1, bins)
    return [
        HistogramProto(
            min=low_k,
            max=high_k,
            num=rows.shape[1],
            sum=total,
            sum_squares=squares,
            bucket_limit=torch.linspace(low_k, high_k, bins + 1)[1:].tolist(),
            bucket=bucket,
        )
        for (low_k, high_k, total, squares), bucket in zip(summary, counts.tolist(), strict=True)
    ]


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
    the lines and the title on it (matplotlib's blitting).
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
        """Redraw with every epoch's profiles and write the image to each logger that keeps
        images (a run resumed from a checkpoint older than the backward profile lacks its first
        epochs')."""
        if not any(isinstance(logger, IMAGE_LOGGERS) for logger in loggers):
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
        write_image(loggers, "gradient_flow", image, step)

    def plot(self, axes: Axes, xs: list[int], norms: list[float], colour: Any) -> None:
        """One epoch's line, log10, clamped to the y-range; a triangle where it leaves it."""
        log_norms = log10_display(torch.tensor(norms, dtype=torch.float64))
        shown = log_norms.clamp(self.low, self.high)
        x = torch.tensor(xs)
        axes.plot(x, shown, marker="o", markersize=4, color=colour)
        for beyond, marker in ((log_norms < self.low, "v"), (log_norms > self.high, "^")):
            if beyond.any():
                axes.scatter(x[beyond], shown[beyond], marker=marker, s=80, color=colour)
