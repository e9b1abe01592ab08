"""The HParams tab, written from the records when a run or a sweep ends (`sweep.Records`).

Each job's directory gets an event file of its own (`*.hparams`, replaced when a sweep runs
again) with its row (a session: its config, `Status`, `Verdict`) and the metrics the table
shows; the run's or sweep's directory gets the table's configuration (the experiment). Both come
from the `metrics.json` files alone, so the table says what the records say; and only the whole
sweep knows which columns vary.

What TensorBoard (2.21, measured in Chromium) shows without a click: of the hparams, the first
five of those marked `differs`, sorted by name with capitals first, then others to make five; of
the metrics, the first five in the configuration's order. So:
- the table's columns are `Status` and `Verdict`, capitalised, then the keys whose values differ
  between its runs; a constant key (`data.batch_size`) would take a free place among the five,
  so it is not a column (every job's `.hydra/config.yaml` and the report have it);
- marked are `Status`, `Verdict` and the keys the sweep varies (`vanishlab.varied`): not
  `init.std`, which differs only because `init` does, nor `data.seed`, a copy of `seed`;
- text and booleans get discrete domains; integers are text, so `16` does not read `16.000`;
- `METRICS` leads with accuracy and the log10 backward-signal ratios at the first and the last
  measured step (what the `vanishing` and `exploding` verdicts read), then the weight-gradient
  ratios (`dashboard.LOG10`; `Log10/test/loss` keeps a diverged run's 1e23 on a readable axis);
- a session's status is `Success` only for a completed run: diverged and failed runs (and those a
  scheduler ended) are `Failure`, a run still `started` is `Unknown`.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata
from tensorboard.plugins.hparams.plugin_data_pb2 import (
    HParamsPluginData,
    SessionEndInfo,
    SessionStartInfo,
)
from torch.utils.tensorboard.summary import scalar
from torch.utils.tensorboard.writer import FileWriter

from vanishlab.dashboard import LOG10, log10_display
from vanishlab.results import (
    BACKWARD_FIRST_OVER_LAST,
    BACKWARD_START,
    CLASSES_PREDICTED,
    DEAD_CLASSES,
    FIRST_OVER_LAST,
    FULL_EPOCHS,
    JOB_CONFIG,
    MAX_DEAD,
    MAX_SATURATED,
    START,
    STATUS,
    STEPS,
    TEST_ACC,
    TEST_LOSS,
    VAL_ACC,
    VERDICT,
    Status,
    at_start,
    option_columns,
)
from vanishlab.varied import read_named_keys, varied_keys

STATUS_COLUMN, VERDICT_COLUMN = "Status", "Verdict"
SHOWN_FIRST = (STATUS_COLUMN, VERDICT_COLUMN)
# The table's metrics in its order (the first five show without a click), each with the record's
# key it shows; a `Log10/` one shows log10 of the value, as everywhere (`dashboard.log10_display`).
METRICS = {
    TEST_ACC: TEST_ACC,
    VAL_ACC: VAL_ACC,
    LOG10 + at_start(BACKWARD_FIRST_OVER_LAST): BACKWARD_START,
    LOG10 + BACKWARD_FIRST_OVER_LAST: BACKWARD_FIRST_OVER_LAST,
    LOG10 + at_start(FIRST_OVER_LAST): START,
    LOG10 + FIRST_OVER_LAST: FIRST_OVER_LAST,
    LOG10 + TEST_LOSS: TEST_LOSS,
    MAX_SATURATED: MAX_SATURATED,
    MAX_DEAD: MAX_DEAD,
    DEAD_CLASSES: DEAD_CLASSES,
    CLASSES_PREDICTED: CLASSES_PREDICTED,
    FULL_EPOCHS: FULL_EPOCHS,
    STEPS: STEPS,
}
SESSION_STATUS = {Status.COMPLETED: api_pb2.STATUS_SUCCESS, Status.STARTED: api_pb2.STATUS_UNKNOWN}
DATA_TYPES = {
    bool: api_pb2.DATA_TYPE_BOOL,
    float: api_pb2.DATA_TYPE_FLOAT64,
    str: api_pb2.DATA_TYPE_STRING,
}
LISTED_FLOATS = 10  # a float column with more distinct values gets a range, not a list
FILE_SUFFIX = ".hparams"


def row(record: dict[str, Any]) -> dict[str, bool | float | str]:
    """A run's hparams: `Status`, `Verdict`, and every key of its config that a sweep can vary
    (`results.option_columns`; the instruments, `callbacks` and `logger`, left out). Booleans and
    floats stay numbers; the rest, integers included, is text."""
    identity = {k: v for k, v in record[JOB_CONFIG].items() if k not in ("callbacks", "logger")}
    columns = {
        key: value if isinstance(value, bool | float) else str(value)
        for key, value in option_columns(identity).items()
    }
    return {STATUS_COLUMN: record[STATUS], VERDICT_COLUMN: record.get(VERDICT, "none"), **columns}


def metric_values(record: dict[str, Any]) -> dict[str, float]:
    """The record's `METRICS`, missing and nan values left out."""
    values = {}
    for name, key in METRICS.items():
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if name.startswith(LOG10):
            value = log10_display(torch.tensor(float(value), dtype=torch.float64)).item()
        if not math.isnan(value):
            values[name] = float(value)
    return values


def order(value: Any) -> tuple[int, float, str]:
    """Numbers, and text that reads as one (`"16"`), by value; other text after them."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, str(value))


def column_infos(
    rows: list[dict[str, Any]], named: Collection[str] | None = None
) -> list[api_pb2.HParamInfo]:
    """The table's columns: `Status`, `Verdict` and the keys whose values differ between `rows`
    (a key only some runs have differs), each with its type and domain. A column whose values
    are of mixed types becomes text in every row. Marked (`differs`, shown first) are `Status`,
    `Verdict` and the columns the sweep varies (`varied.varied_keys`; `named`: the keys it named
    itself)."""
    infos = []
    for name in dict.fromkeys(key for r in rows for key in r):
        present = [r for r in rows if name in r]
        if len({type(r[name]) for r in present}) > 1:
            for r in present:
                r[name] = str(r[name])
        values = sorted({r[name] for r in present}, key=order)
        if len(values) == 1 and len(present) == len(rows) and name not in SHOWN_FIRST:
            continue
        info = api_pb2.HParamInfo(name=name, type=DATA_TYPES[type(values[0])])
        if isinstance(values[0], float) and len(values) > LISTED_FLOATS:
            info.domain_interval.min_value, info.domain_interval.max_value = values[0], values[-1]
        else:
            info.domain_discrete.extend(values)
        infos.append(info)
    marked = {*SHOWN_FIRST, *varied_keys(rows, named)}
    for info in infos:
        info.differs = info.name in marked
    return infos


def write_hparams(root: Path, records: dict[Path, dict[str, Any]]) -> None:
    """Write the HParams table of the runs whose records (`metrics.json`) are `records`, by run
    directory: each run's row and metrics into its directory, the table's configuration into
    `root` (a sweep's directory, or the single run's own)."""
    records = {job: record for job, record in records.items() if JOB_CONFIG in record}
    rows = {job: row(record) for job, record in records.items()}
    columns = column_infos(list(rows.values()), read_named_keys(root))
    experiment = api_pb2.Experiment(
        hparam_infos=columns,
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=name)) for name in METRICS],
    )
    events = {root: [(plugin_summary(experiment=experiment), 0)]}
    for job, record in records.items():
        step = record.get(STEPS, 0)
        start = SessionStartInfo()
        for name in (info.name for info in columns):
            value = rows[job].get(name)
            if value is None:
                continue
            field = {bool: "bool_value", float: "number_value", str: "string_value"}[type(value)]
            setattr(start.hparams[name], field, value)
        status = SESSION_STATUS.get(record[STATUS], api_pb2.STATUS_FAILURE)
        events.setdefault(job, []).extend(
            [
                (plugin_summary(session_start_info=start), step),
                *((scalar(name, value), step) for name, value in metric_values(record).items()),
                (plugin_summary(session_end_info=SessionEndInfo(status=status)), step),
            ]
        )
    for directory, summaries in events.items():
        write_events(directory, summaries)


def plugin_summary(**data: Any) -> Summary:
    """An HParams event: the plugin's data (`experiment`, `session_start_info` or
    `session_end_info`) under its tag."""
    (field,) = data
    tag = {
        "experiment": metadata.EXPERIMENT_TAG,
        "session_start_info": metadata.SESSION_START_INFO_TAG,
        "session_end_info": metadata.SESSION_END_INFO_TAG,
    }[field]
    content = metadata.create_summary_metadata(HParamsPluginData(**data))
    return Summary(value=[Summary.Value(tag=tag, metadata=content)])


def write_events(directory: Path, summaries: list[tuple[Summary, int]]) -> None:
    """Replace the directory's HParams event file: TensorBoard takes a tag's first metadata, so
    an older row left beside a new one would win."""
    for old in directory.glob(f"events.out.tfevents.*{FILE_SUFFIX}"):
        old.unlink()
    writer = FileWriter(str(directory), filename_suffix=FILE_SUFFIX)
    for summary, step in summaries:
        writer.add_summary(summary, step)
    writer.close()
    # TensorBoard reads a run's event files in name order, and a resumed run's writer purges
    # what came before it from its step on (`purge_step`). Its name must sort after the run's:
    # within one second, `<pid>.10.hparams` sorts before `<pid>.8`. One second later does.
    (written,) = directory.glob(f"events.out.tfevents.*{FILE_SUFFIX}")  # the old ones are gone
    stamps = [int(p.name.split(".")[3]) for p in directory.glob("events.out.tfevents.*")]
    written.replace(directory / f"events.out.tfevents.{max(stamps) + 1:010d}{FILE_SUFFIX}")
