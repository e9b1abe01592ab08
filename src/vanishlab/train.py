"""Train one classifier: `python -m vanishlab.train [overrides]` (add `-m` for a sweep).

Every run writes into its own Hydra directory: the composed config (`.hydra/`), TensorBoard
events, checkpoints, and `metrics.json`, the run's result record that sweeps and reports read.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import rich
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from rich.syntax import Syntax
from rich.tree import Tree

from vanishlab import ConfigError, exit_with
from vanishlab.config import CONFIG_DIR, check_config
from vanishlab.data import MNISTDataModule
from vanishlab.diagnostics import GradientFlow, StopOnDivergence
from vanishlab.init import initialise
from vanishlab.module import Classifier
from vanishlab.results import FINISHED, log_hparams, read_record, verdict, write_json

log = logging.getLogger(__name__)


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


def fit_and_test(cfg: DictConfig, resume_from: Path | None = None) -> dict[str, Any]:
    """Train (from scratch, or on from the checkpoint `resume_from`) and test one run; return
    its result record (what `metrics.json` holds)."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    datamodule.prepare_data()  # missing or corrupt data fails here, before the trainer exists
    trainer = build_trainer(cfg)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    record: dict[str, Any] = {
        "status": "completed",
        **({"resumed_from": str(resume_from)} if resume_from else {}),
        "epochs": trainer.current_epoch,
        "world_size": trainer.world_size,
        "train_seconds": round(time.perf_counter() - start, 3),
        **scalars(trainer.callback_metrics, "val/"),
    }
    for callback in trainer.callbacks:
        if isinstance(callback, StopOnDivergence) and callback.diverged_at:
            step, epoch = callback.diverged_at["step"], callback.diverged_at["epoch"]
            record.update(
                status="diverged", epochs=epoch, diverged_at_step=step, diverged_at_epoch=epoch
            )
        if isinstance(callback, GradientFlow):
            record.update(gradient_evidence(callback))
    start = time.perf_counter()
    record.update(scalars(trainer.test(module, datamodule=datamodule, verbose=False)[0], "test/"))
    record["test_seconds"] = round(time.perf_counter() - start, 3)
    record.update(test_split_evidence(module, datamodule))
    record["verdict"] = verdict(record)
    log_hparams(trainer.loggers, cfg, record, step=trainer.global_step)
    return record


def gradient_evidence(flow: GradientFlow) -> dict[str, Any]:
    """What the gradient-flow callback saw, for the verdict and the sweep report."""
    first, last = flow.at_first_step, flow.at_last_step
    if not first:
        return {}
    return {
        "grad_norm/first_over_last": last["first_over_last"],
        "evidence/first_over_last_at_start": first["first_over_last"],
        "evidence/max_dead_frac": last["max_dead_frac"],
        "evidence/max_saturated_frac": last["max_saturated_frac"],
        "grad_norms_at_start": first["grad_norms"],
    }


@torch.no_grad()
def test_split_evidence(module: Classifier, datamodule: MNISTDataModule) -> dict[str, int]:
    """How many classes the trained network predicts on the test split, and how many it cannot
    predict at all: a class whose output is 0 for every test image (its output ReLU died)."""
    outputs = torch.cat([module(x) for x, _ in datamodule.test_dataloader()])
    return {
        "evidence/classes_predicted": outputs.argmax(dim=1).unique().numel(),
        "evidence/dead_classes": int((outputs == 0).all(dim=0).sum()),
    }


def print_config(cfg: DictConfig) -> None:
    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else value
        tree.add(str(key)).add(Syntax(str(text).strip(), "yaml"))
    rich.print(tree)


def torch_threads(cfg: DictConfig) -> int:
    """`threads` if set, else the cores shared out among the jobs that run at once, so that
    jobs x threads never oversubscribes the machine (joblib runs `n_jobs` jobs in parallel)."""
    if cfg.get("threads"):
        return cfg.threads
    cores = os.cpu_count() or 1
    launcher = HydraConfig.get().launcher if HydraConfig.initialized() else {}
    parallel = launcher.get("n_jobs", 1) if "joblib" in launcher.get("_target_", "") else 1
    if parallel < 0:  # joblib counts back from the number of cores: -1 = all of them
        parallel = cores + 1 + parallel
    return max(1, cores // parallel)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    """Run one job. In a sweep, a job that raises is recorded as `failed` and the sweep goes on;
    re-running a sweep into its own directory skips finished jobs and resumes interrupted ones."""
    output_dir = Path(cfg.paths.output_dir)
    metrics_path = output_dir / "metrics.json"
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    previous = read_record(metrics_path)
    if in_sweep and previous.get("status") in FINISHED:
        log.info("Skipping %s: already %s", output_dir.name, previous["status"])
        return previous.get(cfg.optimized_metric, math.nan)

    print_config(cfg)
    torch.set_num_threads(torch_threads(cfg))
    log.info("torch threads: %d", torch.get_num_threads())
    last_ckpt = output_dir / "checkpoints" / "last.ckpt"
    resume_from = last_ckpt if in_sweep and last_ckpt.is_file() else None
    try:
        record = fit_and_test(cfg, resume_from)
    except Exception as err:
        write_json(metrics_path, {"status": "failed", "error": f"{type(err).__name__}: {err}"})
        if in_sweep:
            log.exception("Job %s failed; the sweep goes on", output_dir.name)
            return math.nan
        if isinstance(err, ConfigError):
            exit_with(err)
        raise
    if rank_zero_only.rank != 0:  # under DDP, every process runs this; one writes the record
        return math.nan
    write_json(metrics_path, record)
    rich.print({k: v for k, v in record.items() if k != "grad_norms_at_start"})
    return record.get(cfg.optimized_metric, math.nan)


if __name__ == "__main__":
    main()
