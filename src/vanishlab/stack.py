"""Stacked sweeps: a sweep's compatible jobs trained in one process by one Lightning loop.

A stack is K jobs whose configs differ only in what does not change the network's shape or the
data it sees: the init and its keys, the loss, the optimizer's hyperparameters (one optimizer
class) and the seed (`stack_key`). One Lightning step trains every job of the stack:

- each job keeps its own network, built and initialised under its own seed, its own loss, and
  its own batches (its data module's own shuffle generator);
- the step's loss is the sum of the jobs' losses. Their parameters are disjoint, so backward
  gives each job exactly the gradient its own loss gives it alone;
- one optimizer holds one parameter group per job, with that job's hyperparameters (lr,
  momentum, weight decay, ...), so each job's update, and its optimizer state (momentum
  buffers, Adam's moments), are its own. A scheduler scales every group as it would scale each
  job's (the scheduler is part of the stack key);
- gradient clipping is applied per job (`configure_gradient_clipping`), not over the stack;
- each job has its own callbacks (`GradientFlow`, `StopOnDivergence`, its `ModelCheckpoint` and
  learning-rate monitor), called by the stack's hooks with the job's module and a `JobView` of
  the trainer: the stack's step and epoch counters, the job's own metrics, loggers,
  `should_stop`, checkpoints and share of the optimizer (`job_optimizer`). What
  the stack logs as `<job>/<name>` reaches the job's own loggers as `<name>` (`JobLoggers`). A
  job that stops (it diverged) leaves the stack's loss from that step: its gradients stay None,
  so the optimizer leaves its weights and state as they are, and the others train on.

So a stacked job runs the float operations it would run alone, and Lightning's per-step cost is
paid once for the K jobs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import Logger
from torch import Tensor, nn

from vanishlab.data import MNISTDataModule, TensorBatches
from vanishlab.diagnostics import Predictions, evidence_on_test_split
from vanishlab.module import Classifier, logs_this_step, stage_metrics
from vanishlab.results import (
    JOB_CONFIG,
    JOB_ID,
    SEED,
    STATUS,
    TRAIN_SECONDS,
    VERDICT,
    EvidenceSource,
    job_id,
    verdict,
)
from vanishlab.schedulers import lr_scheduler
from vanishlab.train import (
    Job,
    build_seeded,
    finish,
    instruments,
    job_failed,
    make_trainer,
    testing_evidence,
    training_evidence,
)

log = logging.getLogger(__name__)

JobBatches = list[tuple[Tensor, Tensor]]  # one step's batches, one per job

STACKED_WITH = "stacked_with"  # in a stacked job's record: the other jobs of its stack
# A job's own callbacks; the others (the progress bar) are the stack's, from its first job's config.
PER_JOB = (EvidenceSource, ModelCheckpoint, LearningRateMonitor)
# Optimizers whose per-job parameter groups the equivalence test covers.
STACKABLE_OPTIMIZERS = ("torch.optim.SGD", "torch.optim.Adam")
# Keys a stack's jobs may differ in (besides the optimizer's hyperparameters).
STACKABLE_KEYS = ("init", "loss", SEED)


def stack_key(identity: dict[str, Any]) -> str:
    """Jobs with the same key train as one stack: their identities (`results.job_identity`)
    are equal but for `STACKABLE_KEYS`, the data's seed (a copy of `seed`) and the optimizer's
    hyperparameters; the optimizer's class must match. A network class may name model keys that
    decide only its parameters' initial values (`INIT_KEYS`, e.g. an RNN's recurrent scale):
    its jobs may differ in those too."""
    shape = copy.deepcopy(identity)
    for key in STACKABLE_KEYS:
        shape.pop(key, None)
    model = shape.get("model", {})
    for key in init_keys(model.get("_target_")):
        model.pop(key, None)
    shape.get("data", {}).pop(SEED, None)
    shape["optimizer"] = {"_target_": identity["optimizer"]["_target_"]}
    return job_id(shape)


def init_keys(target: str | None) -> tuple[str, ...]:
    """The model keys `target`'s class says decide only initial values; none where it names no
    class (that job fails alone, with its paragraph, when it is built)."""
    try:
        return tuple(getattr(get_class(target), "INIT_KEYS", ())) if target else ()
    except (ImportError, AttributeError, ValueError):
        return ()


class StackedBatches:
    """One batch of each job per step, each from that job's own order."""

    def __init__(self, streams: list[TensorBatches]) -> None:
        self.streams = streams

    def __len__(self) -> int:
        return len(self.streams[0])

    def __iter__(self) -> Iterator[JobBatches]:
        return (list(batches) for batches in zip(*self.streams, strict=True))


class StackedData(pl.LightningDataModule):
    """The jobs' data modules as one: training yields a batch per job; validation and testing
    use the first job's splits, which are every job's (the split has its own fixed seed)."""

    def __init__(self, jobs: list[MNISTDataModule]) -> None:
        super().__init__()
        self.jobs = jobs

    def prepare_data(self) -> None:
        for job in self.jobs:
            job.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for job in self.jobs:
            job.trainer = self.trainer
            job.setup(stage)

    def state_dict(self) -> dict[str, Any]:
        return {"jobs": [job.state_dict() for job in self.jobs]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for job, state in zip(self.jobs, state_dict["jobs"], strict=True):
            job.load_state_dict(state)

    def train_dataloader(self) -> StackedBatches:
        return StackedBatches([job.train_dataloader() for job in self.jobs])

    def val_dataloader(self) -> TensorBatches:
        return self.jobs[0].val_dataloader()

    def test_dataloader(self) -> TensorBatches:
        return self.jobs[0].test_dataloader()


def job_optimizer(optimizer: torch.optim.Optimizer, job: int) -> torch.optim.Optimizer:
    """Job `job`'s share of the stack's optimizer, as its callbacks would see its own optimizer
    alone: a shallow copy of the same class over the job's parameter group (the same dict, so
    a scheduler's changes show) and its parameters' state as it is now."""
    share = copy.copy(optimizer)
    group = optimizer.param_groups[job]
    own = {id(p) for p in group["params"]}
    share.param_groups = [group]
    share.state = defaultdict(dict, {p: s for p, s in optimizer.state.items() if id(p) in own})
    return share


class JobView:
    """A job's view of the stack's trainer: every attribute is the trainer's (the step and
    epoch counters, `max_epochs`, the strategy, ...) but the job's own `callbacks`, `loggers`,
    `callback_metrics` (its `<job>/` metrics, under their own names), `should_stop` (it stops
    this job alone), `save_checkpoint` (the job's checkpoint, as it would be alone), and its
    share of the optimizer and schedulers (what a learning-rate monitor reads, what
    `StopOnDivergence` clears)."""

    def __init__(self, stack: StackedClassifier, job: int) -> None:
        self._trainer = stack.trainer
        self._stack, self._job = stack, job
        self.callbacks = stack.job_callbacks[job]
        self.loggers = stack.job_loggers[job]
        self.should_stop = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)

    @property
    def callback_metrics(self) -> dict[str, Any]:
        return own_metrics(self._trainer.callback_metrics, self._job)

    @functools.cached_property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [job_optimizer(self._trainer.optimizers[0], self._job)]

    @functools.cached_property
    def lr_scheduler_configs(self) -> list[Any]:
        """The stack's schedulers, each over the job's share of the optimizer (the same object
        as `optimizers`: Lightning's monitor tells schedulers' optimizers by identity)."""
        configs = []
        for config in self._trainer.lr_scheduler_configs:
            scheduler = copy.copy(config.scheduler)
            scheduler.optimizer = self.optimizers[0]
            configs.append(dataclasses.replace(config, scheduler=scheduler))
        return configs

    def save_checkpoint(
        self, filepath: str, weights_only: bool = False, storage_options: Any = None
    ) -> None:
        checkpoint = self._stack.job_checkpoint(self._job)
        self._trainer.strategy.save_checkpoint(checkpoint, filepath, storage_options)


class JobLoggers(Logger):
    """The stack's logger: what the stack logs as `<job>/<name>` (`0/val/acc`) reaches that job's
    loggers as `<name>`, at the step Lightning gives it; other keys (`epoch`) go along to every
    job that gets a metric in the same call. So Lightning's own reduction and steps apply."""

    def __init__(self, job_loggers: list[list[Logger]]) -> None:
        super().__init__()
        self.job_loggers = job_loggers

    @property
    def name(self) -> str:
        return "stack"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        own: list[dict[str, float]] = [{} for _ in self.job_loggers]
        shared = {}
        for key, value in metrics.items():
            job, _, name = key.partition("/")
            if job.isdigit() and name:
                own[int(job)][name] = value
            else:
                shared[key] = value
        for loggers, metrics_of_job in zip(self.job_loggers, own, strict=True):
            for logger in loggers if metrics_of_job else ():
                logger.log_metrics({**metrics_of_job, **shared}, step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """A job's HParams row is written from its record (`hparams.py`)."""

    def finalize(self, status: str) -> None:
        for loggers in self.job_loggers:
            for logger in loggers:
                logger.finalize(status)


class StackedClassifier(pl.LightningModule):
    """K `Classifier`s trained by one Lightning loop (rules: module docstring), each with its
    `callbacks` and `loggers` (lists per job)."""

    def __init__(
        self,
        jobs: list[Classifier],
        callbacks: list[list[pl.Callback]] | None = None,
        loggers: list[list[Logger]] | None = None,
    ) -> None:
        super().__init__()
        self.jobs = nn.ModuleList(jobs)
        self.job_callbacks = callbacks or [[] for _ in jobs]
        self.job_loggers = loggers or [[] for _ in jobs]

    def active(self) -> list[tuple[int, Classifier]]:
        return [(i, job) for i, job in enumerate(self.jobs) if not self.views[i].should_stop]

    def each(
        self,
        hook: str,
        args: Callable[[int], tuple] = lambda i: (),
        jobs: list[tuple[int, Classifier]] | None = None,
    ) -> None:
        """Call `hook` of the callbacks of `jobs` (default: those still running) with the job's
        view, its module and its own `args(i)`."""
        for i, job in self.running if jobs is None else jobs:
            for callback in self.job_callbacks[i]:
                getattr(callback, hook)(self.views[i], job, *args(i))

    def setup(self, stage: str) -> None:
        if not hasattr(self, "views"):  # once: testing after fitting keeps who stopped
            self.views = [JobView(self, i) for i in range(len(self.jobs))]
            self.running = self.active()
            self.stopped: list[tuple[int, Classifier]] = []  # in this epoch
        self.each("setup", lambda i: (stage,))

    def on_fit_start(self) -> None:
        self.each("on_fit_start")

    def on_train_start(self) -> None:
        self.each("on_train_start")

    def on_train_epoch_start(self) -> None:
        self.each("on_train_epoch_start")

    def on_train_batch_start(self, batches: JobBatches, batch_idx: int) -> None:
        self.each("on_train_batch_start", lambda i: (batches[i], batch_idx))

    def training_step(self, batches: JobBatches, batch_idx: int) -> Tensor:
        """The running jobs' losses, summed; each job logs as `Classifier.training_step` does,
        under its index."""
        self.losses = [None] * len(self.jobs)
        for i, job in self.running:
            x, y = batches[i]
            outputs = job(x)
            self.losses[i] = job.loss_fn(outputs, y)
            if logs_this_step(self):
                metrics = stage_metrics("train", self.losses[i], outputs, y)
                self.log_dict(under_job(i, metrics), batch_size=len(y))
        return torch.stack([loss for loss in self.losses if loss is not None]).sum()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self.sums, self.images = 0, 0

    def on_test_epoch_start(self) -> None:
        self.sums, self.images = 0, 0
        num_classes = self.trainer.datamodule.jobs[0].num_classes
        self.predictions = [Predictions(num_classes) for _ in self.jobs]

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        """Every job on the same batch (the jobs share their evaluation splits). The stack sums
        their metrics and logs each job's once an epoch (`log_evaluation`): a `self.log` costs
        about 0.6 ms, which per job, metric and batch would cost more than the forward passes.
        The sums are Lightning's own mean, in its order and precision (`value * batch_size`
        summed in float32, divided by the image count), so each job logs what it logs alone.
        Testing also gathers each job's `Predictions`: the test-split evidence a single run
        takes from a forward pass of its own."""
        metrics = []
        for i, job in enumerate(self.jobs):
            job_metrics, outputs = job.evaluation(batch, stage)
            metrics.append(job_metrics)
            if stage == "test":
                self.predictions[i].update(outputs)
        self.names = list(metrics[0])
        values = torch.stack([torch.stack(list(m.values())) for m in metrics])
        self.sums = self.sums + values * len(batch[1])
        self.images = self.images + len(batch[1])

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation()

    def on_test_epoch_end(self) -> None:
        self.log_evaluation()

    def log_evaluation(self) -> None:
        means = self.sums / torch.tensor(self.images, device=self.sums.device)
        for i, values in enumerate(means):
            self.log_dict(under_job(i, dict(zip(self.names, values, strict=True))), batch_size=1)

    def on_before_backward(self, loss: Tensor) -> None:
        self.each("on_before_backward", lambda i: (self.losses[i],))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.each("on_before_optimizer_step", lambda i: (self.views[i].optimizers[0],))

    def on_train_batch_end(self, outputs: Any, batches: JobBatches, batch_idx: int) -> None:
        """A job that stopped in this step leaves the stack; it ends its epoch after the next
        validation (`end_stopped`); the stack stops when every job has."""
        self.each("on_train_batch_end", lambda i: (outputs, batches[i], batch_idx))
        for i, job in self.running:
            if self.views[i].should_stop:
                self.views[i].global_step = self.trainer.global_step  # where it ended
                self.stopped.append((i, job))
        self.running = self.active()
        self.trainer.should_stop = self.trainer.should_stop or not self.running

    def on_validation_end(self) -> None:
        """Each job's checkpoints, the jobs that stopped in this epoch included."""
        self.each("on_validation_end", jobs=[*self.running, *self.stopped])
        self.end_stopped()

    def on_train_epoch_end(self) -> None:
        self.each("on_train_epoch_end")
        self.end_stopped()  # when no validation ran

    def end_stopped(self) -> None:
        """What a job that stops sees alone: its epoch ends after a validation, which runs on
        the weights it stopped with (they have not moved since), then its training ends."""
        for hook in ("on_train_epoch_end", "on_train_end"):
            self.each(hook, jobs=self.stopped)
        for i, _ in self.stopped:
            self.views[i].current_epoch = self.trainer.current_epoch + 1  # that epoch ended
        self.stopped = []

    def job_checkpoint(self, i: int) -> dict[str, Any]:
        """Job `i`'s checkpoint as Lightning writes it for a single run, so that eval loads it
        and a single run trains on from it: its weights and hyperparameters, its slice of the
        optimizer's and schedulers' state, its callbacks' and data module's state, and the
        loops' state (a running job's steps are the stack's)."""
        trainer, job, view = self.trainer, self.jobs[i], self.views[i]
        groups = len(trainer.optimizers[0].param_groups)
        return {
            "epoch": view.current_epoch,
            "global_step": view.global_step,
            "pytorch-lightning_version": pl.__version__,
            "state_dict": job.state_dict(),
            "loops": {
                name: getattr(trainer, name).state_dict()
                for name in ("fit_loop", "validate_loop", "test_loop", "predict_loop")
            },
            "callbacks": {
                callback.state_key: state
                for callback in view.callbacks
                if (state := callback.state_dict())
            },
            "optimizer_states": [job_optimizer(trainer.optimizers[0], i).state_dict()],
            "lr_schedulers": [
                {
                    key: [value[i]] if isinstance(value, list) and len(value) == groups else value
                    for key, value in config.scheduler.state_dict().items()
                }
                for config in trainer.lr_scheduler_configs
            ],
            "hparams_name": job._hparams_name,
            "hyper_parameters": dict(job.hparams),
            type(self.trainer.datamodule.jobs[i]).__qualname__: (
                self.trainer.datamodule.jobs[i].state_dict()
            ),
        }

    def on_train_end(self) -> None:
        self.each("on_train_end")

    def configure_optimizers(self) -> dict[str, Any]:
        """One optimizer, a parameter group per job with that job's hyperparameters."""
        factories = [job.make_optimizer for job in self.jobs]
        groups = [
            {"params": list(job.parameters()), **make.keywords}
            for job, make in zip(self.jobs, factories, strict=True)
        ]
        optimizer = factories[0].func(groups)
        make_scheduler = self.jobs[0].make_scheduler
        if make_scheduler is None:
            return {"optimizer": optimizer}
        schedule = lr_scheduler(make_scheduler, optimizer, self.trainer)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Each job's gradient clipped as it would be alone, over its own parameters."""
        if gradient_clip_val is None:
            return
        for group in optimizer.param_groups:
            params = group["params"]
            if gradient_clip_algorithm == "value":
                nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                nn.utils.clip_grad_norm_(params, gradient_clip_val)


def fit_and_test_stack(
    cfgs: list[DictConfig],
    jobs: list[tuple[MNISTDataModule, Classifier]] | None = None,
    stack_callbacks: Sequence[pl.Callback] = (),
) -> list[dict[str, Any]]:
    """Train and test the jobs of one stack (`stack_key` equal) as one; return each job's
    record as `train.fit_and_test` returns it for the job alone, with the stack's seconds
    shared out. `jobs`: the jobs built already
    (`train.build_seeded`).

    Each job gets its own evidence callbacks, checkpoints, learning-rate monitor and loggers
    from its config (`PER_JOB`); the stack's trainer takes the first job's other callbacks (the
    progress bar) and `stack_callbacks` (a timer, a profiler).
    """
    jobs = jobs or [build_seeded(cfg) for cfg in cfgs]
    job_callbacks, job_loggers, shared = [], [], []
    for cfg in cfgs:
        callbacks, loggers = instruments(cfg)
        own = [c for c in callbacks if isinstance(c, PER_JOB)]
        # Checkpoints last, as Lightning orders a trainer's callbacks: they save the others' state.
        job_callbacks.append(sorted(own, key=lambda c: isinstance(c, ModelCheckpoint)))
        job_loggers.append(loggers)
        shared = shared or [c for c in callbacks if not isinstance(c, PER_JOB)]
    stack = StackedClassifier([module for _, module in jobs], job_callbacks, job_loggers)
    data = StackedData([datamodule for datamodule, _ in jobs])
    trainer = make_trainer(
        cfgs[0].trainer,
        callbacks=[*shared, *stack_callbacks],
        logger=JobLoggers(job_loggers),
        enable_checkpointing=False,  # the jobs have their own
    )
    start = time.perf_counter()
    trainer.fit(stack, datamodule=data)
    train_seconds = time.perf_counter() - start
    records = []
    for cfg, view in zip(cfgs, stack.views, strict=True):
        record: dict[str, Any] = {STATUS: "completed", SEED: cfg.seed}
        record[TRAIN_SECONDS] = round(train_seconds / len(cfgs), 3)
        records.append({**record, **training_evidence(view)})
    start = time.perf_counter()
    (tested,) = trainer.test(stack, datamodule=data, verbose=False)
    test_seconds = (time.perf_counter() - start) / len(cfgs)
    # A single run's evidence is the whole test split's, however few batches its test loop ran.
    whole_split = trainer.num_test_batches[0] == len(data.test_dataloader())
    for i, (record, (datamodule, module)) in enumerate(zip(records, jobs, strict=True)):
        if whole_split:
            evidence = stack.predictions[i].evidence()
        else:
            evidence = evidence_on_test_split(module, datamodule)
        record.update(testing_evidence(own_metrics(tested, i), test_seconds, evidence))
        record[VERDICT] = verdict(record)
    return records


def under_job(job: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """Job `job`'s metrics as the stack logs them: `val/acc` -> `<job>/val/acc`."""
    return {f"{job}/{name}": value for name, value in metrics.items()}


def own_metrics(metrics: dict[str, Any], job: int) -> dict[str, Any]:
    """Job `job`'s metrics (`<job>/val/acc`) under their own names (`val/acc`)."""
    prefix = f"{job}/"
    return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}


def why_alone(job: Job) -> str | None:
    """Why `job` cannot train in a stack (it then runs alone, as with the basic launcher)."""
    cfg = job.cfg
    if job.resume_from is not None:
        return f"it trains on from its checkpoint {job.resume_from}"
    if not (cfg.get("train", True) and cfg.get("test", True)) or cfg.get("ckpt_path"):
        return "it does not both train and test from scratch"
    if cfg.optimizer._target_ not in STACKABLE_OPTIMIZERS:
        return f"optimizer {cfg.optimizer._target_} is not one a stack is tested with"
    return None


def stacks(jobs: list[Job], max_stack: int) -> list[list[int]]:
    """The jobs' indices grouped into stacks of at most `max_stack` (`stack_key` equal); a job
    that cannot stack (`why_alone`) is a stack of one."""
    groups: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        reason = why_alone(job)
        if reason:
            log.info("%s runs alone: %s", job.record_path.parent.name, reason)
        key = f"alone {i}" if reason else stack_key(job.identity[JOB_CONFIG])
        groups.setdefault(key, []).append(i)
    return [
        group[start : start + max_stack]
        for group in groups.values()
        for start in range(0, len(group), max_stack)
    ]


def run_stack(jobs: list[Job]) -> list[float | None]:
    """Train and test `jobs` as one stack (or the one job alone) and keep each job's record;
    return each job's value for the sweeper. A job that cannot be built fails alone, before the
    stack trains; a stack that raises as it trains fails each of its jobs."""
    if len(jobs) == 1:
        (job,) = jobs
        return [finish(job, job.fit_and_test)]
    values: dict[int, float | None] = {}
    ready: dict[int, tuple[MNISTDataModule, Classifier]] = {}
    for i, job in enumerate(jobs):
        try:
            ready[i] = build_seeded(job.cfg)
        except Exception as err:
            values[i] = job_failed(err, job.identity, job.record_path, job.in_sweep)
    stacked = [jobs[i] for i in ready]
    if not stacked:
        return [values[i] for i in range(len(jobs))]
    try:
        records = fit_and_test_stack([job.cfg for job in stacked], list(ready.values()))
    except Exception as err:
        records = [err] * len(stacked)
    ids = [job.identity[JOB_ID] for job in stacked]
    for i, job, record in zip(ready, stacked, records, strict=True):
        if isinstance(record, Exception):
            values[i] = job_failed(record, job.identity, job.record_path, job.in_sweep)
        else:
            others = [other for other in ids if other != job.identity[JOB_ID]]
            values[i] = finish(job, lambda r=record, o=others: {**r, STACKED_WITH: o})
    return [values[i] for i in range(len(jobs))]
