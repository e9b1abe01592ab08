"""A run's result record: `metrics.json`, its identity, its verdict, and its HParams row.

One job, one record. A job's identity is its config as it runs, less the keys that cannot change
its result (`IGNORED_KEYS`; Hydra's own node, and so the launcher, is not in a job's config at all).
The record stores the identity and its hash (`job_id`, `job_config`) from the job's first moment
(`status: started`), so a re-run can tell its own record from another config's, whatever the
directory is called.

The verdict rules live here and only here; the README quotes them. Each needs some evidence, and
they are checked in order; the first that has its evidence and matches names the run:

rule         needs                               matches when
1 diverged   nothing more                        the loss or a gradient became non-finite
                                                 (training stopped there), or test/loss is not
2 dead       one measured step                   a hidden ReLU-family layer had every unit dead
                                                 at the last measured step
3 dead       one full pass over the training     a class's output is 0 for every test image (an
             split                               output ReLU that died)
4 exploding  one measured step                   first-layer / last-layer weight-gradient norm
                                                 above 1e2 at the first measured step
5 vanishing  one measured step                   that ratio below 1e-2, or at the last measured
                                                 step half or more of a sigmoid/tanh layer's
                                                 outputs saturated (their derivative is ~0)
6 dead       one full pass over the training     the network never predicts some class on the
             split                               test split (stuck)
7 trained    one full pass over the training     none of the above
             split
8 too_short  -                                   no rule had its evidence: e.g. max_epochs=0,
                                                 fast_dev_run, limited batches, no GradientFlow

A measured step is an optimizer step that `GradientFlow` measured; a full pass is an epoch that ran
every batch of the training split (`evidence/full_epochs` counts them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from vanishlab import ConfigError, exit_with

log = logging.getLogger(__name__)

EXPLODING_ABOVE = 1e2
VANISHING_BELOW = 1e-2
SATURATED_FROM = 0.5
CLASSES = 10  # MNIST and Fashion-MNIST
FINISHED = ("completed", "diverged")  # statuses a re-run sweep does not train again
# Config keys that cannot change a job's result: where files go, torch's thread count, labels.
IGNORED_KEYS = ("paths", "threads", "tags")
START = "evidence/first_over_last_at_start"  # present once GradientFlow measured a step
FULL_EPOCHS = "evidence/full_epochs"

# Numbers shown beside each run in the HParams table: final metrics and the verdict's evidence.
HPARAM_METRICS = (
    "val/acc",
    "test/acc",
    "test/loss",
    "grad_norm/first_over_last",
    START,
    "evidence/max_dead_frac",
    "evidence/dead_classes",
    "evidence/max_saturated_frac",
    "evidence/classes_predicted",
    FULL_EPOCHS,
    "steps",
)


def verdict(record: dict[str, Any]) -> str:
    """Name what happened to a run from the evidence in its record (rules: module docstring)."""
    measured = START in record
    trained = record.get(FULL_EPOCHS, 0) >= 1
    ratio = record.get(START, math.nan)
    if record["status"] == "diverged" or not math.isfinite(record.get("test/loss", 0.0)):
        return "diverged"
    if measured and record.get("evidence/max_dead_frac", 0) >= 1:
        return "dead"
    if trained and record.get("evidence/dead_classes", 0) >= 1:
        return "dead"
    if measured and ratio > EXPLODING_ABOVE:
        return "exploding"
    if measured and (
        ratio < VANISHING_BELOW or record.get("evidence/max_saturated_frac", 0) >= SATURATED_FROM
    ):
        return "vanishing"
    if trained:
        return "dead" if record.get("evidence/classes_predicted", CLASSES) < CLASSES else "trained"
    return "too_short"


def job_identity(cfg: DictConfig) -> dict[str, Any]:
    """The job's config, resolved, less `IGNORED_KEYS`: what its result depends on.

    `paths` values become placeholders before resolving, so keys built from them (a checkpoint
    directory under `${paths.output_dir}`) read the same in every job, and the run's own
    directory (`${hydra:runtime.output_dir}`) need not exist yet.
    """
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)  # a resolver sees Hydra's node too; a job's config has none
    container["paths"] = {key: f"<paths.{key}>" for key in container.get("paths", {})}
    resolved = OmegaConf.to_container(OmegaConf.create(container), resolve=True)
    return {key: value for key, value in resolved.items() if key not in IGNORED_KEYS}


def job_id(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def job_dir_name(sweep_dir: str, name: str, *, _root_: DictConfig) -> str:
    """A sweep job's directory (resolver `vanishlab.job_dir`): `name` (its overrides), unless
    that directory holds a job of another config, kept as it is; then `name~<job_id>`."""
    name = name or "defaults"
    try:
        own_id = job_id(job_identity(_root_))
    except Exception:  # the job itself reports the config that does not resolve
        return name
    stored = read_record(Path(sweep_dir) / name / "metrics.json")
    return name if not stored or stored.get("job_id") == own_id else f"{name}~{own_id[:8]}"


OmegaConf.register_new_resolver("vanishlab.job_dir", job_dir_name, replace=True)


def read_record(path: Path) -> dict[str, Any]:
    """A run's `metrics.json`, or {} where there is none."""
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


class Records(Callback):
    """Hydra callback that keeps records true: a single run never writes into a directory that
    holds a run's record already, and a sweep ends with its jobs counted by status (exit 1 if
    any did not finish: failed, or cancelled or timed out by a scheduler).

    `on_run_start` runs before Hydra writes anything into the run directory (`.hydra/`, the log),
    so a refused run changes nothing. A sweep job that raises is recorded and returns normally,
    so the sweep goes on; `on_multirun_end` restores the signal that something failed.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.run.dir)
        # Under DDP, Lightning starts the other ranks into the same directory: only rank 0 checks.
        previous = read_record(run_dir / "metrics.json")
        if previous and rank_zero_only.rank == 0:
            exit_with(
                ConfigError(
                    f"hydra.run.dir={str(run_dir)!r} already holds a run (status "
                    f"{previous.get('status')!r}); it is kept as it is and nothing was written. "
                    f"Fix: leave hydra.run.dir at its default (a new directory per run), pick a "
                    f"new one, or continue that run with ckpt_path={run_dir}/checkpoints/last.ckpt "
                    f"(it trains on into a new directory)."
                )
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = {p.parent.name: read_record(p) for p in sorted(sweep_dir.glob("*/metrics.json"))}
        counts = Counter(record.get("status", "unknown") for record in records.values())
        log.info("Sweep %s: %s", sweep_dir, ", ".join(f"{n} {s}" for s, n in counts.items()))
        unfinished = [
            name for name, record in records.items() if record.get("status") not in FINISHED
        ]
        if unfinished:
            log.error(
                "%d job(s) did not finish (failed, or ended by the scheduler; see their "
                "metrics.json): %s",
                len(unfinished),
                unfinished,
            )
            raise SystemExit(1)
