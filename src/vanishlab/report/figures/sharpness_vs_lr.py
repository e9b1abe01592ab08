"""Each job's final sharpness against its learning rate, beside the stability limit 2/lr."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from vanishlab import results
from vanishlab.report.draw import legend, palette
from vanishlab.report.load import LR, Sweep, outcomes, recorded

NAME = "sharpness_vs_lr"
ORDER = 100
CAPTION = (
    "Each job's sharpness at its last measured step against its learning rate, coloured "
    "by verdict; the dashed curve is 2/lr, gradient descent's stability limit."
)


def applies(sweep: Sweep) -> bool:
    return recorded(sweep.table, results.SHARPNESS)[LR].nunique() >= 2


def draw(sweep: Sweep) -> Figure:
    """Jobs on or above the curve 2/lr ended at or past gradient descent's stability limit."""
    done = recorded(sweep.table, results.SHARPNESS)
    outcome = outcomes(done)
    colours = palette(outcome)
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(done[LR], done[results.SHARPNESS], c=[colours[o] for o in outcome], zorder=2)
    lrs = np.geomspace(done[LR].min(), done[LR].max(), 100)
    ax.plot(lrs, 2 / lrs, "k--", linewidth=1)
    ax.set_xscale("log")
    if (done[results.SHARPNESS] > 0).all():
        ax.set_yscale("log")
    ax.set(xlabel=LR, ylabel="top Hessian eigenvalue at the end")
    ax.set_title("final sharpness against lr; dashed: 2/lr")
    ax.grid(alpha=0.3)
    legend(ax, colours)
    return fig
