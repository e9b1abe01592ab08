"""vanishlab's Hydra launchers. Hydra finds launcher plugins only under `hydra_plugins`; this
module imports vanishlab lazily, so Hydra's plugin discovery stays fast for any application.

Both launchers run the task function Hydra hands them. A task that can train in stacks says so:
its function carries `prepare`, the import path of the step that takes a job's config to the
point where it would train and returns a `vanishlab.train.Job` (ready) or the job's value (done:
skipped or failed), as `vanishlab.train.main` does. Any other task (`vanishlab.eval`, a user's
script) runs its jobs one by one, as Hydra's basic launcher and submitit plugin run them.

`StackedLauncher` (`hydra/launcher=stacked`) trains a sweep's compatible jobs as stacks, one
Lightning loop each (`vanishlab.stack`); every job still gets its own directory, `.hydra/`
files, TensorBoard events and record, as Hydra's basic launcher would make them.

`SlurmLauncher` (`hydra/launcher=slurm`) is Hydra's submitit SLURM launcher, but:
- it submits one array task per stack (`StackedLauncher`'s stacks, of `max_stack` jobs at most;
  a task that does not train in stacks: one per job);
- a task that SLURM times out or preempts is requeued (`max_num_timeout` times at most): its jobs
  train on from their last checkpoints; a task whose jobs are done ignores that signal, which
  SLURM may send up to a minute early (`ignore_timeout_signal`);
- a task that SLURM ends for good (cancelled, out of memory, its node failed, out of requeues)
  has each of its unfinished jobs recorded as such in its `metrics.json`, and the sweep waits
  for its other tasks, summarises and exits 1, where the plugin's launcher raises at the first
  such job and leaves the others unwatched. A re-run trains such a job on from its last
  checkpoint, as it does an interrupted job.
"""

import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

Numbered = tuple[list[str], int]  # a job of the sweep: its overrides and its number (hydra.job.num)

# Below 2 jobs a worker, starting the worker costs about what it saves.
JOBS_PER_WORKER = 2
# Each worker is a fork of the launcher's process (torch and all): a few are enough to compose
# a sweep in the time its first stack takes to build, even on a login node of many CPUs.
MAX_WORKERS = 8


class StackedLauncher(BasicLauncher):
    """Runs a sweep's jobs in this process. A task that trains in stacks (its function has
    `prepare`) runs in passes: every job's config composed (once: `composes_batch_first`); each
    job through Hydra's `run_job` (its directory, `.hydra/` files, log and callbacks) up to the
    point where it would train (skipped, failed or ready); then the ready ones in stacks
    (`vanishlab.stack.stacks`). Each job's return value is its own. Any other task runs as
    under Hydra's basic launcher, whose code runs it.

    Each job's log file (`train.log`) gets its own lines and its stack's: between jobs the
    launcher logs as Hydra's own logging is set, and a stack logs into its jobs' files."""

    def __init__(self, max_stack: int = 16) -> None:
        super().__init__()
        self.max_stack = max_stack

    @property
    def composes_batch_first(self) -> bool:
        """Whether `launch` composes every job of a batch before it runs any (`prepare_jobs`),
        so that the sweeper need not compose them to check them (`vanishlab_sweepers`)."""
        return prepare_step(self.task_function) is not None

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        prepare = prepare_step(self.task_function)
        if prepare is None:
            return super().launch(job_overrides, initial_job_idx)
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("Launching %d jobs locally, in stacks", len(job_overrides))
        jobs = [(list(o), initial_job_idx + i) for i, o in enumerate(job_overrides)]
        returns = prepare_jobs(self.hydra_context, self.config, prepare, jobs)
        train_stacks(self.config, returns, stacked(returns, self.max_stack))
        return returns


def prepare_step(task_function: TaskFunction) -> Callable[[DictConfig], Any] | None:
    """The step that prepares a job of the task, if the task trains in stacks (it names one)."""
    path = getattr(task_function, "prepare", None)
    return get_method(path) if path else None


def composed(
    hydra_context: HydraContext, config: DictConfig, job: Numbered, job_id: str
) -> DictConfig:
    """A job's config, composed by Hydra's config loader and numbered as Hydra's basic launcher
    numbers it."""
    overrides, num = job
    sweep_config = hydra_context.config_loader.load_sweep_config(config, overrides)
    with open_dict(sweep_config.hydra.job):
        sweep_config.hydra.job.id, sweep_config.hydra.job.num = job_id, num
    return sweep_config


def usable_cpus() -> int:
    """The CPUs this process may run on; 1 where it cannot fork safely: Windows has no fork, and
    on macOS a forked child of a process that ran Apple's frameworks (torch does) may crash
    (Python spawns there by default), so only Linux composes and prepares jobs in workers."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def forked_workers(
    hydra_context: HydraContext,
    config: DictConfig,
    prepare: Callable[[DictConfig], Any] | None,
    jobs: int,
) -> ProcessPoolExecutor | contextlib.nullcontext[None]:
    """Forked worker processes for a batch of `jobs`: one per `JOBS_PER_WORKER` jobs, per CPU
    (`MAX_WORKERS` at most); none (`None`) below 2. They inherit `hydra_context`, `config` and
    `prepare` through fork, so only a job's overrides and id, or its config, go to them."""
    workers = min(usable_cpus(), jobs // JOBS_PER_WORKER, MAX_WORKERS)
    if workers < 2:
        return contextlib.nullcontext()
    # Frozen, this process's objects are left alone by a worker's garbage collector, which
    # would otherwise touch, and so copy, every page of memory the worker shares with it.
    # They stay frozen, as `vanishlab.train` leaves its imports: they live for the sweep.
    gc.freeze()
    fork = multiprocessing.get_context("fork")
    return ProcessPoolExecutor(
        workers, fork, initializer=inherit, initargs=(hydra_context, config, prepare)
    )


def in_order(
    pool: ProcessPoolExecutor | None,
    in_worker: Callable[..., Any],
    here: Callable[..., Any],
    items: list[tuple],
) -> list[Any]:
    """`here(*item)` for each item, in order, computed as `in_worker(*item)` in `pool`'s
    workers where there is a pool. From the first item whose result does not come back (it
    raised; its exception or result might not survive pickling; a worker died), the pool is
    shut down and the items are done here, one by one: one that raises raises here what it
    raises here."""
    done: list[Any] = []
    if pool is not None:
        try:
            futures = [pool.submit(in_worker, *item) for item in items]
            for future in futures:
                done.append(future.result())
        except Exception:  # no worker goes on with an item beside this process
            pool.shutdown(wait=True, cancel_futures=True)
    return done + [here(*item) for item in items[len(done) :]]


def composed_all(
    hydra_context: HydraContext,
    config: DictConfig,
    jobs: list[Numbered],
    job_id: Callable[[int], str] = str,
    pool: ProcessPoolExecutor | None = None,
) -> list[DictConfig]:
    """Every job's config (`composed`), in the jobs' order, in `pool`'s workers where there is
    one (`in_order`): a job that does not compose raises what composing it here raises."""
    numbered = [(job, job_id(job[1])) for job in jobs]

    def here(job: Numbered, name: str) -> DictConfig:
        return composed(hydra_context, config, job, name)

    return in_order(pool, composed_in_worker, here, numbered)


# In a worker of `forked_workers`: the launcher's context, config and prepare step, inherited
# through fork.
_inherited: tuple[HydraContext, DictConfig, Callable[[DictConfig], Any] | None] | None = None


def inherit(
    hydra_context: HydraContext, config: DictConfig, prepare: Callable[[DictConfig], Any] | None
) -> None:
    """A worker's start (`forked_workers`): keep what it composes and prepares jobs with."""
    global _inherited
    _inherited = hydra_context, config, prepare


def composed_in_worker(job: Numbered, job_id: str) -> DictConfig:
    """A job's config, composed in a worker of `forked_workers`."""
    assert _inherited is not None
    hydra_context, config, _ = _inherited
    return composed(hydra_context, config, job, job_id)


def prepared_in_worker(job: Numbered, sweep_config: DictConfig) -> JobReturn:
    """A job prepared (`prepared`) in a worker of `forked_workers`."""
    assert _inherited is not None
    hydra_context, config, prepare = _inherited
    assert prepare is not None
    return prepared(hydra_context, config, prepare, job, sweep_config)


def run_numbered(
    hydra_context: HydraContext,
    config: DictConfig,
    task_function: TaskFunction,
    job: Numbered,
    sweep_config: DictConfig,
) -> JobReturn:
    """One job of the sweep, its config composed (`composed`), through Hydra's `run_job`,
    logged as Hydra's basic launcher does it; then the launcher's own logging again."""
    overrides, num = job
    log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
    job_return = run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return job_return


def prepared(
    hydra_context: HydraContext,
    config: DictConfig,
    prepare: Callable[[DictConfig], Any],
    job: Numbered,
    sweep_config: DictConfig,
) -> JobReturn:
    """A job through Hydra's `run_job` up to its training (`prepare`); a job ready to train has
    its config resolved while Hydra's config is the job's own: the job trains later, when
    `${hydra:runtime.output_dir}` would read another's, maybe in another process."""
    from vanishlab import train

    def prepare_resolved(cfg: DictConfig) -> Any:
        job = prepare(cfg)
        if isinstance(job, train.Job):
            OmegaConf.resolve(job.cfg)
        return job

    return run_numbered(hydra_context, config, prepare_resolved, job, sweep_config)


def prepare_jobs(
    hydra_context: HydraContext,
    config: DictConfig,
    prepare: Callable[[DictConfig], Any],
    jobs: list[Numbered],
    job_id: Callable[[int], str] = str,
) -> list[JobReturn]:
    """Each job up to its training (`prepared`: skipped, failed or ready). Every job's config is
    composed before any job is prepared: one that does not compose stops the sweep before
    anything is written, as Hydra's sweepers check a batch (`composes_batch_first`). Composing
    and preparing are most of what a job costs beyond its training, and nothing else runs
    meanwhile: a batch large enough does both in forked worker processes, on the CPUs that
    would otherwise idle (`forked_workers`); each job's own lines go to its log file from
    there, as from here."""
    with forked_workers(hydra_context, config, prepare, len(jobs)) as pool:
        configs = composed_all(hydra_context, config, jobs, job_id, pool)

        def here(job: Numbered, sweep_config: DictConfig) -> JobReturn:
            return prepared(hydra_context, config, prepare, job, sweep_config)

        return in_order(pool, prepared_in_worker, here, list(zip(jobs, configs, strict=True)))


def stacked(returns: list[JobReturn], max_stack: int) -> list[list[int]]:
    """The prepared jobs that are ready to train (indices into `returns`), in stacks of at most
    `max_stack` (`vanishlab.stack.stacks`)."""
    from vanishlab import stack, train

    ready = [i for i, r in enumerate(returns) if isinstance(r._return_value, train.Job)]
    groups = stack.stacks([returns[i]._return_value for i in ready], max_stack)
    sizes = ", ".join(str(len(group)) for group in groups)
    stacks = f"{len(groups)} stack{'s' * (len(groups) != 1)}"
    log.info("%d jobs to train -> %s (%s)", len(ready), stacks, sizes or "none")
    return [[ready[i] for i in group] for group in groups]


def train_stacks(config: DictConfig, returns: list[JobReturn], groups: list[list[int]]) -> None:
    """Train each group of prepared jobs as one stack (`vanishlab.stack.run_stack`), logging
    into its jobs' log files (`log_files`); each job's return value becomes its own."""
    from vanishlab import stack

    for group in groups:
        files = [handler for i in group for handler in log_files(config, returns[i])]
        with logging_into(files):
            values = stack.run_stack([returns[i]._return_value for i in group])
        for i, value in zip(group, values, strict=True):
            returns[i].return_value = value


def log_files(config: DictConfig, job_return: JobReturn) -> list[logging.Handler]:
    """The log files of a prepared job, as Hydra's `run_job` opened them (the job's
    `hydra.job_logging`; a worker may have prepared it); then the launcher's own logging again,
    which closes them until they are written to."""
    hydra = job_return.hydra_cfg.hydra
    configure_log(hydra.job_logging, hydra.verbose)
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return files


@contextlib.contextmanager
def logging_into(handlers: list[logging.Handler]) -> Iterator[None]:
    """Log into `handlers` too, while the block runs (they reopen their files: Hydra's next
    `configure_log` closed them)."""
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()


@dataclass
class SlurmConf(SlurmQueueConf):
    """The plugin's SLURM keys, checked as the plugin checks them, and `max_stack`
    (`conf/hydra/launcher/slurm.yaml` sets the values)."""

    _target_: str = "hydra_plugins.vanishlab_launchers.SlurmLauncher"
    max_stack: int = MISSING


ConfigStore.instance().store(
    group="hydra/launcher", name="vanishlab_slurm", node=SlurmConf, provider="vanishlab"
)


def ignore_timeout_signal() -> None:
    """From here on this process ignores the signal SLURM sends a task before its time limit,
    for which submitit's handler would checkpoint and requeue it: the task's jobs are done.
    SLURM may send it up to a minute before `signal_delay_s` says (the resolution of its event
    handling), so it can reach a task that has finished while its interpreter exits; Python
    then restores the signal's default action, termination, to every signal it handles, and
    the task would end FAILED with its work done. A signal ignored stays ignored."""
    import submitit

    signal.signal(submitit.JobEnvironment._usr_sig(), signal.SIG_IGN)


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """One SLURM array task per stack (`max_stack` jobs at most), each running its jobs as
    `StackedLauncher` does; a task that does not train in stacks: one array task per job.

    A requeued task (`max_num_timeout`: the plugin's `checkpoint` resubmits it with the same
    jobs) prepares them again: a finished one is skipped, the others train on from their own
    last checkpoints."""

    def __init__(self, max_stack: int = 16, **params: Any) -> None:
        super().__init__(**params)
        self.max_stack = max_stack

    @property
    def composes_batch_first(self) -> bool:
        """As `StackedLauncher.composes_batch_first`: jobs are prepared here before any is
        submitted."""
        return prepare_step(self.task_function) is not None

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
        """Prepare the jobs here (a bad config fails before anything is submitted, a finished
        job is skipped), submit their stacks, then collect each task's results on its own; but
        never while an earlier command's tasks of this sweep are still in SLURM's queue."""
        from vanishlab import ConfigError, exit_with

        queued = self.still_queued()
        if queued:
            first = queued[0].split("_")[0]
            exit_with(
                ConfigError(
                    f"hydra.sweep.dir={str(self.config.hydra.sweep.dir)!r} still has SLURM "
                    f"tasks pending or running from an earlier command ({', '.join(queued)}); "
                    f"submitting its jobs again would train them twice. Fix: wait until they "
                    f"end (squeue --jobs={first}), or cancel them (scancel {first}), then run "
                    f"the same command again: it submits only the jobs that did not finish."
                )
            )
        setup_globals()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        jobs = [(list(o), initial_job_idx + i) for i, o in enumerate(job_overrides)]
        prepare = prepare_step(self.task_function)
        if prepare is None:
            returns: list[JobReturn | None] = [None] * len(jobs)
            groups = [[i] for i in range(len(jobs))]
        else:
            returns = prepare_jobs(self.hydra_context, self.config, prepare, jobs)
            groups = stacked(returns, self.max_stack)
        tasks = self.submit([[jobs[i] for i in group] for group in groups]) if groups else []
        for group, task in zip(groups, tasks, strict=True):
            try:
                done = task.results()[0]
            except Exception:  # submitit's UncompletedJobError: the task wrote no result
                done = [self.record_ended(jobs[i], task) for i in group]
            for i, job_return in zip(group, done, strict=True):
                returns[i] = job_return
        return returns

    def submit(self, tasks: list[list[Numbered]]) -> list:
        """An array of `tasks`, each a list of jobs, submitted as the plugin submits its jobs."""
        import submitit

        init_keys = ("submitit_folder", "max_num_timeout")
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=self.params["submitit_folder"],
            **{
                f"{self._EXECUTOR}_max_num_timeout": self.params[key]
                for key in init_keys[1:]
                if key in self.params
            },
        )
        queue_keys = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                key if key in queue_keys else f"{self._EXECUTOR}_{key}": value
                for key, value in self.params.items()
                if key not in init_keys
            }
        )
        log.info("Submitit '%s' sweep output dir : %s", self._EXECUTOR, self.config.hydra.sweep.dir)
        for task, jobs in enumerate(tasks):
            numbers = ", ".join(f"#{num}" for _, num in jobs)
            log.info("\tSLURM task %d : jobs %s", task, numbers)
        state = Singleton.get_state()
        return executor.map_array(self, tasks, [state] * len(tasks))

    def __call__(  # type: ignore[override]
        self, jobs: list[Numbered], singleton_state: dict[type, Singleton]
    ) -> list[JobReturn]:
        """On the node: the task's jobs, as `StackedLauncher` runs them (one stack, but for
        the jobs that no longer stack: finished, or training on from a checkpoint)."""
        import submitit

        Singleton.set_state(singleton_state)
        setup_globals()
        task_id = submitit.JobEnvironment().job_id
        prepare = prepare_step(self.task_function)
        if prepare is None:
            returns = [
                run_numbered(
                    self.hydra_context,
                    self.config,
                    self.task_function,
                    job,
                    composed(self.hydra_context, self.config, job, task_id),
                )
                for job in jobs
            ]
        else:
            returns = prepare_jobs(
                self.hydra_context, self.config, prepare, jobs, lambda _: task_id
            )
            train_stacks(self.config, returns, stacked(returns, len(jobs)))
        ignore_timeout_signal()
        return returns

    def still_queued(self) -> list[str]:
        """This sweep's SLURM tasks still pending or running: those an earlier command submitted
        (their ids are the names of the folders submitit made) that `squeue` still lists."""
        folder = Path(str(self.params["submitit_folder"])).parent
        jobs = [d.name.split("_")[0] for d in folder.glob("*") if d.is_dir()]
        ids = sorted({job for job in jobs if job.isdigit()})
        if not ids:
            return []
        listed = subprocess.run(
            ["squeue", "--noheader", "--array", "--format=%i", f"--jobs={','.join(ids)}"],
            capture_output=True,
            text=True,
        )
        return listed.stdout.split()

    def record_ended(self, job: Numbered, task: Any) -> JobReturn:
        """Write the record of a job whose task SLURM ended, where the job itself would have;
        its value: none, so that sweepers go on. A job that finished before its task ended (an
        earlier one of its stack) keeps its record and its value."""
        from vanishlab import results, train

        overrides, num = job
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config.hydra.job):
            config.hydra.job.num = num
        HydraConfig.instance().set_config(config)
        job_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        started = results.read_record(job_dir / "metrics.json")
        if started.get(results.STATUS) in results.FINISHED:
            value = train.optimized_value(config, started)
            return JobReturn(overrides, status=JobStatus.COMPLETED, _return_value=value)
        identity = results.job_identity(config)
        state = task.state
        job_dir.mkdir(parents=True, exist_ok=True)
        record = {
            **started,
            # "CANCELLED by 0" -> cancelled, TIMEOUT -> timeout, ...
            results.STATUS: state.split()[0].lower(),
            results.ERROR: f"SLURM ended the job ({state}); its log: {task.paths.stderr}",
            results.JOB_ID: results.job_id(identity),
            results.JOB_CONFIG: identity,
        }
        results.write_json(job_dir / "metrics.json", record)
        log.error("Job #%d ended by SLURM (%s); recorded in %s", num, state, job_dir)
        return JobReturn(overrides, status=JobStatus.COMPLETED, _return_value=None)
