"""Each job's hidden-stack Jacobian spectrum, as initialised and at the end."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from vanishlab import results
from vanishlab.report.draw import labelled_jobs, legend_below
from vanishlab.report.load import Sweep, when_recorded

NAME = "jacobian_spectra"
ORDER = 70
CAPTION = (
    "The hidden stack's input-output Jacobian (`callbacks=jacobian`): its singular values' "
    "log10 as quantiles over the measured inputs, smallest (left) to largest (right), as "
    "initialised and at the end, a line per job coloured by its setting. A flat line at 0 "
    "(dotted) is dynamical isometry, every direction passed on unchanged; a steep one, a "
    "spectrum spread over decades, passes a few directions and loses the rest."
)
# The start and end panels: their record keys.
PANELS = {
    "first measured step": results.JACOBIAN_QUANTILES_START,
    "end of training": results.JACOBIAN_QUANTILES,
}


applies = when_recorded(results.JACOBIAN_QUANTILES)


def draw(sweep: Sweep) -> Figure:
    """The spectrum in brief (`results.JACOBIAN_QUANTILES`: the log10 singular values'
    quantiles), a panel per `PANELS`, a line per job coloured by its setting, and a dotted line
    at 0: a flat line there is dynamical isometry."""
    table, colours = labelled_jobs(sweep, results.JACOBIAN_QUANTILES)
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    axes = fig.subplots(1, len(PANELS), sharey=True)
    for ax, (when, key) in zip(axes, PANELS.items(), strict=True):
        for job in table.to_dict("records"):
            if isinstance(job[key], list):
                levels = np.linspace(0, 1, len(job[key]))
                ax.plot(levels, job[key], ".-", color=colours[job["label"]], alpha=0.8)
        ax.axhline(0, color="black", linestyle=":", linewidth=1)
        ax.set(xlabel="quantile (0: smallest, 1: largest)", title=when)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("log10 singular value")
    fig.suptitle("singular values of the hidden stack's Jacobian dh_last / dh_first")
    legend_below(fig, colours)
    return fig
