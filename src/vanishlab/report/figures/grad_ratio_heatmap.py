"""The backward signal's ratio as initialised, over the init options and the other varied keys."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vanishlab import results
from vanishlab.report.draw import draw_cells, gradient_layout, median_cells, panels_figure
from vanishlab.report.load import Sweep, labels

NAME = "grad_ratio_heatmap"
ORDER = 30
CAPTION = (
    "log10 of the backward signal ||dL/dh|| at the first hidden layer over the last hidden "
    "layer as initialised (first logged step; median over a cell's jobs; a sweep recorded "
    "before it was measured shows the first-layer over last-layer weight-gradient norm, "
    "and the colour bar says which): 0 is balanced, strongly negative means the "
    "input-side layers get a vanishing signal, strongly positive an exploding one; grey "
    "cells have no data."
)
# The ratio, with its colour bar's label: the backward signal's (what the verdicts read), or in
# a sweep recorded before it was measured, the weight gradients'.
RATIOS = {
    results.at_start(results.BACKWARD_FIRST_OVER_LAST): (
        "log10(first / last hidden ||dL/dh||) at start"
    ),
    results.at_start(results.FIRST_OVER_LAST): "log10(first / last layer grad norm) at start",
}


def cells(sweep: Sweep) -> tuple[pd.DataFrame, str, str] | None:
    """The jobs with their `log_ratio`, `row`, `init` (column) and `panel`, the ratio's column
    and the rows' key (its column; "" where rows are settings); None where the heatmap has
    nothing to add: no ratio, or a single numeric key, which the accuracy figure shows already.
    Rows are the numeric varied key with the most values (e.g. depth), with a panel per setting
    of the other keys (e.g. activation); without a numeric key, a row per setting of the other
    keys, in one panel."""
    table, varied = sweep.table, sweep.settings
    inits, others, row_key = gradient_layout(table, varied)
    panel_keys = [key for key in others if key != row_key] if row_key else []
    column = next((c for c in RATIOS if table[c].notna().any()), list(RATIOS)[-1])
    ratio = table[column]
    table = table.assign(
        log_ratio=np.log10(ratio.where(np.isfinite(ratio) & (ratio > 0))),
        row=table[varied[row_key]] if row_key else labels(table, varied, others),
        init=labels(table, varied, inits),
        panel=labels(table, varied, panel_keys),
    )
    if (not inits and not panel_keys) or table["log_ratio"].isna().all():
        return None
    return table, column, varied[row_key] if row_key else ""


def applies(sweep: Sweep) -> bool:
    return cells(sweep) is not None


def draw(sweep: Sweep) -> Figure:
    table, column, row_name = cells(sweep)
    rows, columns = sorted(table["row"].unique()), sorted(table["init"].unique())
    panels = sorted(table["panel"].unique())
    limit = max(1.0, table["log_ratio"].abs().max())
    fig, axes = panels_figure(len(panels), 1.2 * len(columns) + 1.5, 0.45 * len(rows) + 2)
    for ax, panel in zip(axes, panels, strict=True):
        jobs = table[table["panel"] == panel]
        ratios = median_cells(jobs, "row", rows, "init", columns, "log_ratio")
        image = draw_cells(ax, ratios, "RdBu_r", (-limit, limit), ".1f")
        ax.set(xlabel="init", ylabel=row_name)
        ax.set_title(panel)
    fig.colorbar(image, ax=axes, label=RATIOS[column])
    return fig
