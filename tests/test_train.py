"""Training, testing and evaluation end to end, on tiny MNIST files in the IDX format."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ProgressBar

from conftest import FAST, compose_config, run_cli
from vanishlab.data import TensorBatches
from vanishlab.results import (
    CLASSES_PREDICTED,
    EPOCHS,
    JOB_ID,
    STATUS,
    STEPS,
    TAGS,
    TEST_ACC,
    TEST_LOSS,
    TRAIN_SECONDS,
    VAL_ACC,
)
from vanishlab.train import build_seeded, build_trainer, fit_and_test, torch_threads


@pytest.mark.slow
def test_cli_run_writes_config_events_checkpoints_and_metrics(tiny_data, tmp_path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "vanishlab.train", *FAST, "tags=[smoke]", f"hydra.run.dir={run_dir}", data_dir=tiny_data
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert "Tip:" not in console and "LeafSpec" not in console  # only what the user needs
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics[STATUS] == "completed"
    assert metrics[EPOCHS] == 1 and metrics[STEPS] == 10 and metrics[TRAIN_SECONDS] > 0
    assert metrics[TAGS] == ["smoke"] and metrics["seed"] == 0 and len(metrics[JOB_ID]) == 16
    for key in (TEST_ACC, TEST_LOSS, VAL_ACC, "val/loss"):
        assert 0 <= metrics[key] < 100, key

    # Evaluating the last checkpoint, copied out of its run directory (it describes itself),
    # reproduces the run's own test figures; a data setting given on the command line replaces
    # the run's and is recorded.
    eval_dir = tmp_path / "eval"
    ckpt = shutil.copy(run_dir / "checkpoints" / "last.ckpt", tmp_path / "copied.ckpt")
    shutil.rmtree(run_dir)
    result = run_cli(
        "vanishlab.eval",
        f"ckpt_path={ckpt}",
        "data.batch_size=7",
        f"hydra.run.dir={eval_dir}",
        data_dir=tiny_data,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    assert evaluated["data_overrides"] == ["data.batch_size=7"]
    assert evaluated[CLASSES_PREDICTED] == metrics[CLASSES_PREDICTED]
    assert abs(evaluated[TEST_ACC] - metrics[TEST_ACC]) < 1e-6
    assert abs(evaluated[TEST_LOSS] - metrics[TEST_LOSS]) < 1e-5

    # A checkpoint whose config names code that is not vanishlab's or torch's is refused, and
    # nothing it names runs.
    doctored = torch.load(ckpt, weights_only=True)
    marker = tmp_path / "ran"
    doctored["hyper_parameters"]["config"]["model"] = {
        "_target_": "os.system",
        "_args_": [f"touch {marker}"],
    }
    torch.save(doctored, tmp_path / "doctored.ckpt")
    result = run_cli(
        "vanishlab.eval",
        f"ckpt_path={tmp_path / 'doctored.ckpt'}",
        f"hydra.run.dir={tmp_path / 'eval2'}",
        data_dir=tiny_data,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "_target_: 'os.system'" in result.stderr and "trust=[os]" in result.stderr
    assert not marker.exists() and not (tmp_path / "eval2" / "metrics.json").exists()


def test_training_learns_the_tiny_task(tiny_data, tmp_path) -> None:
    cfg = compose_config([*FAST, "trainer.max_epochs=5", "optimizer.lr=0.1"], tiny_data, tmp_path)
    record = fit_and_test(cfg)
    assert record[TEST_ACC] > 0.8, record


def test_same_seed_gives_same_metrics(tiny_data, tmp_path) -> None:
    def metrics(seed: int, name: str) -> dict:
        cfg = compose_config([*FAST, f"seed={seed}"], tiny_data, tmp_path / name)
        record = fit_and_test(cfg)
        return {k: v for k, v in record.items() if not k.endswith("_seconds")}  # wall clock

    first = metrics(1, "a")
    assert metrics(1, "b") == first
    assert metrics(2, "c") != first


@pytest.mark.parametrize(
    ("overrides", "bar"),
    [
        ([], "the config's"),
        (["++callbacks.progress_bar=null"], None),  # switched off: not Lightning's default either
        (["++callbacks.progress_bar=null", "+trainer.enable_progress_bar=true"], "Lightning's"),
    ],
)
def test_a_progress_bar_switched_off_is_off(overrides, bar, tiny_data, tmp_path) -> None:
    cfg = compose_config(["data.download=false", *overrides], tiny_data, tmp_path)
    shown = build_trainer(cfg).progress_bar_callback
    if bar is None:
        assert shown is None
    elif bar == "the config's":
        own = cfg.callbacks.progress_bar
        assert type(shown) is get_class(own._target_)
        assert shown.refresh_rate == own.refresh_rate
    else:
        assert isinstance(shown, ProgressBar)


def test_val_size_zero_validates_on_the_test_split(tiny_data, tmp_path) -> None:
    cfg = compose_config([*FAST, "data.val_size=0"], tiny_data, tmp_path)
    record = fit_and_test(cfg)
    assert record[VAL_ACC] == record[TEST_ACC]
    assert abs(record["val/loss"] - record[TEST_LOSS]) < 1e-6


def test_train_subset_trains_on_the_first_images_of_the_training_split(tiny_data, tmp_path) -> None:
    """Full-batch gradient descent is one override away: one step per epoch, on the first 100
    images of the split the validation images were taken from (the tiny data has 500 left)."""
    whole = build_seeded(compose_config(FAST, tiny_data, tmp_path))[0]
    overrides = [*FAST, "data.train_subset=100", "data.batch_size=100", "trainer.max_epochs=3"]
    cfg = compose_config(overrides, tiny_data, tmp_path)
    subset = build_seeded(cfg)[0]
    for datamodule in (whole, subset):
        datamodule.setup("fit")
    for kept, split in zip(subset.splits["train"], whole.splits["train"], strict=True):
        assert len(split) == 500 and torch.equal(kept, split[:100])
    assert torch.equal(subset.splits["val"][0], whole.splits["val"][0])
    assert fit_and_test(cfg)[STEPS] == 3


def test_ddp_ranks_share_out_each_global_batch() -> None:
    x, y = torch.arange(1150.0).unsqueeze(1), torch.arange(1150)  # 11 batches of 100, and 50

    def batches(rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(3)
        return [b for _, b in TensorBatches(x, y, 100, generator, rank, world_size)]

    alone, first, second = batches(), batches(0, 2), batches(1, 2)
    assert len(alone) == 12 and len(first) == len(second) == 11  # DDP drops the partial batch
    assert all(len(b) == 50 for b in first + second)
    for whole, mine, theirs in zip(alone, first, second, strict=False):
        assert torch.equal(whole, torch.cat([mine, theirs]))  # the same steps as one device


@pytest.mark.parametrize(
    ("affinity", "slurm_cpus", "threads", "expected"),
    [
        ({0, 1, 2, 3}, None, None, 4),
        ({2}, None, None, 1),  # taskset -c 2, or SLURM's task/affinity
        ({0, 1, 2, 3}, "2", None, 2),  # SLURM's cpus_per_task without task/affinity
        ({0, 1, 2, 3}, "2", 3, 3),  # threads=3 says so
    ],
)
def test_threads_follow_what_the_job_was_given(
    affinity, slurm_cpus, threads, expected, monkeypatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity)
    if slurm_cpus:
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", slurm_cpus)
    else:
        monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert torch_threads(OmegaConf.create({"threads": threads})) == expected
