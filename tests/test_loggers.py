"""`logger=wandb` and `logger=mlflow` get what TensorBoard gets: every scalar at its step, the
gradient-flow figure, and the job's record (`record/<key>`), in a run named after the job's
directory; in a stack, each job its own run. Read back from the libraries' local stores: the
offline W&B run's transaction log (by wandb's own reader, `wandb leet inspect --json`) and the
MLflow SQLite store (`MlflowClient`)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import FAST, compose_config
from vanishlab.results import STEPS
from vanishlab.stack import fit_and_test_stack
from vanishlab.train import fit_and_test

LOGGERS = [*FAST, "logger=[tensorboard,wandb,mlflow]", "callbacks.gradient_flow.every_n_steps=4"]


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`paths.log_dir`, where the MLflow store lies: one for the module, as for a user's runs
    (making its tables is most of what a new store costs)."""
    return tmp_path_factory.mktemp("outputs")


def tensorboard(job_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[int]]:
    """The job's TensorBoard scalars, (step, value) by tag, and its figures' steps."""
    events = EventAccumulator(str(job_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }
    return scalars, [e.step for e in events.Images("gradient_flow")]


def wandb_run(job_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    """The name and the history rows of the job's one offline W&B run."""
    (log,) = job_dir.glob("wandb/offline-run-*/run-*.wandb")
    inspect = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)]
    lines = subprocess.run(inspect, capture_output=True, text=True, check=True).stdout
    records = [json.loads(line) for line in lines.splitlines()]
    (name,) = [r["run"]["display_name"] for r in records if r["type"] == "run"]
    return name, [r["history"]["item"] for r in records if r["type"] == "history"]


def same_series(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """The same steps, and the same values to float32 (TensorBoard's precision)."""
    logged, expected = sorted(logged), sorted(expected)
    steps_match = [step for step, _ in logged] == [step for step, _ in expected]
    values = pytest.approx([value for _, value in expected], rel=1e-6, nan_ok=True)
    return steps_match and [value for _, value in logged] == values


def numbers(record: dict[str, Any]) -> dict[str, float]:
    return {f"record/{k}": v for k, v in record.items() if isinstance(v, int | float)}


def check_wandb(job_dir: Path, record: dict[str, Any]) -> None:
    """The W&B run has TensorBoard's scalars at their steps, a figure at each of TensorBoard's
    figures' steps (its files written), and the record's numbers at the last step."""
    scalars, figure_steps = tensorboard(job_dir)
    name, history = wandb_run(job_dir)
    assert name == job_dir.name
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    figures = []
    for row in history:
        step = row["trainer/global_step"]
        if "gradient_flow._type" in row:
            figures.append(step)
            (path,) = row["gradient_flow.filenames"]
            assert (next(job_dir.glob("wandb/offline-run-*")) / "files" / path).is_file()
        for key, value in row.items():
            if not key.startswith(("_", "trainer/", "gradient_flow.")):
                series[key].append((step, value))
    assert figures == figure_steps and figures
    recorded = {k: series.pop(k) for k in list(series) if k.startswith("record/")}
    assert {k: value for k, [(_, value)] in recorded.items()} == pytest.approx(numbers(record))
    assert {step for [(step, _)] in recorded.values()} == {record[STEPS]}
    assert series.keys() == scalars.keys()
    assert [k for k in scalars if not same_series(series[k], scalars[k])] == []


def check_mlflow(job_dir: Path, log_dir: Path, record: dict[str, Any]) -> None:
    """The MLflow run named after the job (the job's directory its tag) has TensorBoard's
    scalars' histories, the figure at each of its steps, and the record's numbers."""
    scalars, figure_steps = tensorboard(job_dir)
    client = MlflowClient(f"sqlite:///{log_dir}/mlflow.db")
    experiment = client.get_experiment_by_name("vanishlab")
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"attributes.run_name = '{job_dir.name}'"
    )
    assert run.data.tags["output_dir"] == str(job_dir)
    run_id = run.info.run_id
    recorded = {k: v for k, v in run.data.metrics.items() if k.startswith("record/")}
    assert recorded == pytest.approx(numbers(record))
    logged = {k for k in run.data.metrics if k not in recorded}
    assert logged == scalars.keys()
    histories = {
        k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in logged
    }
    assert [k for k in scalars if not same_series(histories[k], scalars[k])] == []
    images = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(path.split("+step+")[1].split("+")[0]) for path in images) == figure_steps


def test_a_run_logs_to_wandb_and_mlflow_what_it_logs_to_tensorboard(
    tiny_data, tmp_path, log_dir
) -> None:
    job_dir = tmp_path / "depth_3"
    overrides = [*LOGGERS, "model.depth=3", f"paths.log_dir={log_dir}"]
    cfg = compose_config(overrides, tiny_data, job_dir)
    record = fit_and_test(cfg)
    check_wandb(job_dir, record)
    check_mlflow(job_dir, log_dir, record)


def test_each_stacked_job_is_a_run_of_its_own(tiny_data, tmp_path, log_dir) -> None:
    """Two jobs trained as one stack in this process: two W&B runs open at once (`reinit:
    create_new`), two MLflow runs, each with its own job's figures."""
    cfgs = [
        compose_config(
            [*LOGGERS, f"seed={seed}", f"paths.log_dir={log_dir}"],
            tiny_data,
            tmp_path / f"seed_{seed}",
        )
        for seed in (0, 1)
    ]
    records = fit_and_test_stack(cfgs)
    for seed, record in zip((0, 1), records, strict=True):
        check_wandb(tmp_path / f"seed_{seed}", record)
        check_mlflow(tmp_path / f"seed_{seed}", log_dir, record)
