"""A sweep's jobs, named by what varies and tabulated when it ends: the `Records` Hydra callback
and the `vanishlab.job_dir` resolver that names a job's directory.

A job's directory is named from the keys the sweep names itself (`vanishlab.varied`: its command
line's sweep overrides and its sweeper's params, saved as it starts), under short aliases,
sorted: `act=sigmoid,depth=16,init=xavier_normal`, so TensorBoard's run list, cut at about 30
characters, still shows what tells the runs apart; constant overrides stay in each job's
`.hydra/overrides.yaml`. A name is only a label: a job's identity is its config
(`results.job_id`), and a directory that holds a record of another config is kept and this job's
gets its id appended.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from vanishlab import ConfigError, exit_with
from vanishlab.hparams import write_hparams
from vanishlab.results import (
    FINISHED,
    JOB_ID,
    STATUS,
    Status,
    job_id,
    job_identity,
    read_record,
)
from vanishlab.storage import SweepLock, check_free_space
from vanishlab.varied import read_named_keys, save_named_keys

log = logging.getLogger(__name__)

# Short names for keys in job names; any other key is named by its last dotted part
# (`optimizer.lr` -> `lr`), or whole where two varied keys share that part.
ALIASES = {
    "model.activation": "act",
    "model.output_activation": "out_act",
    "model.residual_scale": "res_scale",
    "trainer.max_epochs": "epochs",
    "data.batch_size": "batch",
}


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key's name in a job name (rule: `ALIASES`)."""
    last = Counter(key.split(".")[-1] for key in keys)
    return {
        key: ALIASES.get(key) or (key.split(".")[-1] if last[key.split(".")[-1]] == 1 else key)
        for key in keys
    }


def job_name(overrides: list[str], varied: list[str] | None) -> str:
    """The job's `varied` overrides (all of them where the sweep named none) as
    `alias=value`, sorted by alias; `/` in a value (a path) would nest directories: `_`."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    values = {
        o.key_or_group: o.get_value_element_as_str()
        for o in parsed
        if not o.is_delete() and (varied is None or o.key_or_group in varied)
    }
    names = short_names(list(values))
    parts = sorted(f"{names[key]}={value.replace('/', '_')}" for key, value in values.items())
    return ",".join(parts) or "defaults"


def job_dir_name(sweep_dir: str, *, _root_: DictConfig) -> str:
    """A sweep job's directory (resolver `vanishlab.job_dir`): its `job_name`, unless that
    directory holds a job of another config, kept as it is; then `<name>~<job_id>`. A record
    that cannot be read is taken for the job's own (`train.prepare` sets it aside). The job's
    config is resolved for its id only where a record is there to compare it with."""
    name = job_name(list(_root_.hydra.overrides.task), read_named_keys(Path(sweep_dir)))
    stored = read_record(Path(sweep_dir) / name / "metrics.json")
    if not stored or stored.get(STATUS) == Status.UNREADABLE:
        return name
    try:
        own_id = job_id(job_identity(_root_))
    except Exception:  # the job itself reports the config that does not resolve
        return name
    return name if stored.get(JOB_ID) == own_id else f"{name}~{own_id[:8]}"


def config_subdir(*, _root_: DictConfig) -> str | None:
    """Where Hydra saves a job's composed config (resolver `vanishlab.config_subdir`):
    `.hydra`, or nowhere (null) for a job that finished before. A re-run skips that job, so
    its `.hydra/` files must stay those its record was made with, whatever this command says
    (`threads=1 tags=[rerun]`)."""
    record = read_record(Path(_root_.hydra.runtime.output_dir) / "metrics.json")
    return None if record.get(STATUS) in FINISHED else ".hydra"


def register_job_dir_resolver() -> None:
    """`${vanishlab.job_dir:<sweep dir>}` and `${vanishlab.config_subdir:}`
    (conf/hydra/default.yaml); every process that runs a job needs them before Hydra names
    the job's directory."""
    OmegaConf.register_new_resolver("vanishlab.job_dir", job_dir_name, replace=True)
    OmegaConf.register_new_resolver("vanishlab.config_subdir", config_subdir, replace=True)


class Records(Callback):
    """Hydra callback that keeps records true and shows them: a single run never writes into a
    directory that holds a run's record already; one command at a time sweeps into a directory
    (`storage.SweepLock`); no command starts on a full disk; a sweep saves the keys it names as
    it starts, and ends with its jobs counted by status (exit 1 if any did not finish: failed,
    or cancelled or timed out by a scheduler). A run's or a sweep's end writes the HParams table
    from the records (`hparams.write_hparams`).

    `on_run_start` and `on_multirun_start` run before Hydra writes anything into the run or
    sweep directory (`.hydra/`, the log), so a refused command changes nothing. A sweep job that
    raises is recorded and returns normally, so the sweep goes on; `on_multirun_end` restores
    the signal that something failed.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.run.dir)
        # Under DDP, Lightning starts the other ranks into the same directory: only rank 0 checks.
        previous = read_record(run_dir / "metrics.json")
        if rank_zero_only.rank == 0:
            check_or_exit(check_free_space, run_dir)
        if previous and rank_zero_only.rank == 0:
            exit_with(
                ConfigError(
                    f"hydra.run.dir={str(run_dir)!r} already holds a run (status "
                    f"{previous.get(STATUS)!r}); it is kept as it is and nothing was written. "
                    f"Fix: leave hydra.run.dir at its default (a new directory per run), pick a "
                    f"new one, or continue that run with ckpt_path={run_dir}/checkpoints/last.ckpt "
                    f"(it trains on into a new directory)."
                )
            )

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.run.dir)
        record = read_record(run_dir / "metrics.json")
        if rank_zero_only.rank == 0 and record:
            write_hparams(run_dir, {run_dir: record})

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        check_or_exit(check_free_space, sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self.lock = SweepLock(sweep_dir)
        check_or_exit(self.lock.acquire)
        save_named_keys(sweep_dir, config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        self.lock.release()
        records = {p.parent: read_record(p) for p in sorted(sweep_dir.glob("*/metrics.json"))}
        write_hparams(sweep_dir, records)
        counts = Counter(record.get(STATUS, "unknown") for record in records.values())
        log.info("Sweep %s: %s", sweep_dir, ", ".join(f"{n} {s}" for s, n in counts.items()))
        unfinished = [
            job.name for job, record in records.items() if record.get(STATUS) not in FINISHED
        ]
        if unfinished:
            log.error(
                "%d job(s) did not finish (failed, or ended by the scheduler; see their "
                "metrics.json): %s",
                len(unfinished),
                unfinished,
            )
            raise SystemExit(1)


def check_or_exit(check: Callable[..., None], *args: Any) -> None:
    """Run `check(*args)`; a `ConfigError` ends the command with its paragraph."""
    try:
        check(*args)
    except ConfigError as err:
        exit_with(err)
