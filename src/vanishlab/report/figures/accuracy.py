"""Test accuracy against each numeric key the sweep varies."""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vanishlab import results
from vanishlab.report.draw import palette
from vanishlab.report.load import Sweep, labels, numeric_columns

NAME = "accuracy"
ORDER = 20
CAPTION = (
    "Final test accuracy against each numeric varied key, a panel each, one line per setting "
    "of the other varied keys (with seeds: the mean over them, bars +- one standard deviation, "
    "a faint dot per seed): a line near 0.1 (chance) is a setting that did not learn."
)


def columns(sweep: Sweep) -> list[str]:
    """The numeric varied columns that some job with a test accuracy has."""
    done = sweep.table[sweep.table[results.TEST_ACC].notna()]
    return [c for c in numeric_columns(sweep.table, sweep.settings) if done[c].notna().any()]


def applies(sweep: Sweep) -> bool:
    return bool(columns(sweep))


def draw(sweep: Sweep) -> Figure:
    panels = columns(sweep)
    fig = Figure(figsize=(8, 4.5 * len(panels)), layout="constrained")
    for ax, column in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels, strict=True):
        draw_panel(ax, sweep, column)
    return fig


def draw_panel(ax: Axes, sweep: Sweep, column: str) -> None:
    """Test accuracy against `column`, a line per setting of the other keys through the mean of
    its jobs at each value, with bars of +- one standard deviation and a faint dot per job: jobs
    that share a point differ only in their seed (the seed's keys are not settings), and a line
    through every seed would zig-zag. One job per point: no bars."""
    varied = sweep.settings
    others = [key for key, name in varied.items() if name != column]
    table = sweep.table.assign(label=labels(sweep.table, varied, others))
    done = table.dropna(subset=[column, results.TEST_ACC])
    colours = palette(done["label"])
    for label, group in done.groupby("label", sort=True):
        ax.plot(group[column], group[results.TEST_ACC], ".", color=colours[label], alpha=0.4)
        points = group.groupby(column)[results.TEST_ACC].agg(["mean", "std"])
        ax.errorbar(
            points.index,
            points["mean"],
            yerr=points["std"],
            fmt="o-",
            capsize=3,
            color=colours[label],
            label=label or None,
        )
    low, high = done[column].min(), done[column].max()
    if low > 0 and high / low > 100:  # lr-like: spans more than two decades
        ax.set_xscale("log")
    elif done[column].nunique() <= 12:
        ax.set_xticks(sorted(done[column].unique()))
    ax.set(xlabel=column, ylabel="test accuracy", ylim=(-0.02, 1.02))
    ax.set_title(f"final test accuracy vs {column}")
    ax.grid(alpha=0.3)
    if others:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
