"""Test a checkpoint on its run's test split: `python -m vanishlab.eval ckpt_path=...`.

A checkpoint describes itself: it holds the composed config its run was built from, so it can be
evaluated wherever it was copied to. That config rebuilds the same data module and network, and
the weights are loaded into it. Data settings given on the command line (`data.batch_size=1000`,
`data=fashion_mnist`) replace the run's own, and the record lists them.

A checkpoint may come from someone else, so loading it runs none of its code: the file is read
with `weights_only=True` (tensors and plain containers, no pickled objects), and its config is
resolved once, with OmegaConf's own resolvers only (`oc.*`), into plain values. Every `_target_`
anywhere in that resolved config is checked by the object it names, not by its spelling
(`vanishlab.trust`): a top-level class or function, the very one its module exports under that
name, defined in a module vanishlab's config groups point into, in torch.nn or torch.optim, or in
one the user names with `trust=[module,...]`; finding it imports no other module. Any other is
refused before anything is built, and exactly the config checked is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import rich
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vanishlab import ConfigError, exit_with
from vanishlab.checkpoints import read_checkpoint
from vanishlab.config import CONFIG_DIR, check_ckpt_path
from vanishlab.diagnostics import evidence_on_test_split
from vanishlab.results import write_json
from vanishlab.train import build, scalars
from vanishlab.trust import allowed_modules, check_targets, resolve

BUILT = ("data", "model", "init", "loss", "optimizer", "scheduler")  # what `build` instantiates
EVALUATION = ("paths", "trainer")  # this evaluation's own, from its command line: trusted


def data_overrides() -> list[Override]:
    """The command line's overrides of the data config (`data=...`, `data.<key>=...`)."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o for o in parsed if o.key_or_group.split(".")[0] == "data"]


def run_config(cfg: DictConfig, saved: dict[str, Any], overrides: list[Override]) -> DictConfig:
    """The run's config as saved (the parts `build` instantiates, and `seed`), with this
    evaluation's paths and trainer and the command line's data overrides. Nothing of the run's
    is resolved here (`vanishlab.trust.resolve` does that once); this evaluation's paths and
    trainer are, as they may read Hydra's runtime (`${hydra:runtime.output_dir}`), so that the
    run's part needs no resolver but OmegaConf's own."""
    run = {key: saved[key] for key in (*BUILT, "seed") if key in saved}
    if run.get("seed") is None:  # a seed=null run: its data module needs a seed, tests none
        run["seed"] = 0
    evaluation = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in EVALUATION}
    run_cfg = OmegaConf.create({**run, **evaluation})
    for override in overrides:
        if override.key_or_group == "data":  # another data option: whole, with its keys as given
            run_cfg.data = cfg.data
            break
        key = override.key_or_group  # replaced, not merged: a merge resolves what it meets
        OmegaConf.update(run_cfg, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
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
    allowed = allowed_modules(BUILT, cfg.trust)
    source = f"the config inside ckpt_path={str(ckpt_path)!r}"
    overrides = data_overrides()
    run = resolve(run_config(cfg, saved, overrides), source)
    check_targets({k: v for k, v in run.items() if k not in EVALUATION}, allowed, source)
    datamodule, module = build(OmegaConf.create(run))
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
