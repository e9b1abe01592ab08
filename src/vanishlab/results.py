"""A run's result record: `metrics.json`, its identity and its verdict.

One job, one record. A job's identity is its config as it runs, less the keys that cannot change
its result (`IGNORED_KEYS`; Hydra's own node, and so the launcher, is not in a job's config at all).
The record stores the identity and its hash (`job_id`, `job_config`) from the job's first moment
(`status: started`), so a re-run can tell its own record from another config's, whatever the
directory is called.

The verdict rules live here and only here; the README quotes them. Each needs some evidence, and
they are checked in order; the first that has its evidence and matches names the run:

rule            needs                            matches when
1 diverged      nothing more                     the loss or a gradient became non-finite
                                                 (training stopped there), or test/loss is not
2 dead          one measured step                a hidden ReLU layer had every unit dead
                                                 at the last measured step
3 dead          one full pass over the training  a class's output is 0 for every test image (an
                split                            output ReLU that died)
4 exploding     one measured step                the backward ratio, ||dL/dh|| at the first
                                                 hidden layer over the last hidden layer, above
                                                 1e2 at the first measured step
5 vanishing     one measured step                that ratio below 1e-2 at the first measured step
                                                 and still at the last, or (after a full pass)
                                                 with a network that never predicts some class;
                                                 or at the last measured step half or more of a
                                                 sigmoid/tanh layer's outputs saturated (their
                                                 derivative is ~0)
6 undertrained  one full pass over the training  the network never predicts some class on the
                split                            test split (`evidence/classes` counts them): it
                                                 learned too little, and none of the evidence
                                                 above says why
7 trained       one full pass over the training  none of the above
                split
8 too_short     -                                no rule had its evidence: e.g. max_epochs=0,
                                                 fast_dev_run, limited batches, no GradientFlow

A measured step is an optimizer step that `GradientFlow` measured; a full pass is an epoch that ran
every batch of the training split (`evidence/full_epochs` counts them). A run with one measured
step (fast_dev_run) reads it as both its first and its last.

Why the backward signal and not the weight gradient: a layer's weight gradient is its input
activation times the backward signal, so where both shrink layer by layer (ReLU with Xavier
init) the weight gradients read balanced while the backward signal has vanished.

Which steps: an exploding signal does its damage in the first steps (updates many times too
large saturate or kill the input side's units; tanh with N(0, 1) weights at depth 8 reads 1e3 at
the start and 1e1 at the end, every unit saturated), so rule 4 reads the first step. A vanishing
signal only makes the input side's updates small, a stall that training can outgrow (ReLU with
Xavier init at depth 8 starts at 1e-1.1 and ends at 1e0; a recurrent net's signal over time can
start at 1e-6 and it learns), so rule 5 names it only where training did not: the signal still
vanishes at the last step, or the network never learned to predict every class. Saturation and
dead units are read at the last step: what the trained network is left with.
"""

from __future__ import annotations

import hashlib
import json
import math
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from omegaconf import DictConfig, OmegaConf

from vanishlab.storage import write_atomically

EXPLODING_ABOVE = 1e2
VANISHING_BELOW = 1e-2
SATURATED_FROM = 0.5

# The record's keys, named once: train, eval, the callbacks' evidence, the report, the HParams
# row and the tests use these names.
STATUS = "status"  # a `Status`, or the state a scheduler ended the job in (cancelled, timeout)
VERDICT = "verdict"
SEED = "seed"
ERROR = "error"
TAGS = "tags"
JOB_ID = "job_id"
JOB_CONFIG = "job_config"
RESUMED_FROM = "resumed_from"
TESTED = "tested"
STEPS = "steps"  # optimizer steps
EPOCHS = "epochs"  # epochs that ran, the last one possibly in part (a diverged run's included)
WORLD_SIZE = "world_size"
TRAIN_SECONDS = "train_seconds"
TEST_SECONDS = "test_seconds"
DIVERGED_AT_STEP = "diverged_at_step"
DIVERGED_AT_EPOCH = "diverged_at_epoch"
VAL_ACC = "val/acc"
TEST_ACC = "test/acc"
TEST_LOSS = "test/loss"
FIRST_OVER_LAST = "grad_norm/first_over_last"  # at the last measured step
GRAD_NORMS_AT_START = "grad_norms_at_start"  # per layer probe, at the first measured step
START = "evidence/first_over_last_at_start"  # present once GradientFlow measured a step
# ||dL/dh|| at the first hidden probe's output over the last hidden probe's (`GradientFlow`).
BACKWARD_FIRST_OVER_LAST = "backward/first_over_last"  # at the last measured step
BACKWARD_START = "evidence/backward_first_over_last_at_start"  # at the first measured step
# The backward profile: ||dL/dh|| at each probe along the axis that ratio runs along (its first
# value over its last is the ratio), as {probe name: norm} in input-to-output order, at the first
# and the last measured step; and that axis, named by the probes' role (`nets.SIGNAL_AXES`).
BACKWARD_NORMS_START = "evidence/backward_norms_at_start"
BACKWARD_NORMS = "backward_norms"  # at the last measured step
SIGNAL_AXIS = "evidence/signal_axis"  # "time step", "block" or "layer"
# How a figure's x axis reads, for each axis.
AXIS_LABELS = {"time step": "time step", "block": "block", "layer": "layer (0 = input side)"}
FULL_EPOCHS = "evidence/full_epochs"  # epochs that ran every batch of the training split
MAX_DEAD = "evidence/max_dead_frac"
MAX_SATURATED = "evidence/max_saturated_frac"
CLASSES = "evidence/classes"  # the data's class count
CLASSES_PREDICTED = "evidence/classes_predicted"
DEAD_CLASSES = "evidence/dead_classes"
SHARPNESS = "sharpness/top_eigenvalue"  # at the last measured step (`sharpness.Sharpness`)
SHARPNESS_TIMES_LR = "sharpness/times_lr_over_2"  # >= 1: past gradient descent's stability limit
# The hidden stack's Jacobian dh_last/dh_first (`jacobian.Jacobian`): its singular values' spread
# and mean square, log10, at the end of training and at the first measured step.
JACOBIAN_SPREAD = "jacobian/log10_max_over_median"
JACOBIAN_SPREAD_START = "evidence/jacobian_log10_max_over_median_at_start"
JACOBIAN_MEAN_SQ = "jacobian/log10_mean_sq_singular_value"
JACOBIAN_MEAN_SQ_START = "evidence/jacobian_log10_mean_sq_singular_value_at_start"
JACOBIAN_THEORY = "jacobian/theory_log10_mean_sq_singular_value"  # chi_1^(L-1), where it applies
# Its spectrum, compact: the `jacobian.QUANTILES` quantiles (0, 0.05, ..., 1) of the log10
# singular values, all inputs' together, at the end and at the first measured step.
JACOBIAN_QUANTILES = "jacobian/log10_singular_value_quantiles"
JACOBIAN_QUANTILES_START = "evidence/jacobian_log10_singular_value_quantiles_at_start"


class Word(str, Enum):
    """A value records and tables hold as plain text: a member is the string itself (it compares,
    hashes and writes to JSON as its value), so records on disk read the same with or without
    it, and it prints as its value, not as `Status.COMPLETED` (what Python 3.11's
    `enum.StrEnum` does; vanishlab runs on 3.10 too)."""

    def __str__(self) -> str:
        return str.__str__(self)


class Status(Word):
    """Where a job is: the record's `status`. A scheduler that ends a job for good writes its own
    state instead (`cancelled`, `timeout`, ...: the SLURM launcher), so a record's status is not
    always one of these."""

    STARTED = "started"  # from the job's first moment until it ends (or while killed)
    COMPLETED = "completed"
    DIVERGED = "diverged"  # training stopped at a non-finite loss or gradient
    FAILED = "failed"  # it raised: `error` says what
    UNREADABLE = "unreadable"  # how `read_record` reads a metrics.json that holds no record
    UNFINISHED = "unfinished"  # how the report reads a job with a config and no metrics.json


class Verdict(Word):
    """What happened to a run: the record's `verdict` (rules: module docstring)."""

    DIVERGED = "diverged"
    DEAD = "dead"
    EXPLODING = "exploding"
    VANISHING = "vanishing"
    UNDERTRAINED = "undertrained"
    TRAINED = "trained"
    TOO_SHORT = "too_short"


FINISHED = (Status.COMPLETED, Status.DIVERGED)  # statuses a re-run sweep does not train again
# Config keys that cannot change a job's result: where files go, torch's thread count, labels.
IGNORED_KEYS = ("paths", "threads", TAGS)


@runtime_checkable
class EvidenceSource(Protocol):
    """A callback whose findings go into the record (`GradientFlow`, `StopOnDivergence`,
    `Sharpness`)."""

    def evidence(self) -> dict[str, Any]: ...


def at_start(ratio: str) -> str:
    """What a table calls `ratio`'s value at the first measured step (`START`,
    `BACKWARD_START`), beside `ratio` at the last: the report's column and, under `Log10/`,
    the HParams table's metric."""
    return f"{ratio}_at_start"


def verdict(record: dict[str, Any]) -> Verdict:
    """Name what happened to a run from the evidence in its record (rules: module docstring)."""
    measured = START in record
    trained = record.get(FULL_EPOCHS, 0) >= 1
    stuck = trained and CLASSES_PREDICTED in record and record[CLASSES_PREDICTED] < record[CLASSES]
    ratio_start = record.get(BACKWARD_START, math.nan)
    ratio_end = record.get(BACKWARD_FIRST_OVER_LAST, math.nan)
    if record[STATUS] == Status.DIVERGED or not math.isfinite(record.get(TEST_LOSS, 0.0)):
        return Verdict.DIVERGED
    if measured and record.get(MAX_DEAD, 0) >= 1:
        return Verdict.DEAD
    if trained and record.get(DEAD_CLASSES, 0) >= 1:
        return Verdict.DEAD
    if ratio_start > EXPLODING_ABOVE:
        return Verdict.EXPLODING
    vanished = ratio_start < VANISHING_BELOW and (ratio_end < VANISHING_BELOW or stuck)
    if vanished or (measured and record.get(MAX_SATURATED, 0) >= SATURATED_FROM):
        return Verdict.VANISHING
    if trained:
        return Verdict.UNDERTRAINED if stuck else Verdict.TRAINED
    return Verdict.TOO_SHORT


def axis_position(probe: str) -> int:
    """Where a backward profile's probe lies on its axis: the number its name ends with
    (`step_027` -> 27, `layer_03` -> 3; probes are numbered from the input side), so a time
    axis keeps its steps' spacing where only some steps are probes."""
    return int(probe.rsplit("_", 1)[1])


def composed_config(cfg: DictConfig) -> dict[str, Any]:
    """The job's composed config, unresolved, as plain containers, without Hydra's node (a
    resolver sees that node too, but a job's config has none): what a checkpoint keeps."""
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    return container


def job_identity(cfg: DictConfig) -> dict[str, Any]:
    """The job's config, resolved, less `IGNORED_KEYS`: what its result depends on.

    `paths` values become placeholders before resolving, so keys built from them (a checkpoint
    directory under `${paths.output_dir}`) read the same in every job, and the run's own
    directory (`${hydra:runtime.output_dir}`) need not exist yet.
    """
    container = composed_config(cfg)
    container["paths"] = {key: f"<paths.{key}>" for key in container.get("paths", {})}
    resolved = OmegaConf.to_container(OmegaConf.create(container), resolve=True)
    return {key: value for key, value in resolved.items() if key not in IGNORED_KEYS}


def job_id(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def read_record(path: Path) -> dict[str, Any]:
    """A run's `metrics.json`; {} where there is none, and `{status: unreadable, error: ...}`
    where it does not read as a record (half a file, written by something else): whoever reads
    it decides what that means (a job sets it aside and trains again; the report lists it)."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {STATUS: Status.UNREADABLE, ERROR: f"{type(err).__name__}: {err}"}
    if not isinstance(record, dict):
        error = f"it holds a {type(record).__name__}, not a record"
        return {STATUS: Status.UNREADABLE, ERROR: error}
    return record


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write atomically (`storage.write_atomically`): a kill or a full disk never leaves half a
    record."""
    write_atomically(path, lambda file: file.write((json.dumps(record, indent=2) + "\n").encode()))


def flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: `{"model": {"depth": 2}}` -> `{"model.depth": 2}`."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def option_name(target: str) -> str:
    """How tables name a group option: its class or function, lowercased (`mlp`, `normal`)."""
    return str(target).rsplit(".", 1)[-1].lower()


def option_columns(config: dict[str, Any]) -> dict[str, Any]:
    """A job's config as table columns: its dotted keys, less `_`-keys (`_partial_`) and values
    that are only `paths` placeholders; an option's `_target_` becomes a column named after its
    group holding the class or function name, lowercased (`model` = `mlp`, `init` = `normal`)."""
    columns = {}
    for key, value in flatten(config).items():
        *group, leaf = key.split(".")
        if leaf == "_target_":
            columns[".".join(group)] = option_name(value)
        elif not leaf.startswith("_") and not str(value).startswith("<paths."):
            columns[key] = value
    return columns
