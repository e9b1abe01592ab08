"""Each bad input stops the run before training with one paragraph: key, value, fix."""

from __future__ import annotations

import json
import shutil

import pytest
from hydra import compose, initialize_config_dir
from torchvision import datasets

from conftest import FAST, compose_config, run_cli, write_tiny_mnist
from vanishlab import ConfigError
from vanishlab.config import CONFIG_DIR
from vanishlab.results import (
    STATUS,
)
from vanishlab.train import fit_and_test

BAD_VALUES = {
    "model.depth=0": "model.depth=0",
    "model.width=0": "model.width=0",
    "optimizer.lr=0": "optimizer.lr=0",
    "optimizer.lr=-0.1": "optimizer.lr=-0.1",
    "data.batch_size=0": "data.batch_size=0",
    "data.val_size=-1": "data.val_size=-1",
    "data.val_size=60000": "data.val_size=60000",
    "data.train_subset=0": "data.train_subset=0",
    "data.train_subset=-5": "data.train_subset=-5",
    "data.train_subset=501": "data.train_subset=501",  # the tiny training split holds 500
    "model.activation=swish": "model.activation='swish'",
    "callbacks.gradient_flow.every_n_steps=0": "callbacks.gradient_flow.every_n_steps=0",
    "callbacks.gradient_flow.histograms_every_n_epochs=0": (
        "callbacks.gradient_flow.histograms_every_n_epochs=0"
    ),
    "callbacks.gradient_flow.figure_log10_range=[4,-16]": (
        "callbacks.gradient_flow.figure_log10_range=[4, -16]"
    ),
    "callbacks.gradient_flow.figure_log10_range=[-16]": (
        "callbacks.gradient_flow.figure_log10_range=[-16]"
    ),
    "callbacks=sharpness callbacks.sharpness.every_n_steps=0": (
        "callbacks.sharpness.every_n_steps=0"
    ),
    "callbacks=sharpness callbacks.sharpness.batch_size=0": "callbacks.sharpness.batch_size=0",
    "callbacks=jacobian callbacks.jacobian.inputs=0": "callbacks.jacobian.inputs=0",
    "callbacks=jacobian callbacks.jacobian.max_width=0": "callbacks.jacobian.max_width=0",
    "callbacks=jacobian callbacks.jacobian.inputs=2.5": (
        "callbacks.jacobian.inputs=2.5 is not allowed: it is float"
    ),
    "callbacks=sharpness callbacks.sharpness.max_iterations=0": (
        "callbacks.sharpness.max_iterations=0"
    ),
    "init=normal init.std=-1": "init.std=-1",
    "init=orthogonal init.gain=0": "init.gain=0",
    "init=variance_scaling init.sigma_w2=-1": "init.sigma_w2=-1",
    "init=variance_scaling init.sigma_w2=0": "init.sigma_w2=0",
    "init=variance_scaling init.sigma_b2=-0.05": "init.sigma_b2=-0.05",
    "optimizer.momentum=1.5": "optimizer.momentum=1.5",
    "optimizer.weight_decay=-0.1": "optimizer.weight_decay=-0.1",
    "trainer.max_epochs=-1": "trainer.max_epochs=-1",
    "trainer.max_epochs=1.5": "trainer.max_epochs=1.5",
    "optimizer.lr=abc": "optimizer.lr='abc' is not allowed: it is str 'abc', not a number",
    "data.batch_size=2.5": "data.batch_size=2.5 is not allowed: it is float 2.5, not an integer",
}


@pytest.mark.parametrize("override", BAD_VALUES)
def test_bad_value_names_key_value_and_fix(override, tiny_data, tmp_path) -> None:
    cfg = compose_config([*FAST, *override.split()], tiny_data, tmp_path)
    with pytest.raises(ConfigError) as err:
        fit_and_test(cfg)
    message = str(err.value)
    assert message.startswith(BAD_VALUES[override])
    assert "Fix:" in message and "\n" not in message
    assert not (tmp_path / "checkpoints").exists()


def test_config_too_large_for_the_machine_fails_before_allocating(tiny_data, tmp_path) -> None:
    cfg = compose_config([*FAST, "model.depth=64", "model.width=40000"], tiny_data, tmp_path)
    with pytest.raises(ConfigError) as err:
        fit_and_test(cfg)  # allocating it would take about 1.9 TiB: the test would not survive
    message = str(err.value)
    width = 40_000
    parameters = (784 + 1) * width + 63 * (width + 1) * width + (width + 1) * 10
    assert f"needs about 1881.3 GiB ({parameters:,} parameters" in message
    assert "Fix:" in message and "\n" not in message


def data_error(data_dir, tmp_path, *overrides: str) -> str:
    cfg = compose_config([*FAST, *overrides], data_dir, tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        fit_and_test(cfg)
    return str(err.value)


def test_missing_files_without_download_say_where_and_what(tmp_path) -> None:
    message = data_error(tmp_path / "empty", tmp_path)
    assert f"{tmp_path / 'empty'}/MNIST/raw/" in message
    assert "train-images-idx3-ubyte" in message and "data.download=false" in message


def test_failed_download_says_where_and_what(tmp_path, monkeypatch) -> None:
    # Port 9 on loopback refuses at once, on any machine, with or without internet.
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    message = data_error(tmp_path / "empty", tmp_path, "data.download=true")
    assert "downloading them failed" in message
    assert f"{tmp_path / 'empty'}/MNIST/raw/" in message and "train-labels-idx1-ubyte" in message


@pytest.mark.parametrize("damage", ["truncate", "bad_magic"])
def test_corrupt_idx_file_is_named(damage, tmp_path) -> None:
    data_dir = write_tiny_mnist(tmp_path / "data")
    images = data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    blob = images.read_bytes()
    images.write_bytes(
        blob[: len(blob) // 2] if damage == "truncate" else b"\x00\x00\x09\x07" + blob[4:]
    )
    message = data_error(data_dir, tmp_path)
    assert "corrupt or truncated" in message and "train-images-idx3-ubyte" in message


@pytest.mark.slow
def test_cli_prints_one_paragraph_and_exits_nonzero_without_traceback(tiny_data, tmp_path) -> None:
    result = run_cli(
        "vanishlab.train", *FAST, "model.depth=0", f"hydra.run.dir={tmp_path}", data_dir=tiny_data
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "model.depth=0 is not allowed" in result.stderr and "Fix:" in result.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())[STATUS] == "failed"


@pytest.mark.slow
def test_eval_without_ckpt_path_says_what_to_pass(tmp_path) -> None:
    result = run_cli("vanishlab.eval", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ckpt_path is not set" in result.stderr and "Fix:" in result.stderr


def test_eval_config_composes_the_data_config() -> None:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=["data.batch_size=7", "paths.output_dir=/tmp"])
    assert cfg.data.batch_size == 7 and cfg.ckpt_path is None


@pytest.mark.slow
def test_cli_rejects_unknown_group_option(tiny_data, tmp_path) -> None:
    result = run_cli(
        "vanishlab.train", "init=nonsense", f"hydra.run.dir={tmp_path}", data_dir=tiny_data
    )
    assert result.returncode != 0
    assert "Could not find 'init/nonsense'" in result.stderr


@pytest.mark.slow
def test_a_second_run_never_writes_into_the_first_runs_directory(tiny_data, tmp_path) -> None:
    shutil.rmtree(tmp_path)
    runs = tmp_path / "outputs"
    for _ in range(2):
        result = run_cli("vanishlab.train", *FAST, f"paths.log_dir={runs}", data_dir=tiny_data)
        assert result.returncode == 0, result.stderr[-2000:]
    run_dirs = sorted(runs.glob("runs/*/*"))
    assert len(run_dirs) == 2
    assert all(
        (d / "metrics.json").is_file() and (d / "checkpoints" / "last.ckpt").is_file()
        for d in run_dirs
    )


# What a single run's command line gets wrong before it trains: the paragraph on stderr, exit 2,
# no traceback, no checkpoint.
CLI_BAD_VALUES = {
    "seed=abc": "seed='abc' is not allowed: it is str 'abc', not an integer",
    "seed=-1": "seed=-1 is not allowed",
    "threads=-2": "threads=-2 is not allowed",
    "threads=0": "threads=0 is not allowed",
    "ckpt_path=README.md": "cannot be read as a checkpoint",
}


@pytest.mark.slow
@pytest.mark.parametrize("override", CLI_BAD_VALUES)
def test_a_bad_run_level_value_gets_the_paragraph(override, tiny_data, tmp_path) -> None:
    result = run_cli(
        "vanishlab.train", *FAST, override, f"hydra.run.dir={tmp_path}", data_dir=tiny_data
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert CLI_BAD_VALUES[override] in result.stderr and "Fix:" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_a_bad_seed_in_a_sweep_fails_that_job_alone_without_a_traceback(
    tiny_data, tmp_path
) -> None:
    args = ["-m", *FAST, "seed=0,abc", f"hydra.sweep.dir={tmp_path}"]
    result = run_cli("vanishlab.train", *args, data_dir=tiny_data)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    records = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/metrics.json")}
    assert records["seed=0"][STATUS] == "completed"
    assert records["seed=abc"][STATUS] == "failed"
    assert records["seed=abc"]["error"].startswith("ConfigError: seed='abc' is not allowed")
