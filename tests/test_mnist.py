"""The reference experiments on the real MNIST files (DATA_DIR); `make test` runs them in CI."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REAL_DATA_DIR, compose_config
from vanishlab.results import (
    FIRST_OVER_LAST,
    TEST_ACC,
    TEST_LOSS,
    VERDICT,
)
from vanishlab.train import fit_and_test

HAS_MNIST = bool(REAL_DATA_DIR) and (Path(REAL_DATA_DIR) / "MNIST" / "raw").is_dir()
pytestmark = [
    pytest.mark.mnist,
    pytest.mark.skipif(not HAS_MNIST, reason="set DATA_DIR to a folder holding MNIST/raw/"),
]
ONE_EPOCH = ["trainer.max_epochs=1", "++callbacks.progress_bar=null", "data.download=false"]


def run_real(experiment: str, tmp_path: Path, *overrides: str) -> dict:
    cfg = compose_config(
        [f"experiment={experiment}", *ONE_EPOCH, *overrides], Path(REAL_DATA_DIR), tmp_path
    )
    return fit_and_test(cfg)


def test_seed_experiment_reaches_reference_accuracy_after_one_epoch(tmp_path) -> None:
    record = run_real("seed", tmp_path)
    assert 0.88 <= record[TEST_ACC] <= 0.92, record


def test_seed_randn_stays_flat(tmp_path) -> None:
    record = run_real("seed_randn", tmp_path)
    assert 2.28 <= record[TEST_LOSS] <= 2.33, record
    assert record[TEST_ACC] < 0.115, record


def first_logged_ratio(run_dir: Path) -> float:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events.Scalars(FIRST_OVER_LAST)[0].value


SHORT = ["model.depth=8", "trainer.limit_val_batches=5"]  # a full epoch: evidence of training


@pytest.mark.parametrize(
    ("overrides", "low", "high", "expected"),
    [
        (["model.activation=sigmoid", "init=xavier_normal"], 0, 1e-2, "vanishing"),
        (["model.activation=relu", "init=kaiming_normal"], 0.2, 5, "trained"),
        (["model.activation=tanh", "init=normal", "init.std=1.0"], 100, float("inf"), "exploding"),
    ],
    ids=["sigmoid-xavier", "relu-kaiming", "tanh-randn"],
)
def test_gradient_ratio_and_verdict_at_depth_8(overrides, low, high, expected, tmp_path) -> None:
    record = run_real("seed", tmp_path, *SHORT, *overrides)
    ratio = first_logged_ratio(tmp_path)
    assert low < ratio < high
    assert record[VERDICT] == expected, record
