"""vanishlab installed from its wheel, as a user without the checkout has it: the console scripts
run from any directory, the configs come from the package, results land under that directory's
./outputs, and Hydra finds vanishlab's SLURM launcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import FAST, REPO_ROOT
from vanishlab.results import (
    STATUS,
)

pytestmark = pytest.mark.slow  # builds and installs a wheel, then runs the command line


@pytest.fixture(scope="module")
def env_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `bin/` of a fresh venv that holds vanishlab's wheel and nothing else: a .pth lends it
    the site-packages directories on this interpreter's path for the dependencies; their own
    .pth files (an editable install's among them) do not run, so the checkout is not on its path."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"  # the build's inputs, so that setuptools' build/ stays out of the repo
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "conf"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]
    wheels = tmp / "wheels"
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)]
    subprocess.run(build, check=True, capture_output=True)
    env = tmp / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    Path(purelib, "deps.pth").write_text("\n".join(deps) + "\n")
    (wheel,) = wheels.glob("vanishlab-*.whl")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True)
    return env / "bin"


def run(env_bin: Path, cwd: Path, *args: str, data_dir: Path) -> subprocess.CompletedProcess:
    """A command of the venv, run from `cwd`, with nothing of the checkout on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"DATA_DIR": str(data_dir)}
    return subprocess.run(
        [str(env_bin / args[0]), *args[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_vanishlab_and_its_configs_come_from_the_venv(env_bin, tiny_data, tmp_path) -> None:
    code = "import vanishlab.config as c; print(c.__file__); print(c.CONFIG_DIR)"
    result = run(env_bin, tmp_path, "python", "-c", code, data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    module, config_dir = map(Path, result.stdout.split())
    env = env_bin.parent
    assert module.is_relative_to(env) and config_dir.is_relative_to(env), result.stdout
    assert (config_dir / "train.yaml").is_file() and (
        config_dir / "paths" / "default.yaml"
    ).is_file()


def test_console_scripts_train_sweep_and_report_under_the_cwd(env_bin, tiny_data, tmp_path):
    result = run(env_bin, tmp_path, "vanishlab-train", *FAST, data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.glob("outputs/runs/*/*")
    assert json.loads((run_dir / "metrics.json").read_text())[STATUS] == "completed"
    assert (run_dir / "train.log").is_file()  # the job is named `train`, as with python -m

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    result = run(env_bin, tmp_path, "vanishlab-eval", f"ckpt_path={ckpt}", data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    (eval_dir,) = tmp_path.glob("outputs/evals/*/*")
    assert "test/acc" in json.loads((eval_dir / "metrics.json").read_text())

    result = run(
        env_bin, tmp_path, "vanishlab-train", "-m", *FAST, "model.depth=1,2", data_dir=tiny_data
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = tmp_path.glob("outputs/sweeps/*/*")
    records = [json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")]
    assert [r[STATUS] for r in records] == ["completed", "completed"]

    result = run(env_bin, tmp_path, "vanishlab-report", data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    report = sweep_dir / "report" / "report.md"
    assert result.stdout.strip() == str(report) and report.is_file()


def test_hydra_discovers_the_slurm_launcher_of_the_wheel(env_bin, tiny_data, tmp_path) -> None:
    code = (
        "import inspect\n"
        "from hydra.core.plugins import Plugins\n"
        "from hydra.plugins.launcher import Launcher\n"
        "for c in Plugins.instance().discover(Launcher):\n"
        "    print(f'{c.__module__}.{c.__name__}', inspect.getfile(c))\n"
    )
    result = run(env_bin, tmp_path, "python", "-c", code, data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    launchers = dict(line.split() for line in result.stdout.splitlines())
    plugin = Path(launchers["hydra_plugins.vanishlab_launchers.SlurmLauncher"])
    assert plugin.is_relative_to(env_bin.parent)
