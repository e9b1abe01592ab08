"""Every option of every config group composes and builds: discovered from conf/, so a new
YAML file is tested without editing this file."""

from __future__ import annotations

import pytest
import torch

from conftest import FAST, compose_config
from vanishlab import ConfigError
from vanishlab.config import CONFIG_DIR
from vanishlab.losses import mean_loss
from vanishlab.train import build, build_trainer

GROUPS = sorted(
    p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name not in {"hydra", "paths"}
)
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((CONFIG_DIR / group).glob("*.yaml"))]


def test_every_group_has_options() -> None:
    assert {"data", "model", "init", "loss", "optimizer", "trainer", "experiment"} <= set(GROUPS)
    assert len(OPTIONS) >= 25


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_builds(group, option, request, tmp_path) -> None:
    data = request.getfixturevalue("preset_data" if group == "experiment" else "tiny_data")
    cfg = compose_config([*FAST, f"{group}={option}"], data, tmp_path)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer.accelerator='gpu'"):
            build(cfg)
        return
    datamodule, module = build(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    loss = mean_loss(module.loss_fn, module(x), y)
    assert torch.isfinite(loss) and loss.ndim == 0
    build_trainer(cfg)
