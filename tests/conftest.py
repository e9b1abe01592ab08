"""Shared fixtures: tiny MNIST files in the real IDX format, and config composition."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger

from vanishlab.config import CONFIG_DIR
from vanishlab.stack import STACKED_WITH

REAL_DATA_DIR = os.environ.get("DATA_DIR")
# The checkout these tests belong to; the command line runs from here as a user's would.
REPO_ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX layout: magic 0x0800 | ndim, big-endian dims, then the uint8 payload."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_tiny_mnist(root: Path, n_train: int = 600, n_test: int = 200) -> Path:
    """Noise images with a bright stripe whose row gives the class: learnable in a few steps.

    The same files serve as MNIST and Fashion-MNIST (torchvision reads both the same way)."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for image, label in zip(images, labels, strict=True):
            image[2 * label + 3 : 2 * label + 6, 4:24] = 255
        for dataset in ("MNIST", "FashionMNIST"):
            raw = root / dataset / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
            write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def preset_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough images for every preset's data keys: 5000 held out (data.val_size's default) and
    2000 left to train on (edge_of_stability's data.train_subset)."""
    return write_tiny_mnist(tmp_path_factory.mktemp("preset_data"), n_train=7000)


# Small and quick: a few batches of the tiny data, no progress bar.
FAST = [
    "data.val_size=100",
    "data.batch_size=50",
    "data.download=false",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "++callbacks.progress_bar=null",
]


class Recorder(Logger):
    """Keeps what is logged, step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def bare_trainer(**overrides) -> pl.Trainer:
    """Lightning's loop alone: no logger, checkpoints, progress bar, summary or validation
    (unless `overrides` say otherwise)."""
    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    return pl.Trainer(**{**quiet, **overrides})


def compose_config(overrides: list[str], data_dir: Path, output_dir: Path) -> DictConfig:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(
            "train",
            overrides=[f"paths.data_dir={data_dir}", f"paths.output_dir={output_dir}", *overrides],
        )


def start_cli(
    module: str,
    *args: str,
    data_dir: Path,
    env: dict[str, str] | None = None,
    **output: Any,
) -> subprocess.Popen:
    """Start `python -m <module> args` as `run_cli` runs it (with `env` added to the environment)
    in a session of its own, so that a test can kill it with all it started; its output is
    discarded unless `output` says where it goes (`Popen`'s `stdout`, `stderr`, `text`)."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env={**os.environ, "DATA_DIR": str(data_dir), **(env or {})},
        start_new_session=True,
        **(output or {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}),
    )


def kill_cli_when(
    ready: Callable[[], bool],
    module: str,
    *args: str,
    data_dir: Path,
    env: dict[str, str] | None = None,
) -> None:
    """Run `python -m <module> args` as `run_cli` does (with `env` added to the environment)
    and kill its whole process group (as a lost node or a kill -9 would) as soon as `ready()`
    holds; it must not end before."""
    process = start_cli(module, *args, data_dir=data_dir, env=env)
    deadline = time.time() + 300
    while not ready():
        assert time.time() < deadline and process.poll() is None, "it ended before the kill"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_cli(
    module: str, *args: str, data_dir: Path | str | None = None, cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess:
    """Run `python -m <module> args` as a user would, from the repository's root (or `cwd`, whose
    modules it can import, as a user's project's)."""
    env = dict(os.environ)
    if data_dir is not None:
        env["DATA_DIR"] = str(data_dir)
    if cwd != REPO_ROOT:
        env["PYTHONPATH"] = str(cwd)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def sweep(sweep_dir: Path, data_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m vanishlab.train -m` with `FAST` and `overrides` into `sweep_dir`."""
    return run_cli(
        "vanishlab.train",
        "-m",
        *FAST,
        *overrides,
        f"hydra.sweep.dir={sweep_dir}",
        data_dir=data_dir,
    )


def records(sweep_dir: Path) -> dict[str, dict]:
    """A sweep's records by job directory name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")}


# A sweep of 4 jobs that vary the activation and the learning rate (ReLU at lr=1e4 diverges), with
# constant overrides beside them; the dashboard and browser tests read it.
TINY_SWEEP = ["-m", "model.activation=sigmoid,relu", "optimizer.lr=0.05,1e4"]
TINY_SWEEP_CONSTANTS = [
    *FAST,
    "model.depth=3",
    "trainer.max_epochs=2",
    "callbacks.gradient_flow.every_n_steps=2",
]


@pytest.fixture(scope="session")
def tiny_sweep(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("tiny_sweep")
    args = [*TINY_SWEEP, *TINY_SWEEP_CONSTANTS, f"hydra.sweep.dir={sweep_dir}"]
    result = run_cli("vanishlab.train", *args, data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


# A fused stack's job against its run alone: batched kernels round differently (README, Stacked
# sweeps, gives the differences measured). Compared as rtol and atol (`same`).
FUSED_REL = 1e-4


def timeless(record: dict) -> str:
    """The record as JSON (NaN included), less its seconds and `stacked_with`."""
    kept = {k: v for k, v in record.items() if not k.endswith("_seconds") and k != STACKED_WITH}
    return json.dumps(kept, sort_keys=True)


def same(a, b, skipped=(), rel: float = 0.0) -> bool:
    """Nested checkpoint contents (or records) equal, numbers and tensors exactly or, with
    `rel`, to that tolerance (`FUSED_REL`: relative, and absolute in units of the tensor's
    largest value, at least 1); the keys in `skipped` not compared."""
    if isinstance(a, dict):
        keys = set(a) - set(skipped)
        return keys == set(b) - set(skipped) and all(same(a[k], b[k], rel=rel) for k in keys)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y, rel=rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        if not rel or not a.is_floating_point():
            return torch.equal(a, b)
        scale = max(1.0, float(b.abs().max()))  # a diverging job's weights reach 1e8
        return torch.allclose(a, b, rtol=rel, atol=rel * scale, equal_nan=True)
    if rel and isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=1e-9, nan_ok=True)
    return a == b or (a != a and b != b)  # nan == nan


def same_record(a: dict, b: dict, rel: float = FUSED_REL) -> bool:
    """Records equal to `rel`, but for the seconds and `stacked_with` (`timeless`)."""
    return same(*(json.loads(timeless(record)) for record in (a, b)), rel=rel)


def worst(a, b, path="") -> list:
    """The largest relative differences between two nested records (for the failure message)."""
    if isinstance(a, dict):
        pairs = (x for k in a if k in b for x in worst(a[k], b[k], f"{path}/{k}"))
        return sorted(pairs, reverse=True)[:3]
    if isinstance(a, float) and isinstance(b, float) and a == a and b == b:
        return [(abs(a - b) / max(abs(b), 1e-12), path)]
    return []
