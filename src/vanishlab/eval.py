"""Test a checkpoint on its run's test split: `python -m vanishlab.eval ckpt_path=...`.

The checkpoint's run directory holds the config it was trained with (`.hydra/config.yaml`);
that config rebuilds the same data module and network, then Lightning restores the weights.
Data settings given on the command line (`data.batch_size=1000`, `data=fashion_mnist`) replace
the run's own, and the record lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import rich
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vanishlab import ConfigError, exit_with
from vanishlab.config import CONFIG_DIR, check_ckpt_path
from vanishlab.results import write_json
from vanishlab.train import build, scalars, test_split_evidence


def run_config(ckpt_path: Path) -> DictConfig:
    """The training config saved by Hydra in the checkpoint's run directory."""
    for run_dir in ckpt_path.parents:
        saved = run_dir / ".hydra" / "config.yaml"
        if saved.is_file():
            return OmegaConf.load(saved)
    raise ConfigError(
        f"ckpt_path={str(ckpt_path)!r} is not inside a vanishlab run directory: no "
        f".hydra/config.yaml was found above it. Fix: pass a checkpoint from outputs/runs/... "
        f"or outputs/sweeps/..., e.g. ckpt_path=outputs/runs/<date>/<time>/checkpoints/last.ckpt."
    )


def data_overrides() -> list[Override]:
    """The command line's overrides of the data config (`data=...`, `data.<key>=...`)."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o for o in parsed if o.key_or_group.split(".")[0] == "data"]


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    if cfg.ckpt_path is None:
        raise ConfigError(
            "ckpt_path is not set: eval tests one checkpoint. Fix: pass "
            "ckpt_path=<run>/checkpoints/last.ckpt (or best.ckpt), e.g. "
            "python -m vanishlab.eval ckpt_path=outputs/runs/<date>/<time>/checkpoints/last.ckpt."
        )
    check_ckpt_path(cfg.ckpt_path)
    ckpt_path = Path(cfg.ckpt_path).expanduser().resolve()
    run_cfg = run_config(ckpt_path)
    run_cfg.paths = cfg.paths  # this evaluation's own output directory and data directory
    if run_cfg.seed is None:  # a seed=null run: its data module needs a seed, the test split none
        run_cfg.seed = 0
    overrides = data_overrides()
    for override in overrides:
        if override.key_or_group == "data":  # another data option: whole, with its keys as given
            run_cfg.data = cfg.data
            break
        key = override.key_or_group
        OmegaConf.update(run_cfg, key, OmegaConf.select(cfg, key), force_add=True)
    datamodule, module = build(run_cfg)
    datamodule.prepare_data()
    trainer = instantiate(run_cfg.trainer, devices=1, logger=False)
    metrics = trainer.test(module, datamodule=datamodule, ckpt_path=str(ckpt_path), verbose=False)
    return {
        "ckpt_path": str(ckpt_path),
        "data_overrides": [o.input_line for o in overrides],
        **scalars(metrics[0], "test/"),
        **test_split_evidence(module, datamodule),
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
