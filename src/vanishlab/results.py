"""A run's result record: `metrics.json`, its verdict, and its row in TensorBoard's HParams table.

The verdict rules live here and only here; the README quotes them. They are checked in order,
and the first that matches names the run:

1. `diverged`   the loss or a gradient became non-finite (training stopped at that step)
2. `dead`       a hidden ReLU-family layer had every unit dead at the last logged step, or a
                class's output is 0 for every test image (an output ReLU that died)
3. `exploding`  first-layer / last-layer weight-gradient norm above 1e2 at the first logged step
4. `vanishing`  that ratio below 1e-2, or at the last logged step half or more of a sigmoid/tanh
                layer's outputs saturated (their derivative is ~0: no gradient passes)
5. `dead`       the trained network never predicts some class on the test split (stuck)
6. `trained`    none of the above
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger, TensorBoardLogger

log = logging.getLogger(__name__)

EXPLODING_ABOVE = 1e2
VANISHING_BELOW = 1e-2
SATURATED_FROM = 0.5
CLASSES = 10  # MNIST and Fashion-MNIST
FINISHED = ("completed", "diverged")  # statuses a re-run sweep does not train again

# Numbers shown beside each run in the HParams table: final metrics and the verdict's evidence.
HPARAM_METRICS = (
    "val/acc",
    "test/acc",
    "test/loss",
    "grad_norm/first_over_last",
    "evidence/first_over_last_at_start",
    "evidence/max_dead_frac",
    "evidence/dead_classes",
    "evidence/max_saturated_frac",
    "evidence/classes_predicted",
)


def verdict(record: dict[str, Any]) -> str:
    """Name what happened to a run from the evidence in its record (rules: module docstring)."""
    ratio = record.get("evidence/first_over_last_at_start", math.nan)
    if record["status"] == "diverged":
        return "diverged"
    if record.get("evidence/max_dead_frac", 0) >= 1 or record.get("evidence/dead_classes", 0) >= 1:
        return "dead"
    if ratio > EXPLODING_ABOVE:
        return "exploding"
    if ratio < VANISHING_BELOW or record.get("evidence/max_saturated_frac", 0) >= SATURATED_FROM:
        return "vanishing"
    if record.get("evidence/classes_predicted", CLASSES) < CLASSES:
        return "dead"
    return "trained"


def read_record(path: Path) -> dict[str, Any]:
    """A run's `metrics.json`, or {} while the run has not finished."""
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write atomically (temp file, then rename), so a killed run never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def _option(node: DictConfig, skip: tuple[str, ...] = ()) -> str:
    """A group option as one value: its target and its keys, e.g. `normal(std=1.0)`."""
    name = node._target_.rsplit(".", 1)[-1].lower()
    keys = [f"{k}={v}" for k, v in node.items() if not k.startswith("_") and k not in skip]
    return f"{name}({', '.join(keys)})" if keys else name


def hparams(cfg: DictConfig) -> dict[str, Any]:
    """Every config value a sweep can vary, under the same names in every run, so all runs of a
    sweep share one set of HParams columns (options with their own keys are one text column)."""
    return {
        "data": cfg.data.dataset,
        "depth": cfg.model.depth,
        "width": cfg.model.width,
        "activation": cfg.model.activation,
        "output_activation": str(cfg.model.output_activation),
        "init": _option(cfg.init),
        "loss": _option(cfg.loss),
        "optimizer": _option(cfg.optimizer, skip=("lr",)),
        "lr": cfg.optimizer.lr,
        "batch_size": cfg.data.batch_size,
        "seed": cfg.seed,
        "max_epochs": cfg.trainer.max_epochs,
    }


def log_hparams(loggers: list[Logger], cfg: DictConfig, record: dict[str, Any], step: int) -> None:
    """Write the run's HParams row: hyperparameters, status and verdict, and the final metrics
    (also written as scalars at the run's last step, which is where the table reads them)."""
    params = {**hparams(cfg), "status": record["status"], "verdict": record["verdict"]}
    metrics = {k: record[k] for k in HPARAM_METRICS if isinstance(record.get(k), float | int)}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics, step=step)
            logger.finalize("success")


class SweepExitCode(Callback):
    """Hydra callback: after a sweep, count its jobs by status and exit 1 if any failed.

    A job that raises is recorded and returns normally, so the sweep goes on to the next job;
    this restores the signal that something failed, for the shell or a CI job.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = {p.parent.name: read_record(p) for p in sorted(sweep_dir.glob("*/metrics.json"))}
        counts = Counter(record.get("status", "unknown") for record in records.values())
        log.info("Sweep %s: %s", sweep_dir, ", ".join(f"{n} {s}" for s, n in counts.items()))
        failed = [name for name, record in records.items() if record.get("status") == "failed"]
        if failed:
            log.error("%d job(s) failed (see their metrics.json): %s", len(failed), failed)
            raise SystemExit(1)
