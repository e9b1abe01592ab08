"""vanishlab's launchers under Hydra's own launcher test suites, as Hydra's launcher plugins run
them: they run whatever task function Hydra hands them, each job in its own directory with its
own config and return value. (Training in stacks: tests/test_stack.py and tests/test_sweeps.py.)

The suites' apps have their own configs; `hydra.searchpath` lets them find vanishlab's launcher
configs, as it lets a user's app."""

from __future__ import annotations

import pytest
from hydra.core.singleton import Singleton
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from hydra.version import VersionBase

SEARCHPATH = "hydra.searchpath=[pkg://vanishlab.conf]"


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
