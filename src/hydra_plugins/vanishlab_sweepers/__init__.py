"""vanishlab's Hydra sweepers. Hydra finds sweeper plugins only under `hydra_plugins` and imports
every module there as it starts, so this one imports Optuna lazily, in `sweep`.

`BasicSweeper` (`hydra/sweeper=basic_once`, vanishlab's default: `conf/hydra/default.yaml`) is
Hydra's basic sweeper, whose every job is composed once: Hydra's composes each job's config to
check it, then its launcher composes it again to run it; a launcher that composes a whole batch
before it runs any of its jobs (`composes_batch_first`) checks the batch itself.

`OptunaSweeper` (`hydra/sweeper=optuna`, `conf/hydra/sweeper/optuna.yaml`) takes the config keys
and search-space syntax of Hydra's Optuna sweeper plugin (`hydra.sweeper.params`, sweep overrides
such as `'optimizer.lr=tag(log, interval(1e-4, 1.0))'` or `'model.depth=choice(1,2)'`,
`direction`, `n_trials`, `n_jobs`, `max_failure_rate`, `sampler`, `storage`, `study_name`) and
runs them on a current Optuna, through its ask-and-tell interface, with a study that outlives the
command: by default a SQLite file in the sweep directory. A re-run of the command into the same
`hydra.sweep.dir` runs only the trials the study still lacks, numbering its jobs on from the
study's trial numbers, and trains again, with their same parameters, the trials a kill left
running.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra._internal.core_plugins import basic_sweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"


class BasicSweeper(basic_sweeper.BasicSweeper):
    """Hydra's basic sweeper, less its check of a batch that the launcher checks itself: a
    launcher with `composes_batch_first` composes every job of a batch before it runs one, so a
    job whose config does not compose still stops the sweep before anything runs."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        if not getattr(self.launcher, "composes_batch_first", False):
            super().validate_batch_is_legal(batch)


class OptunaSweeper(Sweeper):
    """Hydra's Optuna sweeper, kept in a study that a re-run, or another command, carries on.

    The study ends with `n_trials` finished trials (completed or failed), whichever command ran
    them; a trial that was given up as stale and retried counts once, as its retry. Each batch
    of `n_jobs` trials is asked, launched together and told; job numbers are trial numbers.
    """

    def __init__(
        self,
        sampler: DictConfig,
        direction: str,
        storage: str | None,
        study_name: str,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        heartbeat_interval: int,
        params: DictConfig | None = None,
    ) -> None:
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ValueError(f"hydra.sweeper.max_failure_rate={max_failure_rate} is not in [0, 1]")
        self.sampler_config = sampler
        self.direction = direction
        self.storage_url = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.heartbeat_interval = heartbeat_interval
        self.params = params or {}

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        # Optuna marks the retry callback and the heartbeat experimental (since 2.8 and 2.9),
        # and warns that heartbeats are for `Study.optimize`: `heartbeats` records them here.
        # Warnings on every run that no user can act on.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)  # SQLite makes the file, not its directory
        search_space, fixed = search_space_of([*params_overrides(self.params), *arguments])
        study, storage = self.open_study(sweep_dir)
        trials = study.get_trials(deepcopy=False)
        log.info(
            "Study %r in %s: %d of %d trials finished",
            study.study_name,
            shown_url(self.storage_url),
            count_finished(trials),
            self.n_trials,
        )
        study.sampler = self.make_sampler(len(trials))

        while (missing := self.n_trials - count_finished(study.get_trials(deepcopy=False))) > 0:
            if storage is not None:  # a shared study: retry the trials dead commands left
                optuna.storages.fail_stale_trials(study)
            batch = [study.ask(search_space) for _ in range(min(self.n_jobs, missing))]
            for trial in batch:
                for key, value in fixed.items():  # shown beside the params in the dashboard
                    trial.set_user_attr(key, value)
            beating = nullcontext() if storage is None else heartbeats(storage, batch)
            with beating:
                returns = self.launch(batch, list(search_space), fixed)
            failed = self.tell(study, batch, returns)
            if failed / len(batch) > self.max_failure_rate:
                raise RuntimeError(
                    f"{failed} of {len(batch)} trials of a batch failed, more than "
                    f"hydra.sweeper.max_failure_rate={self.max_failure_rate}; the study is kept "
                    f"and a re-run goes on with it"
                )
        self.save_results(study, sweep_dir)

    def open_study(self, sweep_dir: Path) -> tuple[optuna.Study, Any]:
        """The study, created or loaded. A study kept in a SQLite file inside the sweep
        directory is this command's own (vanishlab locks the sweep directory for the sweep):
        a trial it holds RUNNING was left by a killed run, so it is failed and retried now.
        Any other storage may be shared by commands running elsewhere: there a trial is
        stale once its heartbeat stops (Optuna's heartbeat, `heartbeat_interval`), and the
        returned storage is that RDB storage, whose heartbeats `sweep` records."""
        import optuna
        from optuna.storages import RDBStorage
        from optuna.trial import TrialState

        storage = None
        if self.storage_url is not None and not is_inside(self.storage_url, sweep_dir):
            storage = RDBStorage(
                self.storage_url,
                heartbeat_interval=self.heartbeat_interval,
                heartbeat_stale_trial_callback=retry_stale_trial,
            )
        study = optuna.create_study(
            storage=storage or self.storage_url,
            study_name=self.study_name,
            direction=self.direction,
            load_if_exists=True,
        )
        if storage is None:
            for trial in study.get_trials(states=(TrialState.RUNNING,)):
                study.tell(trial.number, state=TrialState.FAIL)
                retry_stale_trial(study, trial)
        return study, storage

    def make_sampler(self, n_trials_before: int) -> optuna.samplers.BaseSampler:
        """`hydra.sweeper.sampler`, built. A seeded sampler in a study that holds trials already
        is seeded with seed + their number: with the seed alone it would draw the first run's
        parameters again, and vanishlab would take those jobs' old records for new trials."""
        seed = self.sampler_config.get("seed")
        if seed is not None and n_trials_before:
            return instantiate(self.sampler_config, seed=seed + n_trials_before)
        return instantiate(self.sampler_config)

    def launch(
        self, batch: list[optuna.Trial], keys: list[str], fixed: dict[str, str]
    ) -> list[JobReturn]:
        """Launch the batch's jobs, each numbered by its trial. Trials asked together have
        consecutive numbers but where another command asked between them (a shared study):
        each run of consecutive numbers is then launched on its own."""
        fixed_overrides = [f"{key}={value}" for key, value in fixed.items()]
        runs: list[list[optuna.Trial]] = []
        for trial in batch:
            if runs and trial.number == runs[-1][-1].number + 1:
                runs[-1].append(trial)
            else:
                runs.append([trial])
        returns = []
        for run in runs:
            overrides = [
                [*(f"{key}={override_value(t.params[key])}" for key in keys), *fixed_overrides]
                for t in run
            ]
            returns += self.launcher.launch(overrides, initial_job_idx=run[0].number)
        return returns

    def tell(
        self, study: optuna.Study, batch: list[optuna.Trial], returns: Sequence[JobReturn]
    ) -> int:
        """Tell Optuna each job's value; a job without one (it failed, or diverged before it was
        validated: vanishlab returns None) is a failed trial. Returns how many failed."""
        from optuna.trial import TrialState

        failed = 0
        for trial, job in zip(batch, returns, strict=True):
            value = job_value(job)
            # skip_if_finished: in a shared study another command may have failed it as stale.
            if value is None:
                log.warning(
                    "Trial %d failed (it returned no value); the search goes on", trial.number
                )
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                failed += 1
            else:
                study.tell(trial, value, skip_if_finished=True)
        return failed

    def save_results(self, study: optuna.Study, sweep_dir: Path) -> None:
        """`optimization_results.yaml`, as Hydra's Optuna sweeper writes it: the study's best."""
        from optuna.trial import TrialState

        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            log.error("No trial completed: no optimization_results.yaml")
            return
        best = study.best_trial
        log.info("Best parameters: %s", best.params)
        log.info("Best value: %s", best.value)
        results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")


def retry_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a trial that its command left running (killed, or its heartbeat stopped), failed
    now, to run again with its params: Optuna's retry, a WAITING copy that the next `ask`
    takes, and that names the stale one in its `retry_history`."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    log.info("Trial %d was left running by a command that stopped: retried", trial.number)
    RetryHeartbeatStaleTrialCallback()(study, trial)


def params_overrides(params: DictConfig | dict) -> list[str]:
    """`hydra.sweeper.params` as overrides (`optimizer.lr=tag(log, interval(1e-4, 1.0))`)."""
    return [f"{key}={value}" for key, value in params.items()]


def search_space_of(overrides: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """The overrides' sweeps as Optuna distributions, and their plain values (passed to every
    job as they are); a later override of a key replaces an earlier one, as on the command
    line, so the command line's overrides win over `hydra.sweeper.params`."""
    search_space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        search_space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            search_space[key] = distribution(override)
        else:
            fixed[key] = override.get_value_element_as_str()
    return search_space, fixed


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of a sweep override, as Hydra's Optuna sweeper maps them:
    `choice(...)` and `shuffle(range(...))` are categorical; `range(start, stop, step)` is
    stepped from start to stop, stop included; `interval(low, high)` is int where both ends are,
    else float, and log-scaled when tagged `log`."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(
            list(override.sweep_iterator(transformer=Transformer.encode))
        )
    if override.is_range_sweep():
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    raise ValueError(f"{override.input_line!r}: the Optuna sweeper cannot search this sweep")


def override_value(value: Any) -> str:
    """A parameter's value as an override's: None is `null` (Python's `None` would be a string)."""
    return "null" if value is None else str(value)


def job_value(job: JobReturn) -> float | None:
    """The job's finite float value, or None: it returned none, or raised."""
    try:
        value = float(job.return_value)  # return_value raises the job's exception, if it raised
    except Exception:
        return None
    return value if math.isfinite(value) else None


def count_finished(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
    """Finished trials (completed, failed, pruned), less those given up as stale and retried:
    a trial and its retry count once."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return sum(t.state.is_finished() and t.number not in retried for t in trials)


def is_inside(url: str, directory: Path) -> bool:
    """Whether `url` is a SQLite file inside `directory` (`sqlite:///` + a relative path is
    relative to the working directory, as Hydra's sweep directory is)."""
    return url.startswith(SQLITE) and Path(url[len(SQLITE) :]).resolve().is_relative_to(
        directory.resolve()
    )


def shown_url(url: str | None) -> str:
    """The storage URL with its password hidden, for the log; `memory` for none."""
    if url is None:
        return "memory"
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@contextmanager
def heartbeats(storage: Any, batch: list[optuna.Trial]) -> Iterator[None]:
    """Record the batch's heartbeats every `heartbeat_interval` while it runs, as
    `Study.optimize` does for its trials (ask-and-tell leaves that to its caller); a trial
    whose heartbeat stops for 2 intervals is failed and retried by the next command that asks."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial in batch:
                storage.record_heartbeat(trial._trial_id)  # Optuna's own trial id
            if stop.wait(storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
