"""Stacked sweeps: a sweep's compatible jobs trained in one process by one Lightning loop.

A stack is K jobs whose configs differ only in what does not change the network's shape or the
data it sees: the init and its keys, the loss, the optimizer's hyperparameters (one optimizer
class) and the seed (`stack_key`). Where the jobs' networks and optimizer batch, a stack runs
them as one batched model (`FusedStack`: one forward, backward and update for the K jobs, to a
tolerance of each job alone); otherwise (`stacked_module` says why) job by job in one loop
(`StackedClassifier`), where one Lightning step trains every job of the stack:

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
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import Logger
from torch import Tensor, nn

from vanishlab import ConfigError
from vanishlab.batched_optim import (
    BatchedAdam,
    BatchedOptimizer,
    BatchedSGD,
    clip_grad_norm_per_job_,
    job_value,
    job_values,
    norms_per_job,
    with_job,
)
from vanishlab.checkpoints import read_checkpoint
from vanishlab.dashboard import write_record, write_scalars
from vanishlab.data import MNISTDataModule, TensorBatches
from vanishlab.diagnostics import GradientFlow, Predictions, evidence_on_test_split
from vanishlab.divergence import StopOnDivergence, applied_gradients
from vanishlab.fused import FusedNetworks, Outputs, replace
from vanishlab.losses import mean_loss
from vanishlab.module import Classifier, accuracy, logs_this_step, stage_names
from vanishlab.results import (
    JOB_CONFIG,
    JOB_ID,
    RESUMED_FROM,
    SEED,
    EvidenceSource,
    job_id,
)
from vanishlab.schedulers import lr_scheduler
from vanishlab.sharpness import Sharpness, top_eigenpairs
from vanishlab.train import (
    Job,
    build_seeded,
    finish,
    instruments,
    job_failed,
    job_record,
    make_trainer,
    testing_evidence,
    training_evidence,
)

log = logging.getLogger(__name__)

JobBatches = list[tuple[Tensor, Tensor]]  # one step's batches, one per job

STACKED_WITH = "stacked_with"  # in a stacked job's record: the other jobs of its stack
# A job's own callbacks; the others (the progress bar) are the stack's, from its first job's config.
PER_JOB = (EvidenceSource, ModelCheckpoint, LearningRateMonitor)
# Optimizers whose per-job parameter groups the equivalence test covers, and the batched
# optimizer that trains them in a fused stack.
STACKABLE_OPTIMIZERS = ("torch.optim.SGD", "torch.optim.Adam")
BATCHED_OPTIMIZERS: dict[type[torch.optim.Optimizer], type[BatchedOptimizer]] = {
    torch.optim.SGD: BatchedSGD,
    torch.optim.Adam: BatchedAdam,
}
# The callback hooks a stack calls for each job (`StackedClassifier.each`); a job's callback
# that implements another is refused (`refuse_undriven_hooks`).
DRIVEN_HOOKS = (
    "setup",
    "on_fit_start",
    "on_train_start",
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_validation_end",
    "on_train_epoch_end",
    "on_train_end",
    "on_fit_end",
    "on_exception",
)
# The step hooks of the callbacks a fused stack runs for all its jobs at once (`FusedStack`).
MEASURED_BY_FUSED_STACK: dict[type[pl.Callback], tuple[str, ...]] = {
    GradientFlow: ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end"),
    StopOnDivergence: ("on_before_backward", "on_before_optimizer_step"),
    Sharpness: ("on_train_batch_start",),
}
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


class FusedBatches(StackedBatches):
    """The jobs' batches of a step as one `(x, y)`, x `(K, B, ...)`: each job's own indices,
    from its own order, gathered at once from the training split they share. Jobs that will
    draw the same orders (their generators in the same state: the same data seed, a sweep over
    anything else) share one gathered batch, expanded over the jobs (a view, not K copies);
    each job's generator still draws its own, as it would alone."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.streams[0].x, self.streams[0].y
        alike = draw_alike(self.streams)  # decided before this pass draws, with no device sync
        orders = [stream.batch_indices() for stream in self.streams]
        if alike:
            for other in orders[1:]:  # its generator draws this pass's order, as alone
                next(other, None)
            for batch in orders[0]:
                shared = x.index_select(0, batch), y.index_select(0, batch)
                yield tuple(part.expand(len(self.streams), *part.shape) for part in shared)
            return
        for indices in zip(*orders, strict=True):
            batch = torch.stack(indices)
            rows = batch.flatten()  # gathered as `TensorBatches` gathers them
            yield tuple(part.index_select(0, rows).unflatten(0, batch.shape) for part in (x, y))


def draw_alike(streams: list[TensorBatches]) -> bool:
    """Whether `streams`' next passes draw the same batches: the same batch size and share
    (rank of world size), and generators in one state (or none: the stored order)."""

    def draws(stream: TensorBatches) -> tuple:
        state = stream.generator and stream.generator.get_state().numpy().tobytes()
        return stream.batch_size, stream.rank, stream.world_size, state

    return len({draws(stream) for stream in streams}) == 1


class StackedData(pl.LightningDataModule):
    """The jobs' data modules as one: training yields a batch per job; validation and testing
    use the first job's splits, which are every job's (the split has its own fixed seed)."""

    def __init__(self, jobs: list[MNISTDataModule], fused: bool = False) -> None:
        super().__init__()
        self.jobs = jobs
        self.fused = fused

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
        batches = FusedBatches if self.fused else StackedBatches
        return batches([job.train_dataloader() for job in self.jobs])

    def val_dataloader(self) -> TensorBatches:
        return self.jobs[0].val_dataloader()

    def test_dataloader(self) -> TensorBatches:
        return self.jobs[0].test_dataloader()


def group_share(optimizer: torch.optim.Optimizer, job: int) -> torch.optim.Optimizer:
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

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._stack.job_optimizer(self._job)]

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
        # Each job's checkpoint that the stack trains on from (`fit_and_test_stack`), if any:
        # its optimizer's and scheduler's state go in where the stack makes its own.
        self.resuming: list[dict[str, Any]] = []

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
            if callbacks := self.hooked[hook][i]:
                job_args = args(i)
                for callback in callbacks:
                    getattr(callback, hook)(self.views[i], job, *job_args)

    def drives(self, callback: pl.Callback, hook: str) -> bool:
        """Whether `each` calls `callback`'s `hook` (a fused stack measures some itself)."""
        return True

    def setup(self, stage: str) -> None:
        if not hasattr(self, "views"):  # once: testing after fitting keeps who stopped
            refuse_undriven_hooks(self.job_callbacks)
            self.hooked = {
                hook: [
                    [c for c in callbacks if implements(c, hook) and self.drives(c, hook)]
                    for callbacks in self.job_callbacks
                ]
                for hook in DRIVEN_HOOKS
            }
            self.views = [JobView(self, i) for i in range(len(self.jobs))]
            self.shares: dict[int, torch.optim.Optimizer] = {}
            self.running = self.active()
            self.stopped: list[tuple[int, Classifier]] = []  # in this epoch
        self.each("setup", lambda i: (stage,))

    def on_exception(self, exception: BaseException) -> None:
        """Each job's callbacks see the exception (a checkpoint saved on exception)."""
        self.each("on_exception", lambda i: (exception,), jobs=list(enumerate(self.jobs)))

    def on_fit_start(self) -> None:
        self.each("on_fit_start")

    def on_train_start(self) -> None:
        self.each("on_train_start")

    def on_train_epoch_start(self) -> None:
        self.each("on_train_epoch_start")

    def on_train_batch_start(self, batches: JobBatches, batch_idx: int) -> None:
        own = self.job_batches(batches)
        self.each("on_train_batch_start", lambda i: (own[i], batch_idx))

    def job_batches(self, batches: JobBatches) -> list[tuple[Tensor, Tensor]]:
        """Each job's batch of this step, by job."""
        return batches

    def training_step(self, batches: JobBatches, batch_idx: int) -> Tensor:
        """The running jobs' losses, summed; on Lightning's logging steps each job's loss and
        accuracy go to its loggers (`log_train`)."""
        self.losses = [None] * len(self.jobs)
        logged = {}
        for i, job in self.running:
            x, y = batches[i]
            outputs = job(x)
            self.losses[i] = mean_loss(job.loss_fn, outputs, y)
            if logs_this_step(self):
                logged[i] = torch.stack([self.losses[i].detach(), accuracy(outputs, y)])
        if logged:
            self.log_train(list(logged), torch.stack(list(logged.values())))
        return torch.stack([loss for loss in self.losses if loss is not None]).sum()

    def log_train(self, jobs: Iterable[int], rows: Tensor) -> None:
        """Job `jobs[r]`'s training loss and accuracy, `rows[r]`, to its loggers, as
        Lightning writes a single run's on-step values (at the step of the batch, with the
        epoch), through one copy to the host for the stack: Lightning's `log` takes one value at
        a time, and its per-value work (a copy, a reduction, a conversion) grew with the jobs."""
        running = {i for i, _ in self.running}
        for i, row in zip(jobs, rows.tolist(), strict=True):
            if i not in running:
                continue
            metrics = {
                **dict(zip(stage_names("train"), row, strict=True)),
                "epoch": self.current_epoch,
            }
            write_scalars(self.job_loggers[i], metrics, self.global_step)

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
        their metrics and logs each job's once an epoch (`log_evaluation`): a `self.log` per job,
        metric and batch would cost more than the forward passes.
        The sums are Lightning's own mean, in its order and precision (`value * batch_size`
        summed in float32, divided by the image count), so each job logs what it logs alone.
        Testing also gathers each job's `Predictions`: the test-split evidence a single run
        takes from a forward pass of its own."""
        values = self.job_evaluation(batch, stage)
        self.sums = self.sums + values * len(batch[1])
        self.images = self.images + len(batch[1])

    def job_evaluation(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        """Every job's metrics on `batch`, (K, metrics), named in `self.names`; in testing, each
        job's predictions gathered."""
        metrics = []
        for i, job in enumerate(self.jobs):
            job_metrics, outputs = job.evaluation(batch, stage)
            metrics.append(job_metrics)
            if stage == "test":
                self.predictions[i].update(outputs)
        self.names = list(metrics[0])
        return torch.stack([torch.stack(list(m.values())) for m in metrics])

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
        own = self.job_batches(batches)
        self.each("on_train_batch_end", lambda i: (outputs, own[i], batch_idx))
        for i, job in self.running:
            if self.views[i].should_stop:
                self.views[i].global_step = self.trainer.global_step  # where it ended
                self.stopped.append((i, job))
                self.leave(i)
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
        return {
            "epoch": view.current_epoch,
            "global_step": view.global_step,
            "pytorch-lightning_version": pl.__version__,
            "state_dict": {
                k: v.clone(memory_format=torch.contiguous_format)
                for k, v in job.state_dict().items()
            },
            "loops": {
                name: getattr(trainer, name).state_dict()
                for name in ("fit_loop", "validate_loop", "test_loop", "predict_loop")
            },
            "callbacks": {
                callback.state_key: state
                for callback in view.callbacks
                if (state := callback.state_dict())
            },
            "optimizer_states": [self.job_optimizer_state(i)],
            "lr_schedulers": [
                self.job_scheduler_state(config.scheduler.state_dict(), i)
                for config in trainer.lr_scheduler_configs
            ],
            # A Classifier's hyperparameters are saved from a dict, which Lightning names None.
            job.CHECKPOINT_HYPER_PARAMS_NAME: None,
            job.CHECKPOINT_HYPER_PARAMS_KEY: dict(job.hparams),
            type(self.trainer.datamodule.jobs[i]).__qualname__: (
                self.trainer.datamodule.jobs[i].state_dict()
            ),
        }

    def leave(self, i: int) -> None:
        """Job `i` stopped: its parameter group gets no gradient from the next step on (its
        loss leaves the sum), so the optimizer leaves it as it is."""

    def job_optimizer(self, i: int) -> torch.optim.Optimizer:
        """Job `i`'s optimizer alone (`optimizer_alone`), one object for its view's life
        (`JobView`: Lightning's monitor tells a scheduler's optimizer by identity)."""
        if i not in self.shares:
            self.shares[i] = self.optimizer_alone(i)
        return self.shares[i]

    def optimizer_alone(self, i: int) -> torch.optim.Optimizer:
        """Job `i`'s share of the optimizer: its parameter group, the same dict (a scheduler's
        changes show)."""
        return group_share(self.trainer.optimizers[0], i)

    def job_optimizer_state(self, i: int) -> dict[str, Any]:
        """Job `i`'s optimizer state in the layout of its optimizer alone."""
        return group_share(self.trainer.optimizers[0], i).state_dict()

    def job_scheduler_state(self, state: dict[str, Any], i: int) -> dict[str, Any]:
        """Job `i`'s entries of a scheduler's state: of each per-group list, its group's."""
        jobs = len(self.jobs)  # a parameter group each
        return {
            key: [value[i]] if isinstance(value, list) and len(value) == jobs else value
            for key, value in state.items()
        }

    def with_job_scheduler_state(
        self, state: dict[str, Any], i: int, own: dict[str, Any]
    ) -> dict[str, Any]:
        """A scheduler's `state` with job `i`'s entries from `own`, its state alone (the
        inverse of `job_scheduler_state`)."""
        jobs = len(self.jobs)
        return {
            key: [*value[:i], *own[key], *value[i + 1 :]]
            if isinstance(value, list) and len(value) == jobs
            else own[key]
            for key, value in state.items()
        }

    def load_job_optimizer_state(
        self, optimizer: torch.optim.Optimizer, i: int, own: dict[str, Any]
    ) -> None:
        """Job `i`'s optimizer state alone (`own`, a single run's) into its parameter group:
        read by its optimizer alone, which puts each tensor where its parameter is."""
        job = self.jobs[i]
        alone = job.make_optimizer(job.parameters())
        alone.load_state_dict(own)
        (group,) = alone.param_groups
        optimizer.param_groups[i].update({k: v for k, v in group.items() if k != "params"})
        for param in group["params"]:
            if param in alone.state:
                optimizer.state[param] = alone.state[param]

    def on_train_end(self) -> None:
        self.each("on_train_end")

    def on_fit_end(self) -> None:
        self.each("on_fit_end", jobs=list(enumerate(self.jobs)))

    def configure_optimizers(self) -> dict[str, Any]:
        """The stack's optimizer (`stack_optimizer`), and the scheduler every job has; on from
        checkpoints (`resuming`), each job's state alone put in, in the order Lightning restores
        a single run's: the optimizer's after the scheduler is made (which sets `initial_lr`),
        then the scheduler's."""
        optimizer = self.stack_optimizer()
        make_scheduler = self.jobs[0].make_scheduler
        schedule = make_scheduler and lr_scheduler(make_scheduler, optimizer, self.trainer)
        for i, checkpoint in enumerate(self.resuming):
            (own,) = checkpoint["optimizer_states"]
            self.load_job_optimizer_state(optimizer, i, own)
        if schedule is None:
            return {"optimizer": optimizer}
        if self.resuming:
            state = schedule["scheduler"].state_dict()
            for i, checkpoint in enumerate(self.resuming):
                (own,) = checkpoint["lr_schedulers"]
                state = self.with_job_scheduler_state(state, i, own)
            schedule["scheduler"].load_state_dict(state)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def stack_optimizer(self) -> torch.optim.Optimizer:
        """One optimizer, a parameter group per job with that job's hyperparameters."""
        factories = [job.make_optimizer for job in self.jobs]
        groups = [
            {"params": list(job.parameters()), **make.keywords}
            for job, make in zip(self.jobs, factories, strict=True)
        ]
        return factories[0].func(groups)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Each job's gradient clipped as it would be alone (`clip`), not over the stack."""
        if gradient_clip_val is not None:
            self.clip(gradient_clip_val, gradient_clip_algorithm)

    def clip(self, value: float, algorithm: str | None) -> None:
        """Clip each job's parameter group by its own norm (or elementwise, by value)."""
        for group in self.trainer.optimizers[0].param_groups:
            params = group["params"]
            if algorithm == "value":
                nn.utils.clip_grad_value_(params, value)
            else:
                nn.utils.clip_grad_norm_(params, value)


class FusedStack(StackedClassifier):
    """A stack whose jobs run as one batched model (`fused.FusedNetworks`): one forward,
    backward and update for the K jobs, whatever K is, by the batched optimizers
    (`batched_optim`: each job's own hyperparameters and state), each job's gradient clipped by
    its own norm, its GradientFlow and StopOnDivergence measured for every job at once
    (`MEASURED_BY_FUSED_STACK`: reductions over the job dimension, one host sync), one loss call
    per distinct loss. A job that stops leaves the optimizer's `active` jobs: its weights and
    state stay as they are, and its NaNs stay in its slice.

    Each job's network holds views of its slice of the stacked parameters and buffers
    (`share`): whatever reads a job's own module (its checkpoint, its other callbacks, its
    test-split evidence) reads its current weights, with no copy. The rules of `StackedClassifier`
    hold otherwise, but for one: the batched kernels round differently from a job's own (a
    batched matmul for its matmul), so a fused job matches its run alone to a tolerance, not
    bit for bit. Dropout draws each job's own masks (`FusedNetworks`).
    """

    def __init__(
        self,
        jobs: list[Classifier],
        callbacks: list[list[pl.Callback]] | None = None,
        loggers: list[list[Logger]] | None = None,
    ) -> None:
        super().__init__(jobs, callbacks, loggers)
        self.fused = FusedNetworks([job.net for job in jobs])
        self.share()
        self.loss_groups = losses_by_function([job.loss_fn for job in jobs])
        self.measuring: list[tuple[int, GradientFlow]] = []

    def share(self) -> None:
        """Point each job's parameters and buffers at its slice of the stacked ones; again
        after Lightning moves the model to its device, which moves each tensor on its own."""
        stacked = self.fused.state()
        for k, job in enumerate(self.jobs):
            for name, param in job.net.named_parameters():
                param.data = stacked[name].detach()[k]
            for name, _ in job.net.named_buffers():
                replace(job.net, name, stacked[name][k])

    def drives(self, callback: pl.Callback, hook: str) -> bool:
        measured = (h for kind, h in MEASURED_BY_FUSED_STACK.items() if isinstance(callback, kind))
        return hook not in {h for hooks in measured for h in hooks}

    def job_batches(self, batches: tuple[Tensor, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Views of each job's slice, two ops for the stack (indexing would take two a job)."""
        x, y = batches
        return list(zip(x.unbind(), y.unbind(), strict=True))

    def on_fit_start(self) -> None:
        self.share()
        callbacks = [(i, c) for i, cs in enumerate(self.job_callbacks) for c in cs]
        self.flows = [(i, c) for i, c in callbacks if isinstance(c, GradientFlow)]
        self.stops = {i: c for i, c in callbacks if isinstance(c, StopOnDivergence)}
        self.sharpness = [(i, c) for i, c in callbacks if isinstance(c, Sharpness)]
        settings = {c.settings for _, c in self.sharpness}
        if self.sharpness and (len(self.sharpness) != len(self.jobs) or len(settings) > 1):
            raise ConfigError(
                f"A fused stack measures its jobs' sharpness at once, so each of its "
                f"{len(self.jobs)} jobs needs one Sharpness callback, of the same settings; "
                f"the stack's are {[(i, c.settings) for i, c in self.sharpness]} (job, "
                f"(every_n_steps, batch_size, max_iterations, tolerance)). Fix: give the "
                f"stack's jobs the same callbacks config (the stacked launcher stacks only such "
                f"jobs)."
            )
        super().on_fit_start()
        self.running_mask = torch.ones(len(self.jobs), dtype=torch.bool, device=self.device)
        self.loss_groups = [(fn, jobs.to(self.device)) for fn, jobs in self.loss_groups]
        self.loss_order = torch.cat([jobs for _, jobs in self.loss_groups]).argsort()
        if self.flows:
            stacked = {probe.name: probe for probe in self.fused.stacked.probes()}
            self.flow_weights = [stacked[p.name].weight for p in self.flows[0][1].weighted]

    def on_train_batch_start(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        step = self.trainer.global_step
        if self.flows and self.flows[0][1].due(step):  # the jobs' flows share their settings
            self.measured_step = step
            self.measuring = [(i, f) for i, f in self.flows if not self.views[i].should_stop]
            for i, flow in self.measuring:
                flow.begin(self.views[i])
        # Each job's callback marks its step; they share their settings, so all or none is due.
        if self.sharpness and all([c.due(step) for _, c in self.sharpness]):
            self.measure_sharpness(batch)

    def measure_sharpness(self, batch: tuple[Tensor, Tensor]) -> None:
        """Every job's `Sharpness` at once, each on its fixed batch (kept at the first measured
        step, when every job runs, or restored with it) from its own start
        (`sharpness.top_eigenpairs` over the stacked parameters); the running jobs keep and
        log theirs."""
        measures = [c for _, c in self.sharpness]
        for measure, own in zip(measures, self.job_batches(batch), strict=True):
            measure.fix_batch(own)
        x = torch.stack([m.batch[0] for m in measures]).to(self.device)
        y = torch.stack([m.batch[1] for m in measures]).to(self.device)
        eigenvalues, vectors = top_eigenpairs(
            self.fused,
            lambda: self.outputs(x, y).losses,
            list(self.fused.parameters()),
            measures,
        )
        for i, _ in self.running:
            measures[i].eigenvector = vectors[i]
            measures[i].keep(self.views[i], self.jobs[i], eigenvalues[i])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Every job's loss on its own batch (x is (K, B, ...)); the running jobs' summed. On a
        measured step the probes' taps ride along (`FusedNetworks.taps`)."""
        x, y = batch
        taps = self.fused.taps(x) if self.measuring else None
        logits, activations, self.losses = self.outputs(x, y, taps)
        if self.measuring:
            self.taps, self.activations = taps, activations
        if logs_this_step(self):
            rows = torch.stack([self.losses.detach(), accuracy(logits, y)], dim=1)
            self.log_train(range(len(self.jobs)), rows)
        if len(self.running) == len(self.jobs):
            return self.losses.sum()
        return torch.where(self.running_mask, self.losses, 0).sum()

    def outputs(self, x: Tensor, y: Tensor, taps: dict[str, Tensor] | None = None) -> Outputs:
        """Every job's logits, and its activations with `taps`, from one forward; its loss (K,)
        on its batch from one call per distinct loss (`loss_groups`) over its jobs' samples
        (`losses.mean_loss`), put back in the jobs' order (`loss_order`)."""
        outputs = self.fused(x, taps)
        if len(self.loss_groups) == 1:
            ((fn, _),) = self.loss_groups
            return outputs._replace(losses=mean_loss(fn, outputs.logits, y))
        logits = outputs.logits
        losses = [mean_loss(fn, logits[jobs], y[jobs]) for fn, jobs in self.loss_groups]
        return outputs._replace(losses=torch.cat(losses)[self.loss_order])

    def job_evaluation(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        """Every job on the same batch, at once."""
        x, y = batch
        jobs = len(self.jobs)
        targets = y.expand(jobs, *y.shape)
        logits, _, losses = self.outputs(x.expand(jobs, *x.shape), targets)
        if stage == "test":
            for i, predictions in enumerate(self.predictions):
                predictions.update(logits[i])
        self.names = stage_names(stage)
        return torch.stack([losses, accuracy(logits, targets)], dim=1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The jobs' other callbacks; the measured step's gradients (before clipping, as alone);
        then each job whose loss or gradient is not finite stops, its update masked."""
        super().on_before_optimizer_step(optimizer)
        if self.measuring:
            lead = self.measuring[0][1]
            taps = [self.taps[p.name].grad for p in lead.probes]
            lead.gradients(self.flow_weights, [w.grad for w in self.flow_weights], taps)
            self.taps = {}
        if self.stops:
            self.stop_diverged(optimizer)

    def stop_diverged(self, optimizer: BatchedOptimizer) -> None:
        """`StopOnDivergence`'s test for every job at once: loss plus gradient norms finite."""
        norms = [norms_per_job(grad) for grad in applied_gradients(optimizer)]
        finite = torch.isfinite(torch.stack([self.losses.detach(), *norms]).sum(0)).tolist()
        for i, ok in enumerate(finite):
            if not ok and optimizer.active[i] and i in self.stops:
                self.stops[i].diverge(self.views[i])
                self.leave(i)

    def leave(self, i: int) -> None:
        """Job `i` stopped: the optimizer leaves its weights and state as they are (at once
        when it diverged, before this step's update)."""
        self.trainer.optimizers[0].active[i] = False
        self.running_mask[i] = False

    def on_train_batch_end(
        self, outputs: Any, batch: tuple[Tensor, Tensor], batch_idx: int
    ) -> None:
        if self.measuring and self.trainer.global_step != self.measured_step:  # step taken
            weights = [w.detach() for w in self.flow_weights]
            (lead_job, lead), grads = self.measuring[0], [w.grad for w in self.flow_weights]
            metrics = lead.measure(weights, self.activations)
            histograms = lead.histograms(self.views[lead_job], weights, grads, self.activations)
            for i, flow in self.measuring:
                flow.keep(self.views[i], metrics[i], histograms[i])
            self.measuring, self.activations = [], {}
        super().on_train_batch_end(outputs, batch, batch_idx)

    def stack_optimizer(self) -> BatchedOptimizer:
        """The batched optimizer of the jobs' class, each job with its own hyperparameters."""
        factories = [job.make_optimizer for job in self.jobs]
        batched = BATCHED_OPTIMIZERS[factories[0].func]
        return batched.for_jobs(self.fused.parameters(), [make.keywords for make in factories])

    def clip(self, value: float, algorithm: str | None) -> None:
        """Each job's gradient clipped by its own norm (by value: elementwise, the same)."""
        params = list(self.fused.parameters())
        if algorithm == "value":
            nn.utils.clip_grad_value_(params, value)
        else:
            clip_grad_norm_per_job_(params, value)

    def optimizer_alone(self, i: int) -> torch.optim.Optimizer:
        """Job `i`'s optimizer alone over views of its slices, with its hyperparameters as they
        are now (copies: `lr_scheduler_step` brings them up to date)."""
        return self.trainer.optimizers[0].job_optimizer(i)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """The step, then each job's optimizer alone takes its new values (what a learning-rate
        monitor reads through the job's scheduler)."""
        super().lr_scheduler_step(scheduler, metric)
        groups = scheduler.optimizer.param_groups
        for i, alone in self.shares.items():
            for own, group in zip(alone.param_groups, groups, strict=True):
                own.update(job_values(group, i))

    def job_optimizer_state(self, i: int) -> dict[str, Any]:
        return self.trainer.optimizers[0].job_state_dict(i)

    def job_scheduler_state(self, state: dict[str, Any], i: int) -> dict[str, Any]:
        """Job `i`'s value of every per-job array in a scheduler's state (`base_lrs`...)."""
        return job_value(state, i)

    def with_job_scheduler_state(
        self, state: dict[str, Any], i: int, own: dict[str, Any]
    ) -> dict[str, Any]:
        return with_job(state, i, own)

    def load_job_optimizer_state(
        self, optimizer: BatchedOptimizer, i: int, own: dict[str, Any]
    ) -> None:
        optimizer.load_job_state_dict(i, own)


def losses_by_function(loss_fns: list[Callable]) -> list[tuple[Callable, Tensor]]:
    """The jobs' loss functions, each with the indices of the jobs that use it (equal partials
    are one function)."""
    groups: dict[Any, tuple[Callable, list[int]]] = {}
    for i, fn in enumerate(loss_fns):
        key = (fn.func, repr(fn.args), repr(sorted(fn.keywords.items())))
        groups.setdefault(key, (fn, []))[1].append(i)
    return [(fn, torch.tensor(jobs)) for fn, jobs in groups.values()]


def stacked_module(
    jobs: list[Classifier],
    callbacks: list[list[pl.Callback]],
    loggers: list[list[Logger]],
    sample_shape: tuple[int, ...],
) -> tuple[StackedClassifier, str | None]:
    """The stack of `jobs` as a `FusedStack`; or, with the reason, as a per-job
    `StackedClassifier` when their optimizer has no batched version or refuses a job's
    settings, their networks do not fuse, or a network's forward or backward does not run
    under `vmap` (tried on two blank inputs of `sample_shape`, which lays the stacked
    parameters out as their gradients come: `FusedNetworks.lay_out_as_gradients`)."""
    optimizer = jobs[0].make_optimizer.func
    if optimizer not in BATCHED_OPTIMIZERS:
        reason = f"optimizer {optimizer.__qualname__} has no batched version"
        return StackedClassifier(jobs, callbacks, loggers), reason
    try:
        stack = FusedStack(jobs, callbacks, loggers)
        BATCHED_OPTIMIZERS[optimizer].for_jobs(
            [torch.empty(len(jobs), 1)], [job.make_optimizer.keywords for job in jobs]
        )
        stack.fused.lay_out_as_gradients(torch.zeros(len(jobs), 2, *sample_shape))
        stack.share()
    except Exception as err:  # any model that does not fuse trains job by job
        return StackedClassifier(jobs, callbacks, loggers), f"{type(err).__name__}: {err}"
    return stack, None


def fit_and_test_stack(
    cfgs: list[DictConfig],
    jobs: list[tuple[MNISTDataModule, Classifier]] | None = None,
    stack_callbacks: Sequence[pl.Callback] = (),
    resume_from: Sequence[Path] = (),
    resume_step: int | None = None,
) -> list[dict[str, Any]]:
    """Train and test the jobs of one stack (`stack_key` equal) as one; return each job's
    record as `train.fit_and_test` returns it for the job alone, with the stack's seconds
    shared out. `jobs`: the jobs built already (`train.build_seeded`).

    Each job gets its own evidence callbacks, checkpoints, learning-rate monitor and loggers
    from its config (`PER_JOB`); the stack's trainer takes the first job's other callbacks (the
    progress bar) and `stack_callbacks` (a timer, a profiler).

    A stack that was stopped (killed, requeued) trains on as one from `resume_from`, each job's
    own last checkpoint, all of one step, from which their loggers write on (`resume_step`):
    each job's weights, callbacks' state, data order, optimizer and scheduler state are its
    own, the loops' state is theirs (`stack_checkpoint`).
    """
    jobs = jobs or [build_seeded(cfg) for cfg in cfgs]
    checkpoints = [read_checkpoint(path) for path in resume_from]
    for i, checkpoint in enumerate(checkpoints):  # before the jobs are fused
        jobs[i][1].load_state_dict(checkpoint["state_dict"])
    job_callbacks, job_loggers, shared = [], [], []
    for cfg in cfgs:
        callbacks, loggers = instruments(cfg, resume_step)
        own = [c for c in callbacks if isinstance(c, PER_JOB)]
        # Checkpoints last, as Lightning orders a trainer's callbacks: they save the others' state.
        job_callbacks.append(sorted(own, key=lambda c: isinstance(c, ModelCheckpoint)))
        job_loggers.append(loggers)
        shared = shared or [c for c in callbacks if not isinstance(c, PER_JOB)]
    modules, datamodules = [m for _, m in jobs], [dm for dm, _ in jobs]
    stack, why = stacked_module(modules, job_callbacks, job_loggers, datamodules[0].sample_shape)
    if why:
        log.info("A stack of %d trains job by job, not fused: %s", len(jobs), why)
    data = StackedData(datamodules, fused=isinstance(stack, FusedStack))
    trainer = make_trainer(
        cfgs[0].trainer,
        callbacks=[*shared, *stack_callbacks, ExceptionsToJobs()],
        logger=JobLoggers(job_loggers),
        enable_checkpointing=False,  # the jobs have their own
    )
    for i, checkpoint in enumerate(checkpoints):  # as Lightning restores a trainer's callbacks
        states = checkpoint.get("callbacks", {})
        for callback in job_callbacks[i]:
            if callback.state_key in states:
                callback.load_state_dict(states[callback.state_key])
    stack.resuming = checkpoints
    if checkpoints:
        log.info(
            "%d jobs train on as one stack from their checkpoints of step %d",
            len(checkpoints),
            checkpoints[0]["global_step"],
        )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        ckpt_path = stack_checkpoint(stack, data, checkpoints, Path(directory))
        trainer.fit(stack, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    train_seconds = time.perf_counter() - start
    trained = [training_evidence(view, train_seconds / len(cfgs)) for view in stack.views]
    start = time.perf_counter()
    (tested,) = trainer.test(stack, datamodule=data, verbose=False)
    test_seconds = (time.perf_counter() - start) / len(cfgs)
    # A single run's evidence is the whole test split's, however few batches its test loop ran.
    whole_split = trainer.num_test_batches[0] == len(data.test_dataloader())
    records = []
    for i, (datamodule, module) in enumerate(jobs):
        if whole_split:
            evidence = stack.predictions[i].evidence()
        else:
            evidence = evidence_on_test_split(module, datamodule)
        testing = testing_evidence(own_metrics(tested, i), test_seconds, evidence)
        origin = {RESUMED_FROM: str(resume_from[i])} if resume_from else {}
        records.append(job_record(cfgs[i], trained[i], testing, origin))
        write_record(job_loggers[i], records[i], trainer.global_step)
    return records


def stack_checkpoint(
    stack: StackedClassifier,
    data: StackedData,
    checkpoints: list[dict[str, Any]],
    directory: Path,
) -> Path | None:
    """The checkpoint Lightning restores a stack from, its jobs' `checkpoints` (single runs'
    of one step) as one: the weights the jobs' modules hold (loaded from theirs), the loops'
    state (theirs are equal), each job's data order. The optimizer's and scheduler's state are
    left out: the stack puts each job's in when it makes them (`StackedClassifier.resuming`).
    None for a stack that starts afresh."""
    if not checkpoints:
        return None
    first = checkpoints[0]
    path = directory / "stack.ckpt"
    orders = [c[type(job).__qualname__] for c, job in zip(checkpoints, data.jobs, strict=True)]
    stacked = {
        key: first[key] for key in ("epoch", "global_step", "pytorch-lightning_version", "loops")
    }
    stacked |= {
        "state_dict": stack.state_dict(),
        "callbacks": {},  # the jobs' callbacks are restored from their own (fit_and_test_stack)
        "optimizer_states": [],
        "lr_schedulers": [],
        type(data).__qualname__: {"jobs": orders},
    }
    torch.save(stacked, path)
    return path


def implements(callback: pl.Callback, hook: str) -> bool:
    """Whether `callback`'s class overrides `pl.Callback`'s `hook` (which does nothing)."""
    return getattr(type(callback), hook) is not getattr(pl.Callback, hook)


def refuse_undriven_hooks(job_callbacks: list[list[pl.Callback]]) -> None:
    """A job's callback with a hook the stack does not call for it would be silently skipped:
    refuse it, before anything trains."""
    hooks = [name for name in vars(pl.Callback) if name.startswith("on_") or name == "teardown"]
    for callbacks in job_callbacks:
        for callback in callbacks:
            undriven = [h for h in hooks if h not in DRIVEN_HOOKS and implements(callback, h)]
            if undriven:
                raise ConfigError(
                    f"callback {type(callback).__qualname__} implements {', '.join(undriven)}, "
                    f"which a stack does not call for each job (it calls "
                    f"{', '.join(DRIVEN_HOOKS)}). Fix: move that work into one of those hooks, "
                    f"or train these jobs one by one (hydra/launcher=basic)."
                )


class ExceptionsToJobs(pl.Callback):
    """Hands an exception in a stack's loop to its jobs' callbacks (a module has no such hook)."""

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        pl_module.on_exception(exception)


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
    if job.stopped:
        return f"it stopped before its stack did, at its checkpoint {job.resume_from}"
    if not (cfg.get("train", True) and cfg.get("test", True)) or cfg.get("ckpt_path"):
        return "it does not both train and test from scratch"
    if cfg.optimizer._target_ not in STACKABLE_OPTIMIZERS:
        return f"optimizer {cfg.optimizer._target_} is not one a stack is tested with"
    return None


def stacks(jobs: list[Job], max_stack: int) -> list[list[int]]:
    """The jobs' indices grouped into stacks of at most `max_stack` (`stack_key` equal); a job
    that cannot stack (`why_alone`) is a stack of one. Jobs that train on from their
    checkpoints stack with those of the same step (a stopped stack's jobs) only."""
    groups: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        reason = why_alone(job)
        if reason:
            log.info("%s runs alone: %s", job.record_path.parent.name, reason)
        key = f"alone {i}" if reason else f"{stack_key(job.identity[JOB_CONFIG])} {job.resume_step}"
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
        resume_from = [job.resume_from for job in stacked if job.resume_from is not None]
        records = fit_and_test_stack(
            [job.cfg for job in stacked],
            list(ready.values()),
            resume_from=resume_from,
            resume_step=stacked[0].resume_step,
        )
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
