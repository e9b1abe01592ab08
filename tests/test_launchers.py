"""vanishlab's launchers under Hydra's own launcher test suites, as Hydra's launcher plugins run
them: they run whatever task function Hydra hands them, each job in its own directory with its
own config and return value. (Training in stacks: tests/test_stack.py and tests/test_sweeps.py.)
A vanishlab sweep composes each job's config once, and one that does not compose stops it
before any job runs, as Hydra's basic sweeper makes sure.

The suites' apps have their own configs; `hydra.searchpath` lets them find vanishlab's launcher
configs, as it lets a user's app."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hydra.core.singleton import Singleton
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from hydra.version import VersionBase

from conftest import FAST, records, sweep

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
