"""Accuracy over the init's weight variance and the depth, with mean-field theory drawn on it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vanishlab import results, theory
from vanishlab.report.draw import draw_cells, median_cells, panels_figure
from vanishlab.report.load import CONFIG, Sweep, absent, labels

NAME = "phase_diagram"
ORDER = 40
CAPTION = (
    "Final test accuracy over the init's weight variance `sigma_w2` and the depth (median over "
    "a cell's seeds, grey: no job finished), with mean-field theory for the jobs' activation "
    "and `sigma_b2` (`vanishlab.theory`): the blue curve is Schoenholz et al.'s trainable "
    "depth, 6 xi_c (networks deeper than it are predicted not to train), and the dashed line "
    "the critical `sigma_w2`, where chi_1 = 1 and xi_c diverges."
)
# The keys it reads: the weight and bias variances of an init that has them (the weights drawn
# with variance sigma_w2 / fan_in, as the theory assumes), and the model's.
SIGMA_W2, SIGMA_B2, DEPTH, ACTIVATION = (
    "init.sigma_w2",
    "init.sigma_b2",
    "model.depth",
    "model.activation",
)


def finished(sweep: Sweep) -> pd.DataFrame:
    """The jobs with a test accuracy, a `sigma_w2` and a depth (both varied), each with its
    `panel`: its setting of the other varied keys."""
    varied = sweep.settings
    others = [key for key in varied if key not in (SIGMA_W2, DEPTH)]
    done = sweep.table.dropna(subset=[varied[SIGMA_W2], varied[DEPTH], results.TEST_ACC])
    return done.assign(panel=labels(done, varied, others))


def applies(sweep: Sweep) -> bool:
    if SIGMA_W2 not in sweep.settings or DEPTH not in sweep.settings:
        return False
    done = finished(sweep)
    return all(done[sweep.settings[key]].nunique() >= 2 for key in (SIGMA_W2, DEPTH))


def draw(sweep: Sweep) -> Figure:
    """A panel per setting of the other varied keys, and on it what mean-field theory predicts
    for the panel's activation and `init.sigma_b2`, read from its jobs' configs: the trainable
    depth, 6 xi_c (a curve), and the critical sigma_w2 (a dashed line). Depth grows upwards, as
    in Schoenholz et al.'s figures; the cells are evenly spaced whatever the grid, so a theory
    value between two grid values is drawn between their cells."""
    done = finished(sweep)
    sigma, depth = sweep.settings[SIGMA_W2], sweep.settings[DEPTH]
    sigmas, depths = sorted(done[sigma].unique()), sorted(done[depth].unique())
    panels = sorted(done["panel"].unique())
    fig, axes = panels_figure(len(panels), 0.8 * len(sigmas) + 2, 0.5 * len(depths) + 2)
    for ax, panel in zip(axes, panels, strict=True):
        jobs = done[done["panel"] == panel]
        cells = median_cells(jobs, depth, depths, sigma, sigmas, results.TEST_ACC)
        image = draw_cells(ax, cells, "RdYlGn", (0.0, 1.0), ".2f")
        config = jobs[CONFIG].iloc[0]
        drawn = draw_theory(ax, config.get(ACTIVATION), config.get(SIGMA_B2), sigmas, depths)
        ax.set_xlim(-0.5, len(sigmas) - 0.5)
        ax.set_ylim(-0.5, len(depths) - 0.5)
        ax.set(xlabel=sigma, ylabel=depth, title="\n".join(filter(None, [panel, drawn])))
    fig.colorbar(image, ax=axes, label="final test accuracy (median over seeds)")
    return fig


def draw_theory(
    ax: Axes, activation: Any, sigma_b2: Any, sigmas: list[float], depths: list[float]
) -> str:
    """Draw the trainable depth 6 xi_c over the panel's sigma_w2 range and the critical sigma_w2,
    in the heatmap's cell coordinates; return what was drawn, for the panel's title."""
    if activation not in theory.ACTIVATIONS or absent(sigma_b2):
        return f"no mean-field theory for activation={activation}, sigma_b2={sigma_b2}"
    grid = np.linspace(sigmas[0], sigmas[-1], 60)
    trainable = [theory.trainable_depth(activation, s, sigma_b2) for s in grid]
    ax.plot(
        cell_position(grid, sigmas),
        cell_position(np.array(trainable), depths),
        color="tab:blue",
        linewidth=2.5,
        label="trainable depth 6 xi_c (theory)",
    )
    critical = theory.critical_sigma_w2(activation, sigma_b2)
    ax.axvline(
        cell_position(np.array([critical]), sigmas)[0],
        color="black",
        linestyle="--",
        label=f"critical sigma_w2 = {critical:.3f}",
    )
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2)
    return f"theory for {activation}, sigma_b2={sigma_b2}"


def cell_position(values: np.ndarray, grid: list[float]) -> np.ndarray:
    """Where `values` fall on a heatmap axis whose cells hold the sorted `grid`: a grid value
    at its cell's centre, one between two grid values linearly between their cells, one beyond
    the ends on the end segment's continuation (the axes clip it); inf and nan stay so."""
    index = np.arange(len(grid), dtype=float)
    below = (values - grid[0]) / (grid[1] - grid[0])
    above = index[-1] + (values - grid[-1]) / (grid[-1] - grid[-2])
    inside = np.interp(values, grid, index)
    return np.where(values < grid[0], below, np.where(values > grid[-1], above, inside))
