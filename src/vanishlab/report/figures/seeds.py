"""Each setting's seeds: what the seed summary's mean and spread hide."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from vanishlab import results
from vanishlab.report.draw import legend, palette
from vanishlab.report.load import (
    ACC_MEAN,
    ACC_STD,
    VERDICTS,
    Sweep,
    labels,
    outcomes,
    seed_summary,
)

NAME = "accuracy_over_seeds"
ORDER = 10
CAPTION = (
    "Each setting's seeds: a dot per seed's final test accuracy, coloured by its verdict (its "
    "status if it has none), and in black their mean +- one standard deviation; the label's "
    "second line counts the verdicts, jobs without an accuracy included."
)


def applies(sweep: Sweep) -> bool:
    return sweep.seeded and sweep.table[results.TEST_ACC].notna().any()


def draw(sweep: Sweep) -> Figure:
    """A row per setting, best mean on top, with a dot per seed's test accuracy coloured by its
    verdict, and the mean +- one standard deviation in black. The dots show what a mean and a
    spread hide: seeds that split into two clusters (a class that died)."""
    settings, summary = sweep.settings, seed_summary(sweep.table, sweep.settings)
    table = sweep.table.assign(
        setting=labels(sweep.table, settings, settings), outcome=outcomes(sweep.table)
    )
    done = table.dropna(subset=[results.TEST_ACC])
    colours = palette(done["outcome"])
    fig = Figure(figsize=(8, 0.6 * len(summary) + 1.5), layout="constrained")
    ax = fig.subplots()
    for y, (setting, row) in enumerate(summary.iterrows()):
        jobs = done[done["setting"] == setting]
        spread = np.linspace(-0.2, 0.2, len(jobs) + 2)[1:-1]  # seeds side by side, not stacked
        ax.scatter(jobs[results.TEST_ACC], y + spread, c=[colours[o] for o in jobs["outcome"]])
        ax.errorbar(row[ACC_MEAN], y, xerr=row[ACC_STD], fmt="|", color="black", capsize=4)
    ticks = [f"{setting or 'every job'}\n{row[VERDICTS]}" for setting, row in summary.iterrows()]
    ax.set_yticks(range(len(summary)), ticks, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="test accuracy", xlim=(-0.02, 1.02))
    ax.set_title("final test accuracy of each seed, per setting")
    ax.grid(alpha=0.3, axis="x")
    legend(ax, colours)
    return fig
