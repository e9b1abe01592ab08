"""Optuna searches as users run them (`hparams_search=optuna_lr`, vanishlab's sweeper): trials,
failed trials, and a study that outlives its command (a killed search, re-run)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from conftest import FAST, kill_cli_when, records, run_cli, sweep
from vanishlab.hparams import FILE_SUFFIX
from vanishlab.results import STATUS, read_record

pytestmark = pytest.mark.slow  # every test here runs the command line


def job_statuses(sweep_dir: Path) -> dict[Path, str]:
    """Each job's status; read while the search runs (a record is written atomically)."""
    return {p.parent: read_record(p).get(STATUS) for p in sweep_dir.glob("*/metrics.json")}


def study_trials(sweep_dir: Path) -> list[FrozenTrial]:
    """The trials of the study the search keeps in its sweep directory."""
    return shared_trials(f"sqlite:///{sweep_dir}/optuna.db", "vanishlab")


def shared_trials(storage: str, study_name: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name=study_name, storage=storage).trials


def training_events(job_dir: Path) -> list[tuple[str, int, int]]:
    """The job's TensorBoard event files as its training wrote them (name, size, mtime); the
    HParams row (`FILE_SUFFIX`) is rewritten from the records at each sweep's end."""
    return sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in job_dir.glob("events.*")
        if not p.name.endswith(FILE_SUFFIX)
    )


def test_optuna_search_runs_trials_and_reports_the_best(tiny_data, tmp_path) -> None:
    result = sweep(tmp_path, tiny_data, "hparams_search=optuna_lr", "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.stderr[-2000:]
    by_name = records(tmp_path)
    assert len(by_name) == 2 and all(r[STATUS] == "completed" for r in by_name.values())
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert "optimizer.lr" in best and "best_value" in best


def test_optuna_search_goes_on_past_a_failed_trial(tiny_data, tmp_path) -> None:
    # No -m: the preset is a sweep by itself, as the template's presets are.
    result = run_cli(
        "vanishlab.train",
        *FAST,
        "hparams_search=optuna_lr",
        "model.depth=choice(0,1)",
        "hydra.sweeper.n_trials=6",
        f"hydra.sweep.dir={tmp_path}",
        data_dir=tiny_data,
    )
    assert result.returncode == 1, result.stderr[-3000:]  # the exit code says a trial failed
    statuses = sorted(r[STATUS] for r in records(tmp_path).values())
    assert len(statuses) == 6 and "failed" in statuses and "completed" in statuses, statuses
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert "model.depth: 1" in best and "best_value" in best


# An unseeded search (seed=null: its sampler too), so that only the study can tell a re-run
# which trials were run (Hydra's plugin kept its study in memory and started over), over learning
# rates that do not diverge (the command line's search space replaces the preset's).
UNSEEDED = [
    *FAST,
    "hparams_search=optuna_lr",
    "seed=null",
    "optimizer.lr=tag(log,interval(1e-3,0.1))",
]


def test_killed_search_reruns_only_its_missing_trials(tiny_data, tmp_path) -> None:
    args = [*UNSEEDED, "trainer.max_epochs=3", "hydra.sweeper.n_trials=6"]
    args.append(f"hydra.sweep.dir={tmp_path}")

    def two_completed_and_one_training() -> bool:
        now = list(job_statuses(tmp_path).values())
        return now.count("completed") >= 2 and "started" in now

    kill_cli_when(two_completed_and_one_training, "vanishlab.train", *args, data_dir=tiny_data)
    at_kill = job_statuses(tmp_path)
    (interrupted,) = [job_dir for job_dir, status in at_kill.items() if status == "started"]
    done = {
        job_dir: ((job_dir / "metrics.json").stat().st_mtime_ns, training_events(job_dir))
        for job_dir, status in at_kill.items()
        if status == "completed"
    }
    done_records = {job_dir: (job_dir / "metrics.json").read_text() for job_dir in done}
    (running,) = [t for t in study_trials(tmp_path) if t.state == TrialState.RUNNING]

    result = run_cli("vanishlab.train", *args, data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = study_trials(tmp_path)
    # 6 trials in all, one of them the killed one run again: it and its retry count once.
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 6 and len(trials) == 7
    (stale,) = [t for t in trials if t.state == TrialState.FAIL]
    assert stale.number == running.number
    (retry,) = [t for t in complete if t.system_attrs.get("failed_trial") == stale.number]
    assert retry.params == stale.params and retry.number > stale.number
    # Six jobs, all completed; the killed one trained again in its own directory.
    assert len(job_statuses(tmp_path)) == 6 and set(job_statuses(tmp_path).values()) == {
        "completed"
    }
    # The finished jobs were not trained again: the same record, the same event files.
    for job_dir, (mtime, events) in done.items():
        assert (job_dir / "metrics.json").read_text() == done_records[job_dir]
        assert (job_dir / "metrics.json").stat().st_mtime_ns == mtime
        assert training_events(job_dir) == events
    # Job numbers are trial numbers: the re-run's continue the killed run's.
    for trial in complete:
        (job_dir,) = [
            job_dir
            for job_dir in job_statuses(tmp_path)
            if f"optimizer.lr={trial.params['optimizer.lr']}"
            in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
        ]
        assert OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra.job.num == trial.number
        assert (job_dir == interrupted) == (trial is retry)
    log = result.stdout + result.stderr
    assert f"#{retry.number} :" in log and "#0 :" not in log


def test_finished_search_rerun_runs_nothing(tiny_data, tmp_path) -> None:
    args = [*UNSEEDED, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path}"]
    first = run_cli("vanishlab.train", *args, data_dir=tiny_data)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: (p.read_text(), p.stat().st_mtime_ns) for p in tmp_path.glob("*/metrics.json")}

    again = run_cli("vanishlab.train", *args, data_dir=tiny_data)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {p: (p.read_text(), p.stat().st_mtime_ns) for p in tmp_path.glob("*/metrics.json")}
    assert len(before) == 3 and after == before
    assert len(study_trials(tmp_path)) == 3
    log = again.stdout + again.stderr
    assert "3 of 3 trials finished" in log and "Launching" not in log


def test_commands_share_a_study_and_retry_a_stopped_ones_trial(tiny_data, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path}/shared.db"  # outside both sweep directories: shared
    args = [
        *UNSEEDED,
        "trainer.max_epochs=3",
        "hydra.sweeper.n_trials=4",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=shared",
        "hydra.sweeper.heartbeat_interval=1",  # stale after 2 s without a heartbeat
    ]
    first, second = tmp_path / "first", tmp_path / "second"

    def one_completed_and_one_training() -> bool:
        now = list(job_statuses(first).values())
        return now.count("completed") >= 1 and "started" in now

    first_args = [*args, f"hydra.sweep.dir={first}"]
    kill_cli_when(
        one_completed_and_one_training, "vanishlab.train", *first_args, data_dir=tiny_data
    )
    ran_first = [t for t in shared_trials(storage, "shared") if t.state == TrialState.COMPLETE]
    (stopped,) = [t for t in shared_trials(storage, "shared") if t.state == TrialState.RUNNING]

    result = run_cli("vanishlab.train", *args, f"hydra.sweep.dir={second}", data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = shared_trials(storage, "shared")
    # The second command ran what the study lacked: the stopped trial again, and the rest.
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 4
    (stale,) = [t for t in trials if t.state == TrialState.FAIL]
    assert stale.number == stopped.number
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == stale.number]
    assert retry.state == TrialState.COMPLETE and retry.params == stale.params
    ran_second = 4 - len(ran_first)
    assert len(job_statuses(second)) == ran_second
    assert set(job_statuses(second).values()) == {"completed"}
    assert any(f"lr={retry.params['optimizer.lr']}" == d.name for d in job_statuses(second))
