"""Each job's sharpness against the step, beside its learning rate's stability limit."""

from __future__ import annotations

from matplotlib.figure import Figure

from vanishlab import results
from vanishlab.report.draw import legend, palette
from vanishlab.report.events import scalar_curves
from vanishlab.report.load import LR, Sweep, labels, when_recorded

NAME = "sharpness"
ORDER = 90
CAPTION = (
    "Sharpness (the training loss's top Hessian eigenvalue, `callbacks.sharpness`) against "
    "the step, one line per job, with a dashed line at its 2/lr in the same colour: above "
    "its dashed line, gradient descent at that lr is past its stability limit. Cohen et "
    "al. (2021) see sharpness rise to 2/lr and hover there."
)


applies = when_recorded(results.SHARPNESS)


def draw(sweep: Sweep) -> Figure | None:
    """A colour per setting, with a dashed line at its 2/lr in the same colour: gradient
    descent's stability limit. Cohen et al.'s edge of stability is a line that rises to its
    dashed line and stays there. None where no job logged its sharpness."""
    table = sweep.table.assign(label=labels(sweep.table, sweep.settings, sweep.settings))
    table = table.sort_values(LR, kind="stable")
    colours = palette(table["label"])
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    plotted = {}
    for job, label, lr in zip(table["job"], table["label"], table[LR], strict=True):
        curve = scalar_curves(sweep.dir / job, [results.SHARPNESS]).get(results.SHARPNESS)
        if curve is None:
            continue
        ax.plot(*curve, ".-", color=colours[label], markersize=3)
        ax.axhline(2 / lr, color=colours[label], linestyle="--", linewidth=1)
        plotted[label or "every job"] = colours[label]
    if not plotted:
        return None
    if ax.dataLim.y0 > 0 and ax.dataLim.y1 > 10 * ax.dataLim.y0:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="top Hessian eigenvalue")
    ax.set_title("sharpness (solid) and 2/lr (dashed) against step")
    ax.grid(alpha=0.3)
    legend(ax, plotted)
    return fig
