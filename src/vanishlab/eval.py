"""Test a checkpoint on its run's test split: `python -m vanishlab.eval ckpt_path=...`.

A checkpoint describes itself: it holds the composed config its run was built from, so it can be
evaluated wherever it was copied to. That config rebuilds the same data module and network, and
the weights are loaded into it. Data settings given on the command line (`data.batch_size=1000`,
`data=fashion_mnist`) replace the run's own, and the record lists them.

A checkpoint may come from someone else, so loading it runs none of its code: the file is read
with `weights_only=True` (tensors and plain containers, no pickled objects), and the `_target_`s
of its config are instantiated only if they name a module that vanishlab's config groups point
into (`TRUSTED`) or one the user names with `trust=[module,...]`; any other is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import rich
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vanishlab import ConfigError, exit_with
from vanishlab.config import CONFIG_DIR, check_ckpt_path
from vanishlab.diagnostics import evidence_on_test_split
from vanishlab.results import write_json
from vanishlab.train import build, scalars

# What a checkpoint's config may name: the modules vanishlab's groups point into, and torch's
# layers and optimizers (not all of torch: `torch.hub.load` fetches and runs code).
TRUSTED = (
    "vanishlab.data",
    "vanishlab.nets",
    "vanishlab.init",
    "vanishlab.losses",
    "torch.nn",
    "torch.optim",
)
BUILT = ("data", "model", "init", "loss", "optimizer", "scheduler")  # what `build` instantiates


def read_checkpoint(ckpt_path: Path) -> dict[str, Any]:
    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"ckpt_path={str(ckpt_path)!r} cannot be read as weights only ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}); it was not loaded further, as it may hold code. Fix: "
            f"pass a checkpoint a vanishlab run wrote (<run>/checkpoints/last.ckpt)."
        ) from None


def targets(node: Any) -> list[str]:
    """Every `_target_` anywhere in a config container."""
    if isinstance(node, dict):
        own = [node["_target_"]] if "_target_" in node else []
        return own + [t for value in node.values() for t in targets(value)]
    if isinstance(node, list):
        return [t for value in node for t in targets(value)]
    return []


def check_targets(config: dict[str, Any], trust: list[str], ckpt_path: Path) -> None:
    """Refuse a config that would instantiate anything outside `TRUSTED` and `trust`."""
    trusted = (*TRUSTED, *trust)
    for target in targets(config):
        if not any(str(target) == t or str(target).startswith(f"{t}.") for t in trusted):
            module = str(target).rsplit(".", 1)[0]
            raise ConfigError(
                f"the config inside ckpt_path={str(ckpt_path)!r} names _target_: {target!r}, "
                f"which is not vanishlab's or torch's, so it was not run (a checkpoint from "
                f"someone else could name any code). Fix: if you trust that code, name its "
                f"module: python -m vanishlab.eval ckpt_path=... trust=[{module}]."
            )


def data_overrides() -> list[Override]:
    """The command line's overrides of the data config (`data=...`, `data.<key>=...`)."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o for o in parsed if o.key_or_group.split(".")[0] == "data"]


def run_config(cfg: DictConfig, saved: dict[str, Any], overrides: list[Override]) -> DictConfig:
    """The run's config as saved, with this evaluation's paths and trainer and the command
    line's data overrides; only the parts `build` instantiates are kept."""
    run_cfg = OmegaConf.create({key: saved[key] for key in (*BUILT, "seed") if key in saved})
    run_cfg.paths, run_cfg.trainer = cfg.paths, cfg.trainer
    if run_cfg.get("seed") is None:  # a seed=null run: its data module needs a seed, tests none
        run_cfg.seed = 0
    for override in overrides:
        if override.key_or_group == "data":  # another data option: whole, with its keys as given
            run_cfg.data = cfg.data
            break
        key = override.key_or_group
        OmegaConf.update(run_cfg, key, OmegaConf.select(cfg, key), force_add=True)
    return run_cfg


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    if cfg.ckpt_path is None:
        raise ConfigError(
            "ckpt_path is not set: eval tests one checkpoint. Fix: pass "
            "ckpt_path=<run>/checkpoints/last.ckpt (or best.ckpt), e.g. "
            "python -m vanishlab.eval ckpt_path=outputs/runs/<date>/<time>/checkpoints/last.ckpt."
        )
    check_ckpt_path(cfg.ckpt_path)
    ckpt_path = Path(cfg.ckpt_path).expanduser().resolve()
    checkpoint = read_checkpoint(ckpt_path)
    saved = checkpoint.get(pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY, {}).get("config")
    if not isinstance(saved, dict):
        raise ConfigError(
            f"ckpt_path={str(ckpt_path)!r} holds no config (hyper_parameters.config), so its "
            f"network cannot be rebuilt: it was not written by this version of vanishlab. Fix: "
            f"pass a checkpoint of a run trained with it, or train the run again."
        )
    check_targets({key: saved.get(key) for key in BUILT}, list(cfg.trust), ckpt_path)
    overrides = data_overrides()
    run_cfg = run_config(cfg, saved, overrides)
    datamodule, module = build(run_cfg)
    module.load_state_dict(checkpoint["state_dict"])
    datamodule.prepare_data()
    trainer = instantiate(cfg.trainer, devices=1, logger=False)
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)
    return {
        "ckpt_path": str(ckpt_path),
        "data_overrides": [o.input_line for o in overrides],
        **scalars(metrics[0], "test/"),
        **evidence_on_test_split(module, datamodule),
    }


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        record = evaluate(cfg)
    except ConfigError as err:
        exit_with(err)
    write_json(Path(cfg.paths.output_dir) / "metrics.json", record)
    rich.print(record)


if __name__ == "__main__":
    main()
