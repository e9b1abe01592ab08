"""What a sweep varies: one rule for job names (`sweep`), the HParams table's marked columns
(`hparams`) and the report's columns (`vanishlab.report`).

A sweep varies the keys it names itself (its command line's sweep overrides and its sweeper's
params, saved as the sweep starts in `varied.json`) and the keys whose values differ between its
jobs without following from another key that varies. A key follows from another when
- it belongs to a config group whose option varies: `init=normal,kaiming_normal` brings
  `init.std` (normal's) and `init.nonlinearity` (kaiming's), which differ only because `init`
  does; or
- it copies another: `data.seed` reads `${seed}`, so its value is the seed's in every job (of
  keys with the same values in every job, the shortest name stays).
A key the sweep names itself varies even where it also follows from another
(`init=normal init.std=0.5,1`, or `model=mlp,resnet model.depth=2,8`). Keys that only say where
a job writes (`paths.*`, `hydra.*`, each job's own directories) never vary.

Job names hold the named keys alone: a job's directory is named before the other jobs' configs
exist. The HParams table and the report read every job's config, so they apply the whole rule,
and where a sweep named nothing (no `varied.json`: one run, or a sweep from before it was saved)
the keys that differ and follow from no other.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

VARIED_FILE = "varied.json"
# Keys that say where a job writes: each job has its own, and none changes a result.
WHERE_KEYS = ("paths", "hydra")
PER_JOB_DIRS = ("output_dir", "dirpath", "save_dir", "default_root_dir")


def named_keys(config: DictConfig) -> list[str]:
    """The keys a sweep names itself: its command line's sweep overrides (`model.depth=1,2`,
    `seed=range(4)`, `optimizer.lr=interval(1e-3,1)`) and its sweeper's params; a group's choice
    by the group's name (`init`)."""
    params = config.hydra.sweeper.get("params") or {}
    overrides = [*config.hydra.overrides.task, *(f"{k}={v}" for k, v in params.items())]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return sorted({o.key_or_group for o in parsed if o.is_sweep_override()})


def save_named_keys(sweep_dir: Path, config: DictConfig) -> None:
    """Save the keys the sweep names as it starts; a re-run sweep keeps its first ones, so its
    jobs keep their names."""
    path = sweep_dir / VARIED_FILE
    if not path.is_file():
        path.write_text(json.dumps(named_keys(config)) + "\n")


def read_named_keys(sweep_dir: Path) -> list[str] | None:
    """The keys the sweep in `sweep_dir` named itself; None where it saved none."""
    path = sweep_dir / VARIED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def group(key: str) -> str:
    """The key a group's option goes by: `init._target_` is `init` (a table's `init` column
    already is)."""
    return key.removesuffix("._target_")


def varied_keys(configs: list[dict[str, Any]], named: Collection[str] | None = None) -> list[str]:
    """The keys of `configs` (the jobs' dotted keys) that the sweep varies (rule: module
    docstring), in the order the configs have them. A key only some jobs have differs; `named`
    are the keys the sweep named itself (`read_named_keys`), None where it named none."""
    named = set(named or ())
    differing = [
        key
        for key in dict.fromkeys(key for config in configs for key in config)
        if key.split(".")[0] not in WHERE_KEYS
        and not any(part in key for part in PER_JOB_DIRS)
        and len({repr(config.get(key, ...)) for config in configs}) > 1
    ]
    own = [
        key
        for key in differing
        if not any(key != other and key.startswith(f"{group(other)}.") for other in differing)
    ]
    originals: dict[tuple[str, ...], str] = {}
    for key in sorted(own, key=lambda key: (len(key), key)):
        originals.setdefault(tuple(repr(config.get(key, ...)) for config in configs), key)
    kept = set(originals.values())
    return [key for key in differing if key in kept or group(key) in named]
