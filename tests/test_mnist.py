"""The reference experiments on the real MNIST files (DATA_DIR); `make test` runs them in CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REAL_DATA_DIR, compose_config
from vanishlab.train import fit_and_test

HAS_MNIST = bool(REAL_DATA_DIR) and (Path(REAL_DATA_DIR) / "MNIST" / "raw").is_dir()
pytestmark = [
    pytest.mark.mnist,
    pytest.mark.skipif(not HAS_MNIST, reason="set DATA_DIR to a folder holding MNIST/raw/"),
]
ONE_EPOCH = ["trainer.max_epochs=1", "~callbacks.progress_bar", "data.download=false"]


def run_real(experiment: str, tmp_path: Path, *overrides: str) -> dict:
    cfg = compose_config(
        [f"experiment={experiment}", *ONE_EPOCH, *overrides], Path(REAL_DATA_DIR), tmp_path
    )
    return fit_and_test(cfg)


def test_seed_experiment_reaches_reference_accuracy_after_one_epoch(tmp_path) -> None:
    record = run_real("seed", tmp_path)
    assert 0.88 <= record["test/acc"] <= 0.92, record


def test_seed_randn_stays_flat(tmp_path) -> None:
    record = run_real("seed_randn", tmp_path)
    assert 2.28 <= record["test/loss"] <= 2.33, record
    assert record["test/acc"] < 0.115, record
