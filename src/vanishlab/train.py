"""Train one classifier: `python -m vanishlab.train [overrides]` (add `-m` for a sweep).

Every run writes into its own Hydra directory: the composed config (`.hydra/`), TensorBoard
events, checkpoints, and `metrics.json`, the run's result record that sweeps and reports read.
"""

from __future__ import annotations

import gc

# Importing torch, Lightning and Hydra makes millions of objects that live as long as the process.
# Python's full collections walked them several times during these imports and once more at exit
# (docs/findings/speed.md, start-up): the cost of every run and of every process that runs sweep
# jobs, all of which import this module. So the collector waits while they are imported, then
# leaves them out for good (`gc.freeze`, after the imports).
gc.disable()

import functools
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import rich
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import LearningRateMonitor, ProgressBar
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from rich.syntax import Syntax
from rich.tree import Tree

from vanishlab import ConfigError, exit_with
from vanishlab.checkpoints import (
    AtomicCheckpointIO,
    eval_command,
    logging_step,
    newest_readable_checkpoint,
)
from vanishlab.config import CONFIG_DIR, check_config, check_memory, check_sweepable
from vanishlab.dashboard import write_record
from vanishlab.data import MNISTDataModule
from vanishlab.diagnostics import evidence_on_test_split
from vanishlab.init import initialise
from vanishlab.losses import mean_loss
from vanishlab.module import Classifier, ValidationMetrics
from vanishlab.nets import Network, check_probes
from vanishlab.results import (
    DIVERGED_AT_EPOCH,
    EPOCHS,
    ERROR,
    FINISHED,
    FULL_EPOCHS,
    JOB_CONFIG,
    JOB_ID,
    RESUMED_FROM,
    SEED,
    STATUS,
    STEPS,
    TAGS,
    TEST_SECONDS,
    TESTED,
    TRAIN_SECONDS,
    VERDICT,
    WORLD_SIZE,
    EvidenceSource,
    Status,
    composed_config,
    job_id,
    job_identity,
    read_record,
    verdict,
    write_json,
)
from vanishlab.storage import DiskFull, is_disk_full, report_disk_full_in_threads, set_aside
from vanishlab.sweep import register_job_dir_resolver

log = logging.getLogger(__name__)

gc.freeze()
gc.enable()
register_job_dir_resolver()
report_disk_full_in_threads()


def instantiate_function(node: DictConfig) -> Callable[..., Any]:
    """A `_partial_` config as a plain `functools.partial`.

    Hydra >= 1.3.8 re-authorises a partial's target on every call; the loss runs on every
    training step, where that would be a sizeable part of the step of a small MLP.
    """
    fn = instantiate(node)
    return functools.partial(fn.func, *fn.args, **fn.keywords)


def build(cfg: DictConfig) -> tuple[MNISTDataModule, Classifier]:
    """Check the config and the memory it needs, then instantiate the data module and the
    initialised classifier. The network gets its input shape and class count from the data
    module, and is built first on PyTorch's `meta` device, where a bad model key fails (and a
    network too big for the machine is measured) before anything is allocated."""
    check_config(cfg)
    datamodule = instantiate(cfg.data)
    shapes = {"input_shape": datamodule.sample_shape, "num_classes": datamodule.num_classes}
    with torch.device("meta"):
        meta_net = instantiate_model(cfg.model, **shapes)
    on_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    check_memory(meta_net, (cfg.data.batch_size, *datamodule.sample_shape), on_gpu)
    net = instantiate_model(cfg.model, **shapes)
    initialise(net, instantiate(cfg.init))
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    loss_fn = instantiate_function(cfg.loss)
    # A loss that does not return per-sample values fails here, with its paragraph, not later.
    blank = torch.zeros(2, datamodule.num_classes), torch.zeros(2, dtype=torch.long)
    mean_loss(loss_fn, *blank)
    module = Classifier(
        net,
        loss_fn,
        instantiate(cfg.optimizer),
        scheduler,
        composed_config(cfg),  # in its checkpoints: eval rebuilds the run from it
    )
    return datamodule, module


def instantiate_model(node: DictConfig, **shapes: Any) -> Network:
    """The network `node` names; a model that refuses its keys (a `ConfigError` of its own, or
    keys it does not take), or whose probes cannot be measured as declared
    (`nets.check_probes`), ends in the one-paragraph error, not Hydra's traceback."""
    try:
        net = instantiate(node, **shapes)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise ConfigError(
            f"model={node._target_} could not be built from its config: {err.__cause__ or err}. "
            f"Fix: give it only the keys its class takes (a remedy sets model.norm and "
            f"model.residual, which not every model has), or add them to the class."
        ) from None
    if not callable(getattr(net, "probes", None)):
        raise ConfigError(
            f"model={node._target_} has no probes() method, so nothing can measure it. Fix: "
            f"add `def probes(self) -> list[vanishlab.nets.Probe]` (see vanishlab.nets.BlockNet)."
        )
    check_probes(net, node._target_)
    return net


def instruments(
    cfg: DictConfig, resume_step: int | None = None
) -> tuple[list[pl.Callback], list[Logger]]:
    """The config's callbacks and loggers (a null entry is switched off, as in
    `callbacks.progress_bar=null`), and `ValidationMetrics`, which the record needs. Without a
    logger there is nothing for Lightning's `LearningRateMonitor` to write to (it refuses to
    start), so it is left out.

    A run that trains on from a checkpoint of step `resume_step` in its own directory has its
    TensorBoard writer purge what a killed attempt wrote from that step on (TensorBoard's
    `purge_step`), so each tag holds one value per step."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    callbacks.append(ValidationMetrics())
    loggers = [
        instantiate(c, purge_step=resume_step)
        if resume_step is not None and issubclass(get_class(c._target_), TensorBoardLogger)
        else instantiate(c)
        for c in (cfg.get("logger") or {}).values()
        if c
    ]
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return callbacks, loggers


def make_trainer(trainer_cfg: DictConfig, **kwargs: Any) -> pl.Trainer:
    """The trainer `trainer_cfg` describes, writing its checkpoints atomically
    (`AtomicCheckpointIO`). Lightning gives a trainer without a progress bar callback one of
    its own; here a config that switched its bar off (`callbacks.progress_bar=null`) has none,
    unless `trainer.enable_progress_bar` asks for Lightning's."""
    if "enable_progress_bar" not in trainer_cfg:
        callbacks = kwargs.get("callbacks") or []
        kwargs["enable_progress_bar"] = any(isinstance(c, ProgressBar) for c in callbacks)
    return instantiate(trainer_cfg, plugins=[AtomicCheckpointIO()], **kwargs)


def build_trainer(cfg: DictConfig, resume_step: int | None = None) -> pl.Trainer:
    """The trainer with the config's callbacks and loggers (`instruments`)."""
    callbacks, loggers = instruments(cfg, resume_step)
    return make_trainer(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def fit_and_test(
    cfg: DictConfig, resume_from: Path | None = None, resume_step: int | None = None
) -> dict[str, Any]:
    """Train (from scratch, or on from a checkpoint) and test one run, as `cfg.train` and
    `cfg.test` say; return its result record (what `metrics.json` holds).

    The checkpoint is `resume_from` (an interrupted job's own, written at `resume_step`), else
    `cfg.ckpt_path`. A run that does not train tests the checkpoint's weights; one that trains
    tests its final weights, which are what its verdict is about.
    """
    ckpt_path = resume_from or cfg.get("ckpt_path")
    train, test = cfg.get("train", True), cfg.get("test", True)
    if not train and (not test or ckpt_path is None):
        raise ConfigError(
            f"train=false with test={test} and ckpt_path={ckpt_path} does nothing. Fix: set "
            f"train=true, or test=true with ckpt_path=<run>/checkpoints/last.ckpt to only "
            f"evaluate that checkpoint."
        )
    datamodule, module = build_seeded(cfg)
    trainer = build_trainer(cfg, resume_step)
    origin = {} if ckpt_path is None else {RESUMED_FROM if train else TESTED: str(ckpt_path)}
    training = testing = None
    if train:
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        training = training_evidence(trainer, time.perf_counter() - start)
    if test:
        start = time.perf_counter()
        tested = None if train else ckpt_path
        metrics = trainer.test(
            module, datamodule=datamodule, ckpt_path=tested, verbose=False, weights_only=True
        )
        seconds = time.perf_counter() - start
        evidence = evidence_on_test_split(module, datamodule)
        testing = testing_evidence(metrics[0], seconds, evidence)
    record = job_record(cfg, training, testing, origin)
    write_record(trainer.loggers, record, trainer.global_step)
    return record


def job_record(
    cfg: DictConfig,
    training: dict[str, Any] | None,
    testing: dict[str, Any] | None,
    origin: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The record of a job that ran, alone or in a stack: what training found
    (`training_evidence`; a diverged job's status overrides `completed`), what testing found
    (`testing_evidence`), the checkpoint it came from (`origin`), and, for a job that trained,
    its verdict."""
    record = {STATUS: Status.COMPLETED, SEED: cfg.seed, **(origin or {})}
    record.update({**(training or {}), **(testing or {})})
    if training is not None:
        record[VERDICT] = verdict(record)
    return record


def build_seeded(cfg: DictConfig) -> tuple[MNISTDataModule, Classifier]:
    """`build` under the run's seed and its torch threads (`torch_threads`), its data read:
    missing or corrupt data fails here, before any trainer exists. (The threads are set here,
    where the job trains: a sweep may have prepared it in another process.)"""
    torch.set_num_threads(torch_threads(cfg))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    datamodule.prepare_data()
    return datamodule, module


def testing_evidence(
    metrics: dict[str, Any], seconds: float, evidence: dict[str, int]
) -> dict[str, Any]:
    """What testing found: the test metrics, their seconds, and the test-split evidence."""
    return {**scalars(metrics, "test/"), TEST_SECONDS: round(seconds, 3), **evidence}


def training_evidence(trainer: pl.Trainer, seconds: float) -> dict[str, Any]:
    """What the training loop saw (steps, epochs, its `seconds`) and what its callbacks found
    (`EvidenceSource`: the last validation's metrics, gradient flow, divergence)."""
    evidence: dict[str, Any] = {
        TRAIN_SECONDS: round(seconds, 3),
        STEPS: trainer.global_step,
        EPOCHS: trainer.current_epoch,
        WORLD_SIZE: trainer.world_size,
    }
    for callback in trainer.callbacks:
        if isinstance(callback, EvidenceSource):
            evidence.update(callback.evidence())
    # A fast_dev_run is a smoke test, never a full pass, even when its one batch is the whole
    # split (full-batch gradient descent).
    every_batch = not trainer.fast_dev_run and (
        trainer.num_training_batches >= len(trainer.train_dataloader)
    )
    whole_epochs = evidence.get(DIVERGED_AT_EPOCH, trainer.current_epoch)
    evidence[FULL_EPOCHS] = whole_epochs if every_batch else 0
    return evidence


def print_config(cfg: DictConfig) -> None:
    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else value
        tree.add(str(key)).add(Syntax(str(text).strip(), "yaml"))
    rich.print(tree)


def torch_threads(cfg: DictConfig) -> int:
    """`threads` if set, else the cores this job was given, shared out among the jobs that run
    at once: the process's CPU affinity (what `taskset`, cgroups or SLURM's task/affinity allow),
    no more than SLURM's `SLURM_CPUS_PER_TASK`, divided by joblib's `n_jobs`. So jobs x threads
    never oversubscribe what the machine or the scheduler gave."""
    if cfg.get("threads") is not None:
        return cfg.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        cores = min(cores, int(os.environ["SLURM_CPUS_PER_TASK"]))
    launcher = HydraConfig.get().launcher if HydraConfig.initialized() else {}
    parallel = launcher.get("n_jobs", 1) if "joblib" in launcher.get("_target_", "") else 1
    if parallel < 0:  # joblib counts back from the number of cores: -1 = all of them
        parallel = cores + 1 + parallel
    return max(1, cores // parallel)


def save_record(path: Path, record: dict[str, Any]) -> None:
    """Under DDP every process runs the job; only rank 0 writes its record."""
    if rank_zero_only.rank == 0:
        write_json(path, record)


@dataclass
class Job:
    """A job ready to train: its config, where its record goes, its identity, and the
    checkpoint it trains on from (an interrupted job's own) with the step it logs from."""

    cfg: DictConfig
    record_path: Path
    identity: dict[str, Any]
    resume_from: Path | None
    resume_step: int | None
    in_sweep: bool
    # Its checkpoint is of a step before its loops' (a stacked job that stopped, diverged or
    # early, while its stack trained on): it has nothing left to train.
    stopped: bool = False

    def fit_and_test(self) -> dict[str, Any]:
        return fit_and_test(self.cfg, self.resume_from, self.resume_step)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run one job and keep its record, `metrics.json`, from its first moment (`started`).

    In a sweep, a job whose directory holds a finished record of its own config is skipped,
    an interrupted one trains on from its `checkpoints/last.ckpt`, and a job that raises is
    recorded as `failed` while the sweep goes on. A record of another config is never taken as
    this job's, nor overwritten.
    """
    job = prepare(cfg)
    if not isinstance(job, Job):
        return job
    return finish(job, job.fit_and_test)


def prepare(cfg: DictConfig) -> Job | float | None:
    """The job, with its `started` record written; or, for a job that is done (skipped: it
    finished before; or failed: its config does not resolve or holds a bad value, or its
    directory holds another config's record), its value for the sweeper.

    A job whose directory holds its own unfinished record (it was killed, or its disk filled)
    trains on from its newest readable checkpoint. A record or checkpoint that cannot be read
    is set aside (`storage.set_aside`), and the job trains as if it had never been there.
    """
    output_dir = Path(cfg.paths.output_dir)
    record_path = output_dir / "metrics.json"
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    previous = read_record(record_path)
    try:
        job_config = job_identity(cfg)
    except Exception as err:  # a key left at ??? or an interpolation that does not resolve
        err = ConfigError(f"the config does not resolve: {err}. Fix: set the key it names")
        return job_failed(err, {}, None if previous else record_path, in_sweep)
    identity = {JOB_ID: job_id(job_config), JOB_CONFIG: job_config}
    if previous.get(STATUS) == Status.UNREADABLE:  # half a file (from before atomic writes): ours
        set_aside(record_path, previous[ERROR])
        previous = {STATUS: Status.UNREADABLE, JOB_ID: identity[JOB_ID]}
    if previous and previous.get(JOB_ID) != identity[JOB_ID]:
        err = ConfigError(
            f"{output_dir} holds the record of another config (job_id "
            f"{previous.get(JOB_ID)}, this job's is {identity[JOB_ID]}); it is kept as it is. "
            f"Fix: leave hydra.sweep.subdir at its default, or run into a new hydra.sweep.dir."
        )
        return job_failed(err, {}, None, in_sweep)
    if previous.get(STATUS) in FINISHED:
        log.info("Skipping %s: already %s", output_dir.name, previous[STATUS])
        return optimized_value(cfg, previous)
    try:
        check_config(cfg)
        if in_sweep:
            check_sweepable(cfg)
    except ConfigError as err:
        return job_failed(err, identity, record_path, in_sweep)

    if not in_sweep:  # a sweep job's config is in its .hydra/config.yaml; the log names its keys
        print_config(cfg)
    log.info("torch threads: %d", torch_threads(cfg))  # as it trains (`build_seeded`)
    if cfg.seed is None:  # draw one (an interrupted job: the one it drew) and keep it
        with open_dict(cfg):
            drawn = previous.get(SEED)
            cfg.seed = drawn if drawn is not None else secrets.randbelow(2**31)
        log.info("seed=null: drew seed %d", cfg.seed)
    resume = newest_readable_checkpoint(output_dir / "checkpoints") if previous else None
    resume_from, resume_step = (resume[0], logging_step(resume[1])) if resume else (None, None)
    stopped = resume is not None and resume[1]["global_step"] != resume_step
    save_record(record_path, {STATUS: Status.STARTED, SEED: cfg.seed, **identity})
    return Job(cfg, record_path, identity, resume_from, resume_step, in_sweep, stopped)


# This task trains in stacks: the launchers (`hydra_plugins.vanishlab_launchers`) look for the step
# that prepares a job on the function Hydra hands them, `main` undecorated. It is named by its
# import path: under `python -m vanishlab.train` this module is `__main__`, whose `Job` is not the
# `vanishlab.train.Job` that `vanishlab.stack` trains.
main.__wrapped__.prepare = "vanishlab.train.prepare"


def finish(job: Job, train_and_test: Callable[[], dict[str, Any]]) -> float | None:
    """Run `train_and_test` (it returns the job's record) and keep the record; a job that
    raises is recorded as `failed`. Returns the job's value for the sweeper."""
    try:
        record = train_and_test()
    except Exception as err:
        return job_failed(err, job.identity, job.record_path, job.in_sweep)
    record = {**record, TAGS: list(job.cfg.get("tags") or []), **job.identity}
    save_record(job.record_path, record)
    # The console gets the figures; profiles, spectra and the config stay in metrics.json.
    rich.print({k: v for k, v in record.items() if not isinstance(v, (dict, list)) or k == TAGS})
    last_ckpt = job.record_path.parent / "checkpoints" / "last.ckpt"
    if last_ckpt.is_file():
        log.info("Evaluate it with: %s", eval_command(last_ckpt))
    return optimized_value(job.cfg, record)


def optimized_value(cfg: DictConfig, record: dict[str, Any]) -> float | None:
    """The job's value for Hydra's sweepers: its `optimized_metric`, or None when it has none
    (it failed, or diverged before it was validated). Optuna tells such a trial as failed and
    goes on; a nan would end the whole search."""
    value = record.get(cfg.optimized_metric)
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def job_failed(
    err: Exception, identity: dict[str, Any], record_path: Path | None, in_sweep: bool
) -> None:
    """Record the failure (where there is a record of this job's to write), then let a sweep go
    on; a single run ends with the one-paragraph error of a bad setting, or the traceback.

    A full disk is no failure of the job's: its `started` record stays as it is (it trains on
    when the command runs again), and the command ends with the paragraph, as every other job
    would fail the same way."""
    if is_disk_full(err):
        exit_with(DiskFull(record_path.parent if record_path else Path.cwd()))
    error = f"{type(err).__name__}: {err}"
    if record_path is not None:
        save_record(record_path, {STATUS: Status.FAILED, ERROR: error, **identity})
    if in_sweep:
        trace = None if isinstance(err, ConfigError) else err
        log.error("Job failed; the sweep goes on. %s", error, exc_info=trace)
        return None
    if isinstance(err, ConfigError):
        exit_with(err)
    raise err


if __name__ == "__main__":
    main()
