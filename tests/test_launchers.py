"""vanishlab's launchers under Hydra's own launcher test suites, as Hydra's launcher plugins run
them: they run whatever task function Hydra hands them, each job in its own directory with its
own config and return value. (Training in stacks: tests/test_stack.py and tests/test_sweeps.py.)
A vanishlab sweep composes each job's config once (a large batch in forked workers, each
config as composing it in the launcher's process makes it), and one that does not compose stops
it before any job runs, as Hydra's basic sweeper makes sure.

The suites' apps have their own configs; `hydra.searchpath` lets them find vanishlab's launcher
configs, as it lets a user's app."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.singleton import Singleton
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from hydra.types import HydraContext, RunMode
from hydra.version import VersionBase
from omegaconf import Container, DictConfig, OmegaConf
from omegaconf.base import Node

from conftest import FAST, records, sweep
from hydra_plugins import vanishlab_launchers
from vanishlab.config import CONFIG_DIR

SEARCHPATH = "hydra.searchpath=[pkg://vanishlab.conf]"

# `python -m vanishlab.train`, but each composition of a sweep job's config (Hydra's
# `load_sweep_config`) is written down first, as a line of its overrides, in $COMPOSED.
COUNTING_COMPOSITIONS = """
import os
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from vanishlab.train import main

load = ConfigLoaderImpl.load_sweep_config

def load_counted(self, master_config, sweep_overrides):
    with open(os.environ["COMPOSED"], "a") as composed:
        composed.write(" ".join(sweep_overrides) + "\\n")
    return load(self, master_config, sweep_overrides)

ConfigLoaderImpl.load_sweep_config = load_counted
main()
"""


@pytest.fixture
def unspecified_version_base(hydra_restore_singletons) -> None:
    """The suite's apps name no `version_base`, and expect Hydra's defaults for that (a job runs
    in its own directory); the tests before them in this process set Hydra's version base to
    vanishlab's, "1.3". `hydra_restore_singletons` restores it after each test."""
    Singleton._instances.pop(VersionBase, None)


@pytest.mark.usefixtures("unspecified_version_base")
@pytest.mark.parametrize("launcher_name, overrides", [("stacked", [SEARCHPATH])])
class TestStackedLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [
        (
            {"defaults": [{"override hydra/job_logging": "disabled"}]},
            ["-m", "hydra/launcher=stacked", SEARCHPATH],
        )
    ],
)
class TestStackedLauncherIntegration(IntegrationTestSuite):
    pass


@pytest.mark.slow
def test_a_stacked_sweep_composes_each_jobs_config_once(tiny_data, tmp_path) -> None:
    composed = tmp_path / "composed.txt"
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "DATA_DIR": str(tiny_data), "COMPOSED": str(composed)}
    jobs = ["optimizer.lr=0.01,0.1", "seed=0,1"]
    args = ["-m", *FAST, *jobs, f"hydra.sweep.dir={sweep_dir}"]
    command = [sys.executable, "-c", COUNTING_COMPOSITIONS, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(records(sweep_dir)) == 4
    counts = Counter(composed.read_text().splitlines())
    assert len(counts) == 4 and set(counts.values()) == {1}, counts


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["hydra/launcher=basic", "hydra/launcher=stacked"])
def test_a_job_that_does_not_compose_stops_the_sweep_before_any_job_runs(
    tiny_data, tmp_path: Path, launcher: str
) -> None:
    result = sweep(tmp_path, tiny_data, "seed=0,1", "model=mlp,no_such_model", launcher)
    assert result.returncode != 0
    assert "no_such_model" in result.stderr
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no job directory


def own_flags(node: Node) -> list[dict[str, bool]]:
    """The flags (struct, readonly, ...) set on each node of a config, depth first."""
    flags = [dict(node._metadata.flags)]
    if isinstance(node, Container) and not (node._is_none() or node._is_interpolation()):
        keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
        flags += [f for key in keys for f in own_flags(node._get_node(key))]
    return flags


def comparable(config: DictConfig) -> tuple:
    """What a job's config is to the jobs: its values, flags and resolver cache."""
    return OmegaConf.to_yaml(config), own_flags(config), dict(OmegaConf.get_cache(config))


def test_a_large_batch_composes_in_forked_workers_as_in_the_launchers_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid = [[f"seed={seed}", f"optimizer.lr={lr}"] for lr in (0.1, 1) for seed in (0, 1)]
    jobs = [(overrides, 10 + i) for i, overrides in enumerate(grid)]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        overrides = [f"hydra.sweep.dir={tmp_path}"]
        config = loader.load_configuration("train", overrides, run_mode=RunMode.MULTIRUN)
        context = HydraContext(config_loader=loader, callbacks=None)
        here = [vanishlab_launchers.composed(context, config, job, f"id{job[1]}") for job in jobs]
        composing = tmp_path / "composing_pids.txt"
        compose = vanishlab_launchers.composed

        def composed_noting_its_process(*args) -> DictConfig:
            with composing.open("a") as pids:
                pids.write(f"{os.getpid()}\n")
            return compose(*args)

        monkeypatch.setattr(vanishlab_launchers, "composed", composed_noting_its_process)
        monkeypatch.setattr(vanishlab_launchers, "usable_cpus", lambda: 2)  # forks on 1 CPU too

        def composed_in_workers(jobs: list, job_id=str) -> list[DictConfig]:
            with vanishlab_launchers.forked_workers(context, config, None, len(jobs)) as pool:
                assert pool is not None
                return vanishlab_launchers.composed_all(context, config, jobs, job_id, pool)

        forked = composed_in_workers(jobs, lambda num: f"id{num}")
        pids = {int(pid) for pid in composing.read_text().split()}
        bad = (["model=no_such_model"], 12)
        with pytest.raises(Exception) as raised_here:
            compose(context, config, bad, "12")
        with pytest.raises(type(raised_here.value)) as raised_forked:
            composed_in_workers([*jobs[:2], bad, jobs[3]])
    assert pids and os.getpid() not in pids
    assert [comparable(c) for c in forked] == [comparable(c) for c in here]
    assert [(c.hydra.job.id, c.hydra.job.num) for c in forked] == [(f"id{n}", n) for _, n in jobs]
    assert str(raised_forked.value) == str(raised_here.value)


def test_a_large_batch_is_prepared_in_forked_workers_as_in_the_launchers_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`prepare_jobs` runs Hydra's `run_job` on the prepare step in the forked workers once
    every job has composed: the same returns and job directories as in the launcher's process,
    and the log files the stack logs into are the jobs' own."""
    jobs = [([f"seed={seed}"], seed) for seed in range(4)]
    preparing = tmp_path / "preparing_pids.txt"

    def prepare(cfg: DictConfig) -> int:
        with preparing.open("a") as pids:
            pids.write(f"{os.getpid()}\n")
        return cfg.seed

    def prepared(cpus: int) -> tuple[set[int], list]:
        preparing.unlink(missing_ok=True)
        monkeypatch.setattr(vanishlab_launchers, "usable_cpus", lambda: cpus)
        returns = vanishlab_launchers.prepare_jobs(context, config, prepare, jobs)
        return {int(pid) for pid in preparing.read_text().split()}, returns

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        overrides = [f"hydra.sweep.dir={tmp_path / 'sweep'}"]
        config = loader.load_configuration("train", overrides, run_mode=RunMode.MULTIRUN)
        context = HydraContext(config_loader=loader, callbacks=Callbacks())
        forked_pids, forked = prepared(cpus=2)
        here_pids, here = prepared(cpus=1)
        logs = [vanishlab_launchers.log_files(config, r) for r in forked]
    assert forked_pids and os.getpid() not in forked_pids and here_pids == {os.getpid()}
    for returns in forked, here:
        assert [(r.return_value, r.hydra_cfg.hydra.job.num) for r in returns] == [
            (s, s) for s in range(4)
        ]
    job_dirs = [Path(r.hydra_cfg.hydra.runtime.output_dir) for r in forked]
    assert all((d / ".hydra" / "config.yaml").is_file() for d in job_dirs)
    assert [[Path(h.baseFilename).parent for h in files] for files in logs] == [
        [d] for d in job_dirs
    ]
