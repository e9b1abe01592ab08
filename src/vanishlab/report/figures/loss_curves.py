"""Training and validation loss against the step, read from the jobs' TensorBoard events."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from vanishlab import results
from vanishlab.report.draw import legend, palette
from vanishlab.report.events import LOSS_TAGS, logged, scalar_curves
from vanishlab.report.load import Sweep, outcomes

NAME = "loss_curves"
ORDER = 80
CAPTION = (
    "Training and validation loss against the training step, one line per job coloured by "
    "its verdict (diverged jobs left out): a flat line did not learn."
)


def applies(sweep: Sweep) -> bool:
    return any(logged(sweep.dir / job) for job in sweep.table["job"])


def draw(sweep: Sweep) -> Figure | None:
    """A line per job, coloured by verdict (or status); None where no job logged a loss.
    Diverged jobs are left out: their loss, 1e20 and beyond, would flatten every other line."""
    table = sweep.table[sweep.table[results.STATUS] != results.Status.DIVERGED]
    outcome = outcomes(table)
    colours = palette(outcome)
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = dict(zip(LOSS_TAGS, fig.subplots(1, len(LOSS_TAGS)), strict=True))
    plotted = set()
    for job, name in zip(table["job"], outcome, strict=True):
        for tag, (steps, values) in scalar_curves(sweep.dir / job, LOSS_TAGS).items():
            values = np.asarray(values, dtype=float)
            ok = np.isfinite(values) & (values > 0)  # a diverged loss ends the line
            if ok.any():
                axes[tag].plot(np.asarray(steps)[ok], values[ok], ".-", color=colours[name])
                plotted.add(name)
    if not plotted:
        return None
    for tag, ax in axes.items():
        ax.set(xlabel="step", ylabel=tag, title=tag)
        ax.grid(alpha=0.3)
        if not ax.has_data():  # e.g. train/loss when an epoch is shorter than log_every_n_steps
            ax.text(0.5, 0.5, f"no {tag} logged", transform=ax.transAxes, ha="center")
        elif ax.dataLim.y1 > 10 * ax.dataLim.y0:  # exploding losses span decades
            ax.set_yscale("log")
    legend(ax, {name: colour for name, colour in colours.items() if name in plotted})
    return fig
