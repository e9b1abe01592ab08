"""Sweeps as users run them: launchers, failing jobs, kill-and-resume and DDP (Optuna's:
tests/test_optuna.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, REPO_ROOT, compose_config, kill_cli_when, records, run_cli, sweep
from vanishlab.hparams import FILE_SUFFIX
from vanishlab.results import (
    EPOCHS,
    ERROR,
    JOB_CONFIG,
    JOB_ID,
    RESUMED_FROM,
    START,
    STATUS,
    STEPS,
    TEST_LOSS,
    VERDICT,
    WORLD_SIZE,
)
from vanishlab.stack import STACKED_WITH
from vanishlab.train import fit_and_test

pytestmark = pytest.mark.slow  # every test here runs the command line


def job(records_by_name: dict[str, dict], *overrides: str) -> dict:
    """The one job whose directory name has all of `overrides`."""
    (name,) = [n for n in records_by_name if all(o in n.split(",") for o in overrides)]
    return records_by_name[name]


LAUNCHERS = ["hydra/launcher=basic", "hydra/launcher=stacked"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_failing_job_is_recorded_and_the_sweep_goes_on(tiny_data, tmp_path, launcher) -> None:
    result = sweep(tmp_path, tiny_data, "trainer.accelerator=tpu,cpu", "seed=0,1", launcher)
    assert result.returncode == 1, result.stderr[-2000:]  # the exit code says a job failed
    by_name = records(tmp_path)
    assert len(by_name) == 4  # the jobs after the failing ones still ran
    for name, record in by_name.items():
        if "accelerator=tpu" in name:
            assert record[STATUS] == "failed"
            assert (
                record[ERROR].startswith("InstantiationException") and "torch_xla" in record[ERROR]
            )
        else:
            assert record[STATUS] == "completed"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_bad_value_in_one_job_fails_only_that_job(tiny_data, tmp_path, launcher) -> None:
    # With the stacked launcher the four jobs make one stack (they differ in init keys and
    # seed): the two with a bad std fail as they are built, the other two train as a stack.
    result = sweep(tmp_path, tiny_data, "init=normal", "init.std=-1,0.05", "seed=0,1", launcher)
    assert result.returncode == 1
    by_name = records(tmp_path)
    for seed in ("seed=0", "seed=1"):
        assert job(by_name, "std=-1", seed)[ERROR].startswith("ConfigError: init.std=-1")
        assert job(by_name, "std=0.05", seed)[STATUS] == "completed"
    if launcher.endswith("stacked"):  # each lists the other's job_id, exactly
        first, second = (job(by_name, "std=0.05", seed) for seed in ("seed=0", "seed=1"))
        assert first[STACKED_WITH] == [second[JOB_ID]] and second[STACKED_WITH] == [first[JOB_ID]]


def training_events(job_dir: Path) -> list[str]:
    return sorted(p.name for p in job_dir.glob("events.*") if not p.name.endswith(FILE_SUFFIX))


def test_killed_sweep_resumes_without_retraining_finished_jobs(tiny_data, tmp_path) -> None:
    """Jobs one by one (a killed stack: tests/test_stack.py)."""
    sweep_args = ["seed=0,1,2", "trainer.max_epochs=6", "hydra/launcher=basic"]
    args = ["-m", *FAST, *sweep_args, f"hydra.sweep.dir={tmp_path}"]

    def second_job_checkpointed() -> bool:  # kill in the middle of the second job
        return any(tmp_path.glob("*seed=1*/checkpoints/last.ckpt"))

    kill_cli_when(second_job_checkpointed, "vanishlab.train", *args, data_dir=tiny_data)
    first = next(tmp_path.glob("*seed=0*"))
    first_metrics = (first / "metrics.json").read_text()
    first_events = training_events(first)
    interrupted = json.loads(next(tmp_path.glob("*seed=1*/metrics.json")).read_text())
    assert interrupted[STATUS] == "started" and interrupted[JOB_CONFIG]["seed"] == 1

    result = sweep(tmp_path, tiny_data, *sweep_args)
    assert result.returncode == 0, result.stderr[-2000:]
    by_name = records(tmp_path)
    assert len(by_name) == 3 and all(r[STATUS] == "completed" for r in by_name.values())
    assert all(r[EPOCHS] == 6 for r in by_name.values())
    # The finished job was skipped: same record, no new training events (the sweep's end
    # rewrites each job's HParams row, from the records).
    assert (first / "metrics.json").read_text() == first_metrics
    assert training_events(first) == first_events
    # The interrupted job went on from its checkpoint and kept its first-step evidence.
    resumed = job(by_name, "seed=1")
    assert resumed[RESUMED_FROM].endswith("last.ckpt")
    assert resumed[START] > 0
    assert "resumed_from" not in job(by_name, "seed=2")


def test_joblib_runs_jobs_in_parallel_processes_with_one_thread_each(tiny_data, tmp_path) -> None:
    result = sweep(
        tmp_path, tiny_data, "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(records(tmp_path)) == 2
    logs = [p.read_text() for p in tmp_path.glob("*/train.log")]
    assert all("torch threads: 1" in log for log in logs), logs


def test_submitit_local_launcher_runs_two_jobs(tiny_data, tmp_path) -> None:
    result = sweep(
        tmp_path,
        tiny_data,
        "seed=0,1",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    by_name = records(tmp_path)
    assert len(by_name) == 2 and all(r[STATUS] == "completed" for r in by_name.values())
    assert list(tmp_path.glob(".submitit/*/*_log.out"))


def ddp_run(run_dir: Path, data_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """A single run on 2 CPU processes (`trainer=ddp_sim`)."""
    args = [*FAST, "trainer=ddp_sim", *overrides, f"hydra.run.dir={run_dir}"]
    return run_cli("vanishlab.train", *args, data_dir=data_dir)


def test_ddp_trains_one_run_on_two_cpu_processes(tiny_data, tmp_path) -> None:
    run_dir = tmp_path / "run"
    result = ddp_run(run_dir, tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record[STATUS] == "completed" and record[WORLD_SIZE] == 2
    # data.batch_size is global: the two processes take the steps one process takes.
    single = fit_and_test(compose_config(FAST, tiny_data, tmp_path / "single"))
    assert record[STEPS] == single[STEPS] == 10
    for key in (TEST_LOSS, "val/loss", START):
        assert record[key] == pytest.approx(single[key], rel=1e-4), key
    assert record[VERDICT] == single[VERDICT]


def test_ddp_is_refused_where_it_would_not_run_once_per_job(tiny_data, tmp_path) -> None:
    result = sweep(tmp_path / "sweep", tiny_data, "trainer=ddp_sim", "seed=0,1")
    assert result.returncode == 1 and (result.stdout + result.stderr).count("Launching 2 jobs") == 1
    for record in records(tmp_path / "sweep").values():
        assert "is not allowed in a sweep" in record[ERROR]
    result = ddp_run(tmp_path / "spawn", tiny_data, "trainer.strategy=ddp_spawn")
    assert result.returncode == 2 and "trainer.strategy='ddp_spawn' is not allowed" in result.stderr


def test_a_batch_that_cannot_be_shared_out_is_refused(tiny_data, tmp_path) -> None:
    result = ddp_run(tmp_path, tiny_data, "data.batch_size=51")
    assert result.returncode == 2 and "data.batch_size=51 is not allowed" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_a_rerun_leaves_a_finished_jobs_hydra_files_as_they_were(tiny_data, tmp_path) -> None:
    """Re-running a finished sweep with settings that do not change a job's identity skips
    every job; their `.hydra/` files stay those their records were made with."""
    result = sweep(tmp_path, tiny_data, "seed=0,1")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = {p: p.read_text() for p in tmp_path.glob("*/.hydra/*.yaml")}
    assert len(saved) == 6
    result = sweep(tmp_path, tiny_data, "seed=0,1", "threads=1", "tags=[rerun]")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Skipping" in result.stdout + result.stderr
    assert {p: p.read_text() for p in tmp_path.glob("*/.hydra/*.yaml")} == saved


def test_each_stacked_jobs_log_holds_its_own_lines_and_its_stacks(tiny_data, tmp_path) -> None:
    """A job's train.log has no other job's launch line (`#1 : seed=1 ...`, which the launcher
    logs between jobs), and what its stack logged as it trained (each job's end); 4 jobs, so
    that on 2 CPUs or more they are prepared in forked workers."""
    result = sweep(tmp_path, tiny_data, "seed=0,1,2,3")
    assert result.returncode == 0, result.stderr[-2000:]
    for seed in range(4):
        lines = (tmp_path / f"seed={seed}" / "train.log").read_text().splitlines()
        launches = [line for line in lines if re.search(r"#\d+ : ", line)]
        assert all(f"seed={seed} " in line for line in launches), launches
        ends = [line for line in lines if "Evaluate it with" in line]
        assert any(f"seed={seed}/checkpoints" in line for line in ends), lines


def test_the_printed_eval_command_pastes_into_a_shell_as_it_is(tiny_data, tmp_path) -> None:
    """A sweep job's directory holds `=` and `,`; the command each run prints to evaluate its
    checkpoint is quoted for Hydra's parser and the shell, and runs as printed."""
    result = sweep(tmp_path, tiny_data, "model.depth=1,2")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = [
        line.split("Evaluate it with: ", 1)[1]
        for line in (result.stdout + result.stderr).splitlines()
        if "Evaluate it with: " in line
    ]
    assert len(printed) == 2 and all("depth=1" in c or "depth=2" in c for c in printed)
    evaluated = subprocess.run(
        f"{printed[0].replace('python', sys.executable, 1)} hydra.run.dir={tmp_path / 'eval'}",
        shell=True,
        cwd=REPO_ROOT,
        env={**os.environ, "DATA_DIR": str(tiny_data)},
        capture_output=True,
        text=True,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/acc"] > 0
