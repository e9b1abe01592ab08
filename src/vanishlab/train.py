"""Train one classifier: `python -m vanishlab.train [overrides]` (add `-m` for a sweep).

Every run writes into its own Hydra directory: the composed config (`.hydra/`), TensorBoard
events, checkpoints, and `metrics.json`, the run's result record that sweeps and reports read.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import rich
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.syntax import Syntax
from rich.tree import Tree

from vanishlab import ConfigError
from vanishlab.config import CONFIG_DIR, check_config
from vanishlab.data import MNISTDataModule
from vanishlab.init import initialise
from vanishlab.module import Classifier


def instantiate_function(node: DictConfig) -> Callable[..., Any]:
    """A `_partial_` config as a plain `functools.partial`.

    Hydra >= 1.3.8 re-authorises a partial's target on every call (about 0.1 ms); the loss runs
    on every training step, where that would be a tenth of the step of a small MLP.
    """
    fn = instantiate(node)
    return functools.partial(fn.func, *fn.args, **fn.keywords)


def build(cfg: DictConfig) -> tuple[MNISTDataModule, Classifier]:
    """Check the config, then instantiate the data module and the initialised classifier."""
    check_config(cfg)
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model)
    initialise(net, instantiate(cfg.init))
    loss_fn = instantiate_function(cfg.loss)
    return datamodule, Classifier(net, loss_fn, instantiate(cfg.optimizer))


def build_trainer(cfg: DictConfig, **overrides: Any) -> pl.Trainer:
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)


def scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write atomically (temp file, then rename), so a killed run never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def fit_and_test(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one run; return its result record."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    datamodule.prepare_data()  # missing or corrupt data fails here, before the trainer exists
    trainer = build_trainer(cfg)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    record: dict[str, Any] = {
        "status": "completed",
        "epochs": trainer.current_epoch,
        "train_seconds": round(time.perf_counter() - start, 3),
        **scalars(trainer.callback_metrics, "val/"),
    }
    record.update(scalars(trainer.test(module, datamodule=datamodule, verbose=False)[0], "test/"))
    return record


def print_config(cfg: DictConfig) -> None:
    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else value
        tree.add(str(key)).add(Syntax(str(text).strip(), "yaml"))
    rich.print(tree)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    print_config(cfg)
    metrics_path = Path(cfg.paths.output_dir) / "metrics.json"
    try:
        record = fit_and_test(cfg)
    except ConfigError as err:
        write_json(metrics_path, {"status": "failed", "error": f"ConfigError: {err}"})
        print(f"\nError: {err}\n", file=sys.stderr)
        raise SystemExit(2) from None
    write_json(metrics_path, record)
    rich.print(record)
    return record.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
