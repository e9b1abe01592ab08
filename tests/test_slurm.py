"""Sweeps on a real SLURM cluster through `hydra/launcher=slurm`: jobs that complete, fail, are
cancelled, stack into one task, and are requeued when their task times out. `.ci/run` starts a
one-node cluster on localhost (`.ci/slurm.sh start`); on a machine without one, these tests are
skipped with the reason."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FAST, records, run_cli, start_cli
from vanishlab.results import (
    EPOCHS,
    ERROR,
    JOB_CONFIG,
    RESUMED_FROM,
    STATUS,
)
from vanishlab.stack import STACKED_WITH


def cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return states.returncode == 0 and any(s in states.stdout for s in ("idle", "mix"))


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not cluster_up(), reason="no SLURM cluster answers sinfo (.ci/slurm.sh start runs one)"
    ),
]
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=null",
    "hydra.launcher.timeout_min=10",
]


def command(sweep_dir: Path, *overrides: str) -> list[str]:
    return ["vanishlab.train", "-m", *SLURM, *FAST, *overrides, f"hydra.sweep.dir={sweep_dir}"]


def tasks(sweep_dir: Path) -> list[str]:
    """The SLURM tasks the sweep submitted, by the names of submitit's folders: `<job>` for one
    task, `<array>_<i>` for an array's (whose own folder, `<array>`, holds its submission)."""
    names = {p.name for p in sweep_dir.glob(".submitit/*") if p.is_dir()}
    return sorted(n for n in names if not any(m.startswith(f"{n}_") for m in names))


STILL_GOING = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "CONFIGURING", "SUSPENDED")


def ended_attempts(task: str, timeout_s: float = 60) -> list[str]:
    """The states of `task`'s attempts (sacct), once its last has ended, or as they are after
    `timeout_s`: the launcher returns when the job's result is written, and SLURM marks the task
    ended a moment later, once its process has exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = subprocess.run(
            ["sacct", "--duplicates", "--allocations", "--noheader", "--format=State", f"-j{task}"],
            capture_output=True,
            text=True,
        ).stdout.split()
        if (states and states[-1] not in STILL_GOING) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def test_two_jobs_complete_with_the_threads_they_were_given(tiny_data, tmp_path) -> None:
    result = run_cli(*command(tmp_path, "seed=0,1"), data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    by_name = records(tmp_path)
    assert sorted(r[STATUS] for r in by_name.values()) == ["completed", "completed"]
    logs = [p.read_text() for p in tmp_path.glob("*/train.log")]
    assert len(logs) == 2 and all("torch threads: 1" in log for log in logs)  # cpus_per_task


def test_a_failing_job_is_recorded_and_the_others_complete(tiny_data, tmp_path) -> None:
    result = run_cli(*command(tmp_path, "model.depth=0,1"), data_dir=tiny_data)
    assert result.returncode == 1, result.stderr[-3000:]
    by_status = {r[STATUS]: r for r in records(tmp_path).values()}
    assert by_status["failed"][ERROR].startswith("ConfigError: model.depth=0")
    assert by_status["completed"][JOB_CONFIG]["model"]["depth"] == 1


def test_a_cancelled_job_is_recorded_and_a_rerun_resumes_it(tiny_data, tmp_path) -> None:
    args = command(tmp_path, "seed=0,1", "trainer.max_epochs=150", "hydra.launcher.max_stack=1")
    sweep = start_cli(
        *args, data_dir=tiny_data, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 300
        while not list(tmp_path.glob("*seed=1*/checkpoints/last.ckpt")):
            assert time.time() < deadline and sweep.poll() is None, "seed=1 never checkpointed"
            time.sleep(0.2)
        (task,) = [p.name for p in tmp_path.glob(".submitit/*_1")]  # <array>_<task>: seed=1
        subprocess.run(["scancel", task], check=True)
        output, _ = sweep.communicate(timeout=300)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 1, output[-3000:]  # the sweep finished, and says a job did not
    assert "1 completed, 1 cancelled" in output
    by_seed = {r[JOB_CONFIG]["seed"]: r for r in records(tmp_path).values()}
    assert by_seed[0][STATUS] == "completed"
    assert by_seed[1][STATUS] == "cancelled" and "CANCELLED" in by_seed[1][ERROR]

    result = run_cli(*args, data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    by_seed = {r[JOB_CONFIG]["seed"]: r for r in records(tmp_path).values()}
    assert by_seed[1][STATUS] == "completed" and by_seed[1][RESUMED_FROM]
    assert by_seed[1][EPOCHS] == 150


def test_a_rerun_never_resubmits_tasks_still_in_the_queue(tiny_data, tmp_path) -> None:
    """The command that submitted a sweep is killed while its tasks run on: running it again
    is refused with the paragraph naming those tasks, and submits nothing; once they have
    been cancelled, it submits only the jobs that did not finish. The tasks are suspended
    while the second command runs, so they are still in the queue however long it takes to
    start (under load, they could otherwise finish first)."""
    args = command(tmp_path, "seed=0,1", "trainer.max_epochs=100", "hydra.launcher.max_stack=1")
    sweep = start_cli(*args, data_dir=tiny_data)
    try:
        deadline = time.time() + 300
        while len(list(tmp_path.glob("*/checkpoints/last.ckpt"))) < 2:
            assert time.time() < deadline and sweep.poll() is None, "the tasks never trained"
            time.sleep(0.2)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()
    submitted = tasks(tmp_path)
    assert len(submitted) == 2
    try:
        subprocess.run(["scontrol", "suspend", submitted[0].split("_")[0]], check=True)
        result = run_cli(*args, data_dir=tiny_data)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert "still has SLURM tasks pending or running" in result.stderr
        assert all(task in result.stderr for task in submitted), result.stderr[-2000:]
        assert "Fix:" in result.stderr
        assert tasks(tmp_path) == submitted
    finally:
        subprocess.run(["scancel", submitted[0].split("_")[0]], check=True)
    deadline = time.time() + 120
    while subprocess.run(
        ["squeue", "-h", "-j", submitted[0].split("_")[0]], capture_output=True, text=True
    ).stdout.strip():
        assert time.time() < deadline, "the cancelled tasks stayed in the queue"
        time.sleep(0.5)
    result = run_cli(*args, data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {r[STATUS] for r in records(tmp_path).values()} == {"completed"}


def test_a_sweep_that_stacks_runs_as_one_task(tiny_data, tmp_path) -> None:
    result = run_cli(*command(tmp_path, "seed=0,1,2,3"), data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(tasks(tmp_path)) == 1
    by_seed = {r[JOB_CONFIG]["seed"]: r for r in records(tmp_path).values()}
    assert sorted(by_seed) == [0, 1, 2, 3]
    assert all(r[STATUS] == "completed" and len(r[STACKED_WITH]) == 3 for r in by_seed.values())


def test_a_timed_out_task_is_requeued_and_its_job_completes(tiny_data, tmp_path) -> None:
    """A job that trains for 85 s (Lightning's `max_time`, which its checkpoints keep) and
    checkpoints every 25 epochs (a few seconds), in a task of 2 minutes whose signal comes 45 s
    before its end: its task is requeued, and the job trains on from its last checkpoint to its
    end. (SLURM may send the signal up to a minute early: twice in CI it reached the second
    attempt as it exited, with the job's record complete, and killed it, before a finished task
    ignored it; `test_a_finished_task_ignores_slurms_signal_as_it_exits`.)"""
    every_25_epochs = ["+callbacks.last_checkpoint.every_n_epochs=25"]
    result = run_cli(
        *command(tmp_path, "seed=0", "trainer.max_epochs=100000", *every_25_epochs),
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=45",
        "+trainer.max_time=00:00:01:25",
        data_dir=tiny_data,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (task,) = tasks(tmp_path)
    attempts = ended_attempts(task)
    assert attempts[0] == "REQUEUED" and attempts[-1] == "COMPLETED", attempts
    (record,) = records(tmp_path).values()
    assert record[STATUS] == "completed" and record[RESUMED_FROM].endswith("last.ckpt")


def test_a_finished_task_ignores_slurms_signal_as_it_exits(tiny_data, tmp_path) -> None:
    """SLURM may send its time-limit signal up to a minute before `signal_delay_s` says, so it
    can reach a task whose jobs are done while its process exits. Sent again and again from the
    moment the task has written its result until it leaves the queue, it changes nothing: the
    task's one attempt ends COMPLETED, neither requeued nor killed by the signal."""
    sweep = start_cli(*command(tmp_path, "seed=0"), data_dir=tiny_data)
    try:
        deadline = time.time() + 300
        while not list(tmp_path.glob(".submitit/*/*_result.pkl")):  # submitit's, once done
            assert time.time() < deadline and sweep.poll() is None, "the task wrote no result"
            time.sleep(0.005)
        (task,) = tasks(tmp_path)
        signalled = 0
        while time.time() < deadline:
            sent = subprocess.run(["scancel", "--signal=USR2", task], capture_output=True)
            if sent.returncode != 0:  # the task has left the queue
                break
            signalled += 1
        assert sweep.wait(timeout=120) == 0
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert signalled > 0, "the task ended before any signal reached it"
    assert ended_attempts(task) == ["COMPLETED"]
