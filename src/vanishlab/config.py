"""Where the configs live, and the checks that turn a bad setting into one clear paragraph.

Hydra rejects unknown group options itself; `check_config` catches bad values of known keys
before anything is built, so no run starts (or writes checkpoints) on a setting that cannot work.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from vanishlab import ConfigError
from vanishlab.data import DATASETS, TRAIN_SIZE
from vanishlab.nets import ACTIVATIONS, OUTPUT_ACTIVATIONS

# The configs live beside the package (`conf/`), so vanishlab is installed editable.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "conf"
# `conf/paths` reads this; the processes a sweep launcher starts inherit it.
os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))


def _require(ok: bool, key: str, value: object, why: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {why}. Fix: {fix}.")


def check_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` for the first bad value of the keys users set most often."""
    model, data = cfg.model, cfg.data
    _require(
        isinstance(model.depth, int) and model.depth >= 1,
        "model.depth",
        model.depth,
        "the MLP needs at least one hidden layer",
        "set model.depth to an integer >= 1, e.g. 2",
    )
    _require(
        isinstance(model.width, int) and model.width >= 1,
        "model.width",
        model.width,
        "a hidden layer needs at least one unit",
        "set model.width to an integer >= 1, e.g. 200",
    )
    _require(
        model.activation in ACTIVATIONS,
        "model.activation",
        model.activation,
        "it is not a known activation",
        f"use one of {', '.join(ACTIVATIONS)}",
    )
    _require(
        model.output_activation in OUTPUT_ACTIVATIONS,
        "model.output_activation",
        model.output_activation,
        "it is not a known output activation",
        "use null (raw logits) or relu",
    )
    _require(
        cfg.optimizer.lr > 0,
        "optimizer.lr",
        cfg.optimizer.lr,
        "the learning rate must be positive",
        "set optimizer.lr to a number > 0, e.g. 0.01",
    )
    _require(
        isinstance(data.batch_size, int) and data.batch_size >= 1,
        "data.batch_size",
        data.batch_size,
        "a batch needs at least one example",
        "set data.batch_size to an integer >= 1, e.g. 200",
    )
    _require(
        isinstance(data.val_size, int) and 0 <= data.val_size < TRAIN_SIZE,
        "data.val_size",
        data.val_size,
        f"the validation split is taken from the {TRAIN_SIZE} training images",
        f"set data.val_size to an integer in [0, {TRAIN_SIZE}), e.g. 5000 (0 = validate on test)",
    )
    _require(
        data.dataset in DATASETS,
        "data.dataset",
        data.dataset,
        "it is not a known dataset",
        f"use data={' or data='.join(DATASETS)}",
    )
    _require(
        cfg.trainer.accelerator != "gpu" or torch.cuda.is_available(),
        "trainer.accelerator",
        cfg.trainer.accelerator,
        "torch sees no CUDA GPU on this machine",
        "use trainer=default (accelerator auto picks the GPU when there is one) or trainer=cpu",
    )
