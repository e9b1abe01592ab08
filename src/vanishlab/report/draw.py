"""What figures share: colours, legends and heatmap cells."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D

from vanishlab.report.load import Sweep, labels, numeric_columns, recorded


def palette(names: Iterable[str]) -> dict[str, Any]:
    """A distinct colour per name: tab10, tab20 beyond 10 names, a continuous map beyond 20."""
    names = sorted(set(names))
    if len(names) > 20:
        return {name: colormaps["turbo"](i / (len(names) - 1)) for i, name in enumerate(names)}
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i) for i, name in enumerate(names)}


def labelled_jobs(sweep: Sweep, key: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The jobs whose record holds `key`, each labelled by its setting (`label`), and a colour
    per label (a setting's seeds share it)."""
    table = recorded(sweep.table, key)
    table = table.assign(label=labels(table, sweep.settings, sweep.settings))
    return table, palette(table["label"])


def legend(ax: Axes, colours: dict[str, Any]) -> None:
    """One entry per colour, beside the last panel (the panels share the colours)."""
    handles = [Line2D([], [], color=colour, label=name) for name, colour in colours.items()]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))


def legend_below(fig: Figure, colours: dict[str, Any]) -> None:
    """One entry per colour under the panels, whose width a setting's long label needs (a
    sweep over models varies each model's keys); none for a single colour, which needs no key."""
    if len(colours) < 2:
        return
    handles = [Line2D([], [], color=colour, label=name) for name, colour in colours.items()]
    fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncols=1 + len(handles) // 8)


def gradient_layout(
    table: pd.DataFrame, varied: dict[str, str]
) -> tuple[list[str], list[str], str | None]:
    """How the gradient figures split the varied keys: the `init` group's keys, the others, and
    of those the numeric one with the most distinct values (depth, lr, width...), if any."""
    inits = [key for key in varied if key.split(".")[0] == "init"]
    others = [key for key in varied if key not in inits]
    numeric = [key for key in others if varied[key] in numeric_columns(table, varied)]
    row_key = max(numeric, key=lambda key: table[varied[key]].nunique(), default=None)
    return inits, others, row_key


def panels_figure(count: int, panel_width: float, height: float) -> tuple[Figure, list[Axes]]:
    """A figure of `count` heatmap panels side by side, with room for their colour bar."""
    fig = Figure(figsize=(count * panel_width + 1, height), layout="constrained")
    return fig, list(fig.subplots(1, count, squeeze=False)[0])


def median_cells(
    jobs: pd.DataFrame, row: str, rows: list, column: str, columns: list, values: str
) -> pd.DataFrame:
    """The median of `values` over the jobs of each (`row`, `column`) cell (a cell's seeds), all
    `rows` and `columns` in order, NaN where no job has a value."""
    cells = jobs.pivot_table(index=row, columns=column, values=values, aggfunc="median")
    return cells.reindex(index=rows, columns=columns)


def draw_cells(
    ax: Axes, cells: pd.DataFrame, cmap: str, limits: tuple[float, float], fmt: str
) -> AxesImage:
    """`cells` as a heatmap on `ax`, grey where NaN, each value written in its cell (`fmt`);
    the ticks name the rows and columns."""
    values = cells.to_numpy(dtype=float)
    image = ax.imshow(
        np.ma.masked_invalid(values),
        cmap=colormaps[cmap].with_extremes(bad="lightgrey"),
        vmin=limits[0],
        vmax=limits[1],
        aspect="auto",
    )
    for (i, j), value in np.ndenumerate(values):
        if not math.isnan(value):
            ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(cells.columns)), cells.columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(cells.index)), cells.index, fontsize=8)
    return image
