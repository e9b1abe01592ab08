"""Summarise a sweep: `python -m vanishlab.report [sweep dir]` (default: the newest sweep under
./outputs/sweeps/) writes `<sweep>/report/`: `results.csv`, the figures, and `report.md` showing
both.

The report reads only what the jobs left on disk (`.hydra/config.yaml`, `metrics.json`, the
TensorBoard events), so it works on any sweep, one still running or with failed jobs included:
a job that is running (or was killed) is `started`, and one with `.hydra/` but no `metrics.json`
is `unfinished`.

What varied is found from the saved configs, not from the command line: every dotted config key
whose value differs between jobs, or that only some jobs have (`init.std` exists for `init=normal`
only). Values are resolved, with each job's paths as placeholders (`<paths.output_dir>` reads the
same in every job); `_`-keys but `_target_` (`_partial_`), keys under `paths.` and `hydra` and the
directories each job writes to (`output_dir`, `dirpath`, `save_dir`, `default_root_dir`) are
left out. A key's column is its shortest dotted suffix that
no other config key ends with: `model.depth` -> `depth`, `optimizer.lr` -> `lr`, but `init.std`
stays `init.std` because `data.std` exists, so a name never hides which key it is. An option's
`_target_` is named after its group and holds the function or class name, lowercased as in the
HParams table: `init._target_` -> `init` = `xavier_normal`.

Seeds: when `seed` varies, jobs that differ only in the seed (and keys that copy it, `data.seed`
= `${seed}`) are one setting run again, so the report summarises them together. `report.md`
opens with the seed summary, also written as `seed_summary.csv`: a row per setting of the other
varied keys, with `seeds` (its jobs), `test/acc mean` and `test/acc std` (sample standard
deviation) over the seeds that have a test accuracy, and `verdicts` (e.g. `2 trained, 1 dead`;
a job without a verdict counts by its status). The figures treat the seed the same way: the
accuracy plots draw the mean over seeds with +- one standard deviation, the heatmap takes a cell's
median, and `accuracy_over_seeds.png` shows every seed's accuracy and verdict per setting, so a
sweep over seeds alone gets a figure too. `results.csv` keeps one row per job.

A sweep over `init.sigma_w2` and `model.depth` (`experiment=criticality`) also gets the phase
diagram: accuracy over the two with mean-field theory drawn on it, for the activation and
`init.sigma_b2` read from the jobs' configs, whether or not they vary.
"""

from __future__ import annotations

import argparse
import math
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf
from tensorboard.compat.proto.event_pb2 import Event, SessionLog

from vanishlab import ConfigError, exit_with, results, theory

# results.csv's columns after the varied keys, and the metrics.json key each one comes from.
RESULTS = {
    results.STATUS: results.STATUS,
    results.VERDICT: results.VERDICT,
    results.VAL_ACC: results.VAL_ACC,
    results.TEST_ACC: results.TEST_ACC,
    results.TEST_LOSS: results.TEST_LOSS,
    results.FIRST_OVER_LAST: results.FIRST_OVER_LAST,
    "first_over_last_at_start": results.START,
    results.BACKWARD_FIRST_OVER_LAST: results.BACKWARD_FIRST_OVER_LAST,
    "backward_first_over_last_at_start": results.BACKWARD_START,
    results.SHARPNESS: results.SHARPNESS,
    results.SHARPNESS_TIMES_LR: results.SHARPNESS_TIMES_LR,
    results.TRAIN_SECONDS: results.TRAIN_SECONDS,
    results.ERROR: results.ERROR,
}
# Record keys the figures read, kept in the table beside its columns (lists and dicts: not in
# results.csv).
PROFILES = (
    results.GRAD_NORMS_AT_START,
    results.BACKWARD_NORMS_START,
    results.BACKWARD_NORMS,
    results.SIGNAL_AXIS,
    results.JACOBIAN_QUANTILES_START,
    results.JACOBIAN_QUANTILES,
)
# The start and end panels of the backward-profile and Jacobian-spectrum figures: their keys.
BACKWARD_PANELS = {
    "first measured step": results.BACKWARD_NORMS_START,
    "last measured step": results.BACKWARD_NORMS,
}
SPECTRUM_PANELS = {
    "first measured step": results.JACOBIAN_QUANTILES_START,
    "end of training": results.JACOBIAN_QUANTILES,
}
# Columns shown only when some job has them (a job records them with the callback on).
OPTIONAL_RESULTS = (results.SHARPNESS, results.SHARPNESS_TIMES_LR)
PER_JOB_DIRS = ("output_dir", "dirpath", "save_dir", "default_root_dir")
LOSS_TAGS = ("train/loss", "val/loss")
LR = "optimizer.lr"  # each job's, varied or not: the sharpness figures draw 2/lr
# The heatmap's ratio, with its colour bar's label: the backward signal's (what the verdicts read),
# or in a sweep recorded before it was measured, the weight gradients'.
HEATMAP_RATIOS = {
    "backward_first_over_last_at_start": "log10(first / last hidden ||dL/dh||) at start",
    "first_over_last_at_start": "log10(first / last layer grad norm) at start",
}
# The seed summary's columns after the setting's keys.
SEEDS, ACC_MEAN, ACC_STD, VERDICTS = "seeds", "test/acc mean", "test/acc std", "verdicts"
SEED_SUMMARY = "seed_summary.csv"
CONFIG = "config"  # each job's dotted config, for figures that read keys no job varies
# The phase diagram's keys: init=variance_scaling's weight and bias variances, and the model's.
SIGMA_W2, SIGMA_B2, DEPTH, ACTIVATION = (
    "init.sigma_w2",
    "init.sigma_b2",
    "model.depth",
    "model.activation",
)


def job_dirs(sweep_dir: Path) -> list[Path]:
    """A sweep's jobs: the subdirectories where Hydra saved a composed config."""
    return sorted(path.parents[1] for path in sweep_dir.glob("*/.hydra/config.yaml"))


def job_config(job_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The job's config as dotted keys with resolved values (`${trainer.max_epochs}` reads as the
    number): the identity its record keeps, or, for a job without one, its saved
    `.hydra/config.yaml` resolved the same way. `_`-keys other than `_target_` are left out."""
    config = record.get(results.JOB_CONFIG)
    if config is None:
        config = results.job_identity(OmegaConf.load(job_dir / ".hydra" / "config.yaml"))
    return {
        key: value
        for key, value in results.flatten(config).items()
        if not any(part.startswith("_") and part != "_target_" for part in key.split("."))
    }


def job_record(job_dir: Path) -> dict[str, Any]:
    """The job's `metrics.json`; a job that has not written one yet is `unfinished`."""
    return results.read_record(job_dir / "metrics.json") or {results.STATUS: "unfinished"}


def varied_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Dotted keys whose value differs between jobs (a missing key counts as a value), in config
    order, without the keys that differ only because each job has its own directory."""
    keys = dict.fromkeys(key for config in configs for key in config)
    return [
        key
        for key in keys
        if key.split(".")[0] not in ("paths", "hydra")
        and not any(part in key for part in PER_JOB_DIRS)
        and len({repr(config.get(key, ...)) for config in configs}) > 1
    ]


def column_names(keys: list[str], all_keys: Iterable[str]) -> dict[str, str]:
    """Each key's column name (rules: module docstring)."""
    all_keys = set(all_keys)
    names = {}
    for key in keys:
        parts = key.split(".")
        if parts[-1] == "_target_":
            names[key] = ".".join(parts[:-1])
            continue
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if not any(other != key and f".{other}".endswith(f".{name}") for other in all_keys):
                break
        names[key] = name
    return names


def load_sweep(sweep_dir: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """One row per job: `job`, the varied keys, the `RESULTS` columns, and for the figures the
    `PROFILES`, `optimizer.lr` and the job's `CONFIG`; best test accuracy first, so
    failed and unfinished jobs (no accuracy) come last. Also returns each varied key's column
    name."""
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise ConfigError(not_a_sweep(sweep_dir))
    records = [job_record(job) for job in jobs]
    configs = [job_config(job, record) for job, record in zip(jobs, records, strict=True)]
    keys = varied_keys(configs)
    varied = column_names(keys, (key for config in configs for key in config))
    rows = []
    for job, config, record in zip(jobs, configs, records, strict=True):
        row: dict[str, Any] = {"job": job.name}
        for key, column in varied.items():
            value = config.get(key)
            is_target = key.endswith("._target_") and value is not None
            row[column] = results.option_name(value) if is_target else value
        row.update({column: record.get(source) for column, source in RESULTS.items()})
        row.update({key: record.get(key) for key in PROFILES})
        row[CONFIG] = config
        row[LR] = config.get(LR)
        rows.append(row)
    table = pd.DataFrame(rows)
    numbers = [c for c in RESULTS if c not in (results.STATUS, results.VERDICT, results.ERROR)]
    table[numbers] = table[numbers].apply(pd.to_numeric)
    table = table.sort_values(results.TEST_ACC, ascending=False, na_position="last", kind="stable")
    return table.reset_index(drop=True), varied


def without_seed(table: pd.DataFrame, varied: dict[str, str]) -> dict[str, str]:
    """The varied keys less the seed's: `seed` and every key equal to it in each job (`data.seed`
    reads `${seed}`). Jobs that differ only in those run one setting again with another seed, so
    the summary and the figures take them together, not as settings of their own."""
    if results.SEED not in varied:
        return varied
    seed = table[varied[results.SEED]]
    return {key: column for key, column in varied.items() if not (table[column] == seed).all()}


def outcomes(table: pd.DataFrame) -> pd.Series:
    """Each job's verdict, or its status if it has none (failed, unfinished, started)."""
    return table[results.VERDICT].fillna(table[results.STATUS])


def seed_summary(table: pd.DataFrame, settings: dict[str, str]) -> pd.DataFrame:
    """One row per setting of the `settings` keys (the varied keys less the seed's): their
    values, the `SEEDS` that ran it, the mean and sample standard deviation of their test
    accuracy, and how many got each verdict. Best mean first; indexed by the setting's label."""
    table = table.assign(setting=labels(table, settings, settings), outcome=outcomes(table))
    rows = {
        setting: {
            **group.iloc[0][list(settings.values())].to_dict(),
            SEEDS: len(group),
            ACC_MEAN: group[results.TEST_ACC].mean(),
            ACC_STD: group[results.TEST_ACC].std(),
            VERDICTS: counts(group["outcome"]),
        }
        for setting, group in table.groupby("setting", sort=False)
    }
    summary = pd.DataFrame.from_dict(rows, orient="index")
    return summary.sort_values(ACC_MEAN, ascending=False, na_position="last", kind="stable")


def not_a_sweep(path: Path) -> str:
    if not path.exists():
        why = "it does not exist"
    elif (path / ".hydra" / "config.yaml").is_file():
        why = "it is a single run, not a sweep"
    else:
        why = "no subdirectory holds a job's .hydra/config.yaml"
    return (
        f"{path} is not a sweep directory: {why}. Fix: pass the directory a multirun wrote "
        f"(`python -m vanishlab.train -m ...`), e.g. outputs/sweeps/<date>/<time>, or no "
        f"argument for the newest sweep under ./outputs/sweeps/."
    )


def newest_sweep() -> Path:
    """The newest sweep under ./outputs/sweeps/, where sweeps launched from this directory land:
    `<date>/<time>` names sort by time, and Hydra writes `multirun.yaml` as a sweep starts (a
    sweep.dir named by hand is not a candidate)."""
    root = Path.cwd() / "outputs" / "sweeps"
    sweeps = sorted(path.parent for path in root.glob("*/*/multirun.yaml"))
    if not sweeps:
        raise ConfigError(
            f"there is no sweep under {root}. Fix: run one (`python -m vanishlab.train -m "
            f"model.depth=2,8`), or pass a sweep directory: python -m vanishlab.report <dir>."
        )
    return sweeps[-1]


def absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def labels(table: pd.DataFrame, varied: dict[str, str], keys: Iterable[str]) -> pd.Series:
    """Each job's values of the varied `keys` as one label, e.g. `normal, init.std=1.0, lr=0.1`
    (an option's name stands alone; keys the job does not have are left out)."""

    def label(row: dict[str, Any]) -> str:
        parts = [
            str(row[varied[key]])
            if key.endswith("._target_")
            else f"{varied[key]}={row[varied[key]]}"
            for key in keys
            if not absent(row[varied[key]])
        ]
        return ", ".join(parts)

    return pd.Series([label(row) for row in table.to_dict("records")], index=table.index)


def numeric_columns(table: pd.DataFrame, varied: dict[str, str]) -> list[str]:
    """Varied columns with numbers and at least two distinct values: each gets an accuracy plot."""
    return [
        column
        for column in varied.values()
        if pd.api.types.is_numeric_dtype(table[column])
        and not pd.api.types.is_bool_dtype(table[column])
        and table[column].nunique() >= 2
    ]


def plot_accuracy(table: pd.DataFrame, varied: dict[str, str], column: str) -> Figure | None:
    """Test accuracy against `column`, a line per setting of the other `varied` keys through the
    mean of its jobs at each value, with bars of +- one standard deviation and a faint dot per
    job: jobs that share a point differ only in their seed (the seed's keys are not in
    `varied`), and a line through every seed would zig-zag. One job per point: no bars."""
    others = [key for key, name in varied.items() if name != column]
    table = table.assign(label=labels(table, varied, others))
    done = table.dropna(subset=[column, results.TEST_ACC])
    if done.empty:
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
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
    return fig


def plot_seeds(
    table: pd.DataFrame, settings: dict[str, str], summary: pd.DataFrame
) -> Figure | None:
    """The seed summary drawn: a row per setting, best mean on top, with a dot per seed's test
    accuracy coloured by its verdict, and the mean +- one standard deviation in black. The dots
    show what a mean and a spread hide: seeds that split into two clusters (a class that died)."""
    table = table.assign(setting=labels(table, settings, settings), outcome=outcomes(table))
    done = table.dropna(subset=[results.TEST_ACC])
    if done.empty:
        return None
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


def plot_grad_ratio_heatmap(table: pd.DataFrame, varied: dict[str, str]) -> Figure | None:
    """log10 backward-signal ratio at the start (`HEATMAP_RATIOS`), init options as columns. Rows
    are the numeric varied key with the most values (e.g. depth), with a panel per setting of the
    other keys (e.g. activation); without a numeric key, a row per setting of the other keys, in
    one panel."""
    inits, others, row_key = gradient_layout(table, varied)
    panel_keys = [key for key in others if key != row_key] if row_key else []
    column = next((c for c in HEATMAP_RATIOS if table[c].notna().any()), "first_over_last_at_start")
    ratio = table[column]
    table = table.assign(
        log_ratio=np.log10(ratio.where(np.isfinite(ratio) & (ratio > 0))),
        row=table[varied[row_key]] if row_key else labels(table, varied, others),
        init=labels(table, varied, inits),
        panel=labels(table, varied, panel_keys),
    )
    only_one_number = not inits and not panel_keys  # the accuracy plot shows it already
    if only_one_number or table["log_ratio"].isna().all():
        return None
    rows, columns = sorted(table["row"].unique()), sorted(table["init"].unique())
    panels = sorted(table["panel"].unique())
    limit = max(1.0, table["log_ratio"].abs().max())
    fig = Figure(
        figsize=(len(panels) * (1.2 * len(columns) + 1.5) + 1, 0.45 * len(rows) + 2),
        layout="constrained",
    )
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        cells = median_cells(
            table[table["panel"] == panel], "row", rows, "init", columns, "log_ratio"
        )
        image = draw_cells(ax, cells, "RdBu_r", (-limit, limit), ".1f")
        ax.set(xlabel="init", ylabel=varied[row_key] if row_key else "")
        ax.set_title(panel)
    fig.colorbar(image, ax=axes, label=HEATMAP_RATIOS[column])
    return fig


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


def plot_phase_diagram(table: pd.DataFrame, varied: dict[str, str]) -> Figure | None:
    """Test accuracy over (`init.sigma_w2`, depth) for the jobs with init=variance_scaling, a
    panel per setting of the other varied keys, and on it what mean-field theory predicts
    (`vanishlab.theory`) for the panel's activation and `init.sigma_b2`, read from its jobs'
    configs: the trainable depth, 6 xi_c (a curve), and the critical sigma_w2 (a dashed line).
    Depth grows upwards, as in Schoenholz et al.'s figures; the cells are evenly spaced whatever
    the grid, so a theory value between two grid values is drawn between their cells."""
    if SIGMA_W2 not in varied or DEPTH not in varied:
        return None
    sigma, depth = varied[SIGMA_W2], varied[DEPTH]
    init = table[CONFIG].map(lambda config: results.option_name(config.get("init._target_")))
    scaled = table[init == "variance_scaling"]
    others = [key for key in varied if key not in (SIGMA_W2, DEPTH)]
    done = scaled.dropna(subset=[sigma, depth, results.TEST_ACC])
    done = done.assign(panel=labels(done, varied, others))
    if done[sigma].nunique() < 2 or done[depth].nunique() < 2:
        return None
    sigmas, depths = sorted(done[sigma].unique()), sorted(done[depth].unique())
    panels = sorted(done["panel"].unique())
    fig = Figure(
        figsize=(len(panels) * (0.8 * len(sigmas) + 2) + 1, 0.5 * len(depths) + 2),
        layout="constrained",
    )
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
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


def plot_grad_profiles(table: pd.DataFrame, varied: dict[str, str]) -> Figure | None:
    """Per-layer gradient norms at the first logged step: a panel per init option, a colour per
    setting of the other keys but the longest numeric one (depth: a line's length shows it)."""
    inits, others, row_key = gradient_layout(table, varied)
    table = table.assign(
        label=labels(table, varied, [key for key in others if key != row_key]),
        panel=labels(table, varied, inits),
    )
    table = table[table[results.GRAD_NORMS_AT_START].map(lambda norms: isinstance(norms, list))]
    if table.empty:
        return None
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


def plot_backward_profiles(table: pd.DataFrame, varied: dict[str, str]) -> Figure | None:
    """The backward signal ||dL/dh|| along each job's signal axis (`results.SIGNAL_AXIS`: time
    steps, the residual stream's blocks, or the hidden layers), log scale, at the first and the
    last measured step (`BACKWARD_PANELS`, a column each): a row per axis the sweep has, a line
    per job coloured by its setting of the `varied` keys (a setting's seeds share its colour)."""
    table = table[table[results.SIGNAL_AXIS].notna()]
    if table.empty:
        return None
    table = table.assign(label=labels(table, varied, varied))
    axes_names = sorted(table[results.SIGNAL_AXIS].unique())
    colours = palette(table["label"])
    fig = Figure(figsize=(10, 3.5 * len(axes_names) + 1), layout="constrained")
    grid = fig.subplots(len(axes_names), len(BACKWARD_PANELS), squeeze=False, sharey=True)
    for row, axis in zip(grid, axes_names, strict=True):
        jobs = table[table[results.SIGNAL_AXIS] == axis].to_dict("records")
        for ax, (when, key) in zip(row, BACKWARD_PANELS.items(), strict=True):
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


def plot_jacobian_spectra(table: pd.DataFrame, varied: dict[str, str]) -> Figure | None:
    """Each job's hidden-stack Jacobian spectrum in brief (`results.JACOBIAN_QUANTILES`: the
    log10 singular values' quantiles, smallest to largest) as initialised and at the end
    (`SPECTRUM_PANELS`, a panel each), a line per job coloured by its setting of the `varied`
    keys, and a dotted line at 0: a flat line there is dynamical isometry."""
    table = table[table[results.JACOBIAN_QUANTILES].map(lambda q: isinstance(q, list))]
    if table.empty:
        return None
    table = table.assign(label=labels(table, varied, varied))
    colours = palette(table["label"])
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    axes = fig.subplots(1, len(SPECTRUM_PANELS), sharey=True)
    for ax, (when, key) in zip(axes, SPECTRUM_PANELS.items(), strict=True):
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


def palette(names: Iterable[str]) -> dict[str, Any]:
    """A distinct colour per name: tab10, tab20 beyond 10 names, a continuous map beyond 20."""
    names = sorted(set(names))
    if len(names) > 20:
        return {name: colormaps["turbo"](i / (len(names) - 1)) for i, name in enumerate(names)}
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i) for i, name in enumerate(names)}


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


def scalar_curves(job_dir: Path, tags: Iterable[str]) -> dict[str, tuple[list[int], list[float]]]:
    """The job's scalars `tags` as (steps, values), read straight from its TensorBoard event files.

    Each file is a run of records: the length (8 bytes), its CRC (4), an `Event`, its CRC (4).
    The CRCs are not checked: without TensorFlow, tensorboard's `EventAccumulator` checks them in
    pure Python at about 3 MB/s, minutes for a real sweep whose events hold histograms and images.
    A record cut short (the job is still writing) ends the file. A session that starts at step s
    (a job that trained on from its checkpoint: `purge_step`) drops what came before it from
    step s on, as TensorBoard does: a killed attempt's values there were trained again.
    """
    tags = set(tags)
    points: dict[str, dict[int, float]] = {}
    for path in sorted(job_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            if pos + 16 + length > len(data):
                break
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 16 + length
            if event.session_log.status == SessionLog.START:
                for curve in points.values():
                    for step in [step for step in curve if step >= event.step]:
                        del curve[step]
            for value in event.summary.value:  # Lightning logs scalars as `simple_value`
                if value.tag in tags and value.WhichOneof("value") == "simple_value":
                    points.setdefault(value.tag, {})[event.step] = value.simple_value
    return {tag: (list(curve), list(curve.values())) for tag, curve in points.items()}


def plot_loss_curves(table: pd.DataFrame, sweep_dir: Path) -> Figure | None:
    """Train and val loss against step, one line per job, coloured by verdict (or status).
    Diverged jobs are left out: their loss, 1e20 and beyond, would flatten every other line."""
    table = table[table[results.STATUS] != "diverged"]
    outcome = outcomes(table)
    colours = palette(outcome)
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = dict(zip(LOSS_TAGS, fig.subplots(1, len(LOSS_TAGS)), strict=True))
    plotted = set()
    for job, name in zip(table["job"], outcome, strict=True):
        for tag, (steps, values) in scalar_curves(sweep_dir / job, LOSS_TAGS).items():
            values = np.asarray(values, dtype=float)
            ok = np.isfinite(values) & (values > 0)  # a diverged loss ends the line
            if ok.any():
                axes[tag].plot(np.asarray(steps)[ok], values[ok], ".-", color=colours[name])
                plotted.add(name)
    if not plotted:
        return None
    for tag, ax in axes.items():
        ax.set(xlabel="step", ylabel=tag, title=tag)
        ax.grid(alpha=0.3)
        if not ax.has_data():  # e.g. train/loss when an epoch is shorter than log_every_n_steps
            ax.text(0.5, 0.5, f"no {tag} logged", transform=ax.transAxes, ha="center")
        elif ax.dataLim.y1 > 10 * ax.dataLim.y0:  # exploding losses span decades
            ax.set_yscale("log")
    legend(ax, {name: colour for name, colour in colours.items() if name in plotted})
    return fig


def plot_sharpness(table: pd.DataFrame, varied: dict[str, str], sweep_dir: Path) -> Figure | None:
    """Each job's logged sharpness against step, a colour per setting of the varied keys, with a
    dashed line at its 2/lr in the same colour: gradient descent's stability limit. Cohen et
    al.'s edge of stability is a line that rises to its dashed line and stays there."""
    table = table.assign(label=labels(table, varied, varied)).sort_values(LR, kind="stable")
    colours = palette(table["label"])
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    plotted = {}
    for job, label, lr in zip(table["job"], table["label"], table[LR], strict=True):
        curve = scalar_curves(sweep_dir / job, [results.SHARPNESS]).get(results.SHARPNESS)
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


def plot_sharpness_vs_lr(table: pd.DataFrame) -> Figure | None:
    """Each job's final sharpness (its record's) against its lr, coloured by verdict, beside
    the curve 2/lr: jobs on or above the curve ended at or past gradient descent's stability
    limit."""
    done = table.dropna(subset=[results.SHARPNESS])
    if done[LR].nunique() < 2:
        return None
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


def cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def counts(column: pd.Series) -> str:
    return ", ".join(f"{n} {name}" for name, n in column.value_counts().items()) or "none"


def figure_name(column: str) -> str:
    return "accuracy_vs_" + re.sub(r"[^\w.=-]", "_", column) + ".png"


def write_report(sweep_dir: Path) -> Path:
    """Write `results.csv`, the figures and `report.md` into `<sweep_dir>/report/`; return the
    path of `report.md`. Figures that do not apply to this sweep are left out."""
    table, varied = load_sweep(sweep_dir)
    settings = without_seed(table, varied)
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    kept = [c for c in RESULTS if c not in OPTIONAL_RESULTS or table[c].notna().any()]
    columns = ["job", *varied.values(), *kept]
    table[columns].to_csv(out / "results.csv", index=False)
    seeds_md, figures = [], {}
    if settings != varied:
        summary = seed_summary(table, settings)
        summary.to_csv(out / SEED_SUMMARY, index=False)
        seed_columns = [column for key, column in varied.items() if key not in settings]
        seeds_md = [
            f"Jobs that differ only in `{'`, `'.join(seed_columns)}`, together: `{ACC_MEAN}` and "
            f"`{ACC_STD}` (sample standard deviation) over the seeds with a test accuracy; "
            f"`{VERDICTS}` counts the seeds' verdicts (a job without one by its status). Best "
            f"mean first; also [{SEED_SUMMARY}]({SEED_SUMMARY}).\n",
            markdown_table(summary) + "\n",
        ]
        figures["accuracy_over_seeds.png"] = (
            plot_seeds(table, settings, summary),
            "Each setting's seeds: a dot per seed's final test accuracy, coloured by its verdict "
            "(its status if it has none), and in black their mean +- one standard deviation; "
            "the label's second line counts the verdicts, jobs without an accuracy included.",
        )
    for column in numeric_columns(table, settings):
        figures[figure_name(column)] = (
            plot_accuracy(table, settings, column),
            f"Final test accuracy against `{column}`, one line per setting of the other varied "
            f"keys (with seeds: the mean over them, bars +- one standard deviation, a faint dot "
            f"per seed): a line near 0.1 (chance) is a setting that did not learn.",
        )
    figures["grad_ratio_heatmap.png"] = (
        plot_grad_ratio_heatmap(table, settings),
        "log10 of the backward signal ||dL/dh|| at the first hidden layer over the last hidden "
        "layer as initialised (first logged step; median over a cell's jobs; a sweep recorded "
        "before it was measured shows the first-layer over last-layer weight-gradient norm, "
        "and the colour bar says which): 0 is balanced, strongly negative means the "
        "input-side layers get a vanishing signal, strongly positive an exploding one; grey "
        "cells have no data.",
    )
    figures["phase_diagram.png"] = (
        plot_phase_diagram(table, settings),
        "Final test accuracy over the init's weight variance `sigma_w2` and the depth "
        "(init=variance_scaling; median over a cell's seeds, grey: no job finished), with "
        "mean-field theory for the jobs' activation and `sigma_b2` (`vanishlab.theory`): the "
        "blue curve is Schoenholz et al.'s trainable depth, 6 xi_c (networks deeper than it are "
        "predicted not to train), and the dashed line the critical `sigma_w2`, where chi_1 = 1 "
        "and xi_c diverges.",
    )
    figures["grad_profiles.png"] = (
        plot_grad_profiles(table, settings),
        "Each line is one job's weight-gradient norm per layer at the first logged step (layer 0 "
        "is the input side, log scale): a line rising steeply to the right means the gradient "
        "vanishes on its way back to the input, one falling to the right means it explodes.",
    )
    figures["backward_profiles.png"] = (
        plot_backward_profiles(table, settings),
        "The backward signal ||dL/dh|| (log scale) along each job's signal axis: its time steps "
        "(a recurrent network's hidden state), its residual stream's blocks, else its hidden "
        "layers (0 = input side); at the first measured step (as initialised) and the last, a "
        "line per job coloured by its setting. A line that falls toward the input side (step "
        "0) is a vanishing signal, one that rises there an exploding one; its first value over "
        "its last is the backward ratio the verdicts read.",
    )
    figures["jacobian_spectra.png"] = (
        plot_jacobian_spectra(table, settings),
        "The hidden stack's input-output Jacobian (`callbacks=jacobian`): its singular values' "
        "log10 as quantiles over the measured inputs, smallest (left) to largest (right), as "
        "initialised and at the end, a line per job coloured by its setting. A flat line at 0 "
        "(dotted) is dynamical isometry, every direction passed on unchanged; a steep one, a "
        "spectrum spread over decades, passes a few directions and loses the rest.",
    )
    figures["loss_curves.png"] = (
        plot_loss_curves(table, sweep_dir),
        "Training and validation loss against the training step, one line per job coloured by "
        "its verdict (diverged jobs left out): a flat line did not learn.",
    )
    figures["sharpness.png"] = (
        plot_sharpness(table, settings, sweep_dir),
        "Sharpness (the training loss's top Hessian eigenvalue, `callbacks.sharpness`) against "
        "the step, one line per job, with a dashed line at its 2/lr in the same colour: above "
        "its dashed line, gradient descent at that lr is past its stability limit. Cohen et "
        "al. (2021) see sharpness rise to 2/lr and hover there.",
    )
    figures["sharpness_vs_lr.png"] = (
        plot_sharpness_vs_lr(table),
        "Each job's sharpness at its last measured step against its learning rate, coloured "
        "by verdict; the dashed curve is 2/lr, gradient descent's stability limit.",
    )
    for stale in out.glob("*.png"):  # a figure that no longer applies must not linger
        stale.unlink()
    shown = []
    for name, (fig, caption) in figures.items():
        if fig is not None:
            fig.savefig(out / name, dpi=100)
            shown.append(f"![{name}]({name})\n\n{caption}\n")

    md = out / "report.md"
    md.write_text(
        "\n".join(
            [
                f"# Sweep report: {sweep_dir.name}\n",
                f"`{sweep_dir}`: {len(table)} jobs; status: {counts(table[results.STATUS])}; "
                f"verdict: {counts(table[results.VERDICT])}. Varied: "
                f"{', '.join(f'`{c}`' for c in varied.values()) or 'nothing'}.\n",
                *seeds_md,
                "Best test accuracy first; failed and unfinished jobs last. All rows: "
                "[results.csv](results.csv).\n",
                markdown_table(table[[*columns[1:], "job"]]) + "\n",
                "## Figures\n",
                *shown,
            ]
        )
    )
    return md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vanishlab.report",
        description="Write a sweep's results table, figures and report.md into <sweep>/report/.",
    )
    parser.add_argument(
        "sweep_dir",
        nargs="?",
        type=Path,
        help="a sweep directory (default: the newest one under ./outputs/sweeps/)",
    )
    args = parser.parse_args(argv)
    try:
        print(write_report(args.sweep_dir or newest_sweep()))
    except ConfigError as err:
        exit_with(err)


if __name__ == "__main__":
    main()
