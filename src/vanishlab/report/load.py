"""A sweep as the report reads it (`Sweep`): a row per job from what the jobs left on disk
(`.hydra/config.yaml`, `metrics.json`), the keys the sweep varies and their columns, and the
seed's keys set apart.

A job that is running (or was killed) is `started`, and one with `.hydra/` but no `metrics.json`
`unfinished`, so the report works on any sweep, one still running or with failed jobs included.

What varied is `vanishlab.varied`'s rule, applied to each job's config as dotted keys with
resolved values (each job's paths as placeholders; `_`-keys but `_target_` left out). A key's
column is its shortest dotted suffix that no other config key ends with: `model.depth` ->
`depth`, `optimizer.lr` -> `lr`, but `init.std` stays `init.std` because `data.std` exists, so a
name never hides which key it is. An option's `_target_` is named after its group and holds the
function or class name, lowercased as in the HParams table: `init._target_` -> `init` =
`xavier_normal`.

Seeds: jobs that differ only in `seed` (and keys equal to it in every job) are one setting run
again, so sections and figures take them together (`Sweep.settings`, `seed_summary`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from vanishlab import ConfigError, results
from vanishlab.varied import read_named_keys, varied_keys

# results.csv's columns after the varied keys, and the metrics.json key each one comes from.
RESULTS = {
    results.STATUS: results.STATUS,
    results.VERDICT: results.VERDICT,
    results.VAL_ACC: results.VAL_ACC,
    results.TEST_ACC: results.TEST_ACC,
    results.TEST_LOSS: results.TEST_LOSS,
    results.FIRST_OVER_LAST: results.FIRST_OVER_LAST,
    results.at_start(results.FIRST_OVER_LAST): results.START,
    results.BACKWARD_FIRST_OVER_LAST: results.BACKWARD_FIRST_OVER_LAST,
    results.at_start(results.BACKWARD_FIRST_OVER_LAST): results.BACKWARD_START,
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
# Columns shown only when some job has them (a job records them with the callback on).
OPTIONAL_RESULTS = (results.SHARPNESS, results.SHARPNESS_TIMES_LR)
LR = "optimizer.lr"  # each job's, varied or not: the sharpness figures draw 2/lr
# The seed summary's columns after the setting's keys.
SEEDS, ACC_MEAN, ACC_STD, VERDICTS = "seeds", "test/acc mean", "test/acc std", "verdicts"
CONFIG = "config"  # each job's dotted config, for figures that read keys no job varies


@dataclass
class Sweep:
    """What every section and figure of the report reads."""

    dir: Path
    table: pd.DataFrame  # a row per job (`load_sweep`)
    varied: dict[str, str]  # each key the sweep varies, and its column
    settings: dict[str, str]  # the varied keys less the seed's (`without_seed`)

    @property
    def seeded(self) -> bool:
        """Whether the seed varies: jobs that differ only in it are one setting."""
        return self.settings != self.varied

    def columns(self) -> list[str]:
        """results.csv's columns: `job`, the varied keys', then `RESULTS` (less the optional
        ones no job has)."""
        kept = [c for c in RESULTS if c not in OPTIONAL_RESULTS or self.table[c].notna().any()]
        return ["job", *self.varied.values(), *kept]


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
    return results.read_record(job_dir / "metrics.json") or {
        results.STATUS: results.Status.UNFINISHED
    }


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


def load_sweep(sweep_dir: Path) -> Sweep:
    """The sweep in `sweep_dir`, its table one row per job: `job`, the varied keys, the
    `RESULTS` columns, and for the figures the `PROFILES`, `optimizer.lr` and the job's `CONFIG`;
    best test accuracy first, so failed and unfinished jobs (no accuracy) come last."""
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise ConfigError(not_a_sweep(sweep_dir))
    records = [job_record(job) for job in jobs]
    configs = [job_config(job, record) for job, record in zip(jobs, records, strict=True)]
    keys = varied_keys(configs, read_named_keys(sweep_dir))
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
    table = table.reset_index(drop=True)
    return Sweep(sweep_dir, table, varied, without_seed(table, varied))


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


def recorded(table: pd.DataFrame, key: str) -> pd.DataFrame:
    """The jobs whose record holds `key` (a job records a profile or a spectrum where the
    callback that measures it ran)."""
    return table[~table[key].map(absent)]


def when_recorded(key: str) -> Callable[[Sweep], bool]:
    """The `applies` of a figure of what some job's record holds under `key`."""
    return lambda sweep: not recorded(sweep.table, key).empty


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


def counts(column: pd.Series) -> str:
    return ", ".join(f"{n} {name}" for name, n in column.value_counts().items()) or "none"
