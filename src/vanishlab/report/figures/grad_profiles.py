"""Each job's weight-gradient norm per layer as initialised."""

from __future__ import annotations

from matplotlib.figure import Figure

from vanishlab import results
from vanishlab.report.draw import gradient_layout, legend_below, palette
from vanishlab.report.load import Sweep, labels, recorded, when_recorded

NAME = "grad_profiles"
ORDER = 50
CAPTION = (
    "Each line is one job's weight-gradient norm per layer at the first logged step (layer 0 "
    "is the input side, log scale): a line rising steeply to the right means the gradient "
    "vanishes on its way back to the input, one falling to the right means it explodes."
)


applies = when_recorded(results.GRAD_NORMS_AT_START)


def draw(sweep: Sweep) -> Figure:
    """A panel per init option, a colour per setting of the other keys but the longest numeric
    one (depth: a line's length shows it)."""
    varied = sweep.settings
    inits, others, row_key = gradient_layout(sweep.table, varied)
    table = recorded(sweep.table, results.GRAD_NORMS_AT_START)
    table = table.assign(
        label=labels(table, varied, [key for key in others if key != row_key]),
        panel=labels(table, varied, inits),
    )
    panels = sorted(table["panel"].unique())
    colours = palette(table["label"])
    fig = Figure(figsize=(max(4.5 * len(panels) + 1.5, 8), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, panel in zip(axes, panels, strict=True):
        for job in table[table["panel"] == panel].itertuples():
            ax.plot(job.grad_norms_at_start, marker=".", color=colours[job.label], alpha=0.8)
        ax.set_yscale("log")
        ax.set(xlabel=results.AXIS_LABELS["layer"], title=panel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("weight-gradient norm at start")
    legend_below(fig, colours)
    return fig
