"""The backward signal along each job's signal axis, as initialised and at the end."""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vanishlab import results
from vanishlab.report.draw import labelled_jobs, legend_below
from vanishlab.report.load import Sweep, when_recorded

NAME = "backward_profiles"
ORDER = 60
CAPTION = (
    "The backward signal ||dL/dh|| (log scale) along each job's signal axis: its time steps "
    "(a recurrent network's hidden state), its residual stream's blocks, else its hidden "
    "layers (0 = input side); at the first measured step (as initialised) and the last, a "
    "line per job coloured by its setting. A line that falls toward the input side (step "
    "0) is a vanishing signal, one that rises there an exploding one; its first value over "
    "its last is the backward ratio the verdicts read."
)
# The start and end panels: their record keys.
PANELS = {
    "first measured step": results.BACKWARD_NORMS_START,
    "last measured step": results.BACKWARD_NORMS,
}


applies = when_recorded(results.SIGNAL_AXIS)


def draw(sweep: Sweep) -> Figure:
    """A row per signal axis the sweep has (`results.SIGNAL_AXIS`: time steps, the residual
    stream's blocks, or the hidden layers), a column per `PANELS`, a line per job coloured by
    its setting (a setting's seeds share its colour)."""
    table, colours = labelled_jobs(sweep, results.SIGNAL_AXIS)
    axes_names = sorted(table[results.SIGNAL_AXIS].unique())
    fig = Figure(figsize=(10, 3.5 * len(axes_names) + 1), layout="constrained")
    grid = fig.subplots(len(axes_names), len(PANELS), squeeze=False, sharey=True)
    for row, axis in zip(grid, axes_names, strict=True):
        jobs = table[table[results.SIGNAL_AXIS] == axis].to_dict("records")
        for ax, (when, key) in zip(row, PANELS.items(), strict=True):
            for job in (job for job in jobs if isinstance(job[key], dict)):
                x = [results.axis_position(probe) for probe in job[key]]
                ax.plot(x, list(job[key].values()), ".-", color=colours[job["label"]], alpha=0.8)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, blocks, layers
            ax.set(xlabel=results.AXIS_LABELS[axis], title=when)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("||dL/dh||")
    fig.suptitle("backward signal along each job's signal axis")
    legend_below(fig, colours)
    return fig
