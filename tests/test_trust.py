"""What a checkpoint's config may make `vanishlab.eval` run: the rule on the objects its
`_target_`s name (`vanishlab.trust`), and doctored checkpoints that must run nothing.

Each doctored checkpoint's code would leave a file behind (or delete one) if it ran. Hydra's own
blocklist stops a few names (`os.system`, `subprocess.*`, `shutil.rmtree`), so these name code
it lets through (`pathlib.Path`'s methods, `os.mkdir`): only vanishlab's check stands in the way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import vanishlab.data
import vanishlab.trust
from conftest import FAST, run_cli
from vanishlab import ConfigError
from vanishlab.config import CONFIG_DIR
from vanishlab.eval import BUILT, run_config
from vanishlab.trust import allowed_modules, check_targets, refusal, resolve, targets

ALLOWED = allowed_modules(BUILT, [])


@pytest.mark.parametrize(
    "target",
    ["torch.optim.SGD", "torch.optim.lr_scheduler.StepLR", "vanishlab.nets.MLP", "torch.nn.Linear"],
)
def test_a_trusted_modules_classes_and_functions_are_allowed(target: str) -> None:
    assert refusal(target, ALLOWED) is None


def test_every_option_of_the_built_config_groups_is_allowed() -> None:
    named = []
    for group in BUILT:
        for path in (CONFIG_DIR / group).glob("*.yaml"):
            named += [t for _, t in targets(OmegaConf.to_container(OmegaConf.load(path)))]
    assert len(named) > 20
    assert [target for target in named if refusal(target, ALLOWED) is not None] == []


@pytest.mark.parametrize(
    ("target", "why", "fix"),
    [
        (
            "torch.nn.modules.module.torch.save",
            "is torch.serialization.save, and module torch.serialization is not trusted",
            "trust=[torch.serialization]",
        ),
        (
            "vanishlab.data.Path.write_text",
            "is Path.write_text of module pathlib, not a top-level class or function",
            "pass a checkpoint a vanishlab run wrote",
        ),
        ("vanishlab.data.Path", "is pathlib.Path, and module pathlib is not trusted", "[pathlib]"),
        (
            "vanishlab.data.datasets.utils.os.system",
            f"is {os.system.__module__}.system, and module {os.system.__module__} is not trusted",
            f"trust=[{os.system.__module__}]",
        ),
        ("vanishlab.data", "is a module, not a class or function", "pass a checkpoint"),
        ("vanishlab.nets.NoSuchNet", "names nothing: vanishlab.nets has no NoSuchNet", "pass a"),
        ("print", "is not the dotted name (module.name) of a class or function", "pass a"),
    ],
)
def test_what_a_name_finds_outside_the_rule_is_refused(target: str, why: str, fix: str) -> None:
    refused = refusal(target, ALLOWED)
    assert refused is not None and why in refused.why and fix in refused.fix


def test_an_object_that_passes_for_a_trusted_modules_own_is_refused(monkeypatch) -> None:
    def impostor() -> None: ...

    impostor.__module__, impostor.__qualname__ = "vanishlab.losses", "mse"  # as functools.wraps
    monkeypatch.setattr(vanishlab.data, "impostor", impostor, raising=False)
    refused = refusal("vanishlab.data.impostor", ALLOWED)
    assert refused is not None and "is not what its module vanishlab.losses exports as mse" in (
        refused.why
    )


def test_finding_a_target_imports_no_module_outside_the_trusted_ones(tmp_path, monkeypatch) -> None:
    """Importing a module runs its code: each of these modules leaves a file when imported."""
    assert "json.tool" not in sys.modules
    canary = tmp_path / "imported"
    leaves_a_file = f"open({str(canary)!r}, 'w').close()\n"
    (tmp_path / "untrusted_canary_xyz.py").write_text(leaves_a_file)
    package = tmp_path / "canary_package_xyz"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "trusted.py").write_text("import canary_package_xyz\n\n\ndef f(): ...\n")
    (package / "untrusted.py").write_text(leaves_a_file)
    monkeypatch.syspath_prepend(str(tmp_path))
    allowed = allowed_modules(BUILT, ["canary_package_xyz.trusted"])
    assert refusal("canary_package_xyz.trusted.f", allowed) is None
    for target in (
        "untrusted_canary_xyz.f",
        "some_never_imported_module_xyz.f",
        "json.tool.main",
        "canary_package_xyz.untrusted.f",
        # walks from the trusted module to its package, then to a submodule not imported yet
        "canary_package_xyz.trusted.canary_package_xyz.untrusted.f",
    ):
        refused = refusal(target, allowed)
        assert refused is not None and "is not trusted" in refused.why, target
    assert not canary.exists()
    imported = {"untrusted_canary_xyz", "some_never_imported_module_xyz", "json.tool"}
    assert not imported & set(sys.modules) and "canary_package_xyz.untrusted" not in sys.modules


def test_the_trusted_modules_are_read_from_the_config_groups(tmp_path, monkeypatch) -> None:
    """A new option is trusted as it is added, with no list to edit."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "fraction.yaml").write_text("_target_: fractions.Fraction\n")
    monkeypatch.setattr(vanishlab.trust, "CONFIG_DIR", tmp_path)
    allowed = allowed_modules(["model"], [])
    assert allowed == ("fractions", "torch.nn", "torch.optim")
    assert refusal("fractions.Fraction", allowed) is None
    assert refusal("fractions.Fraction", ALLOWED) is not None


def test_check_targets_names_a_nested_targets_key_and_the_fix() -> None:
    config = {"seed": 0, "data": {"_target_": "vanishlab.data.MNISTDataModule"}}
    config["model"] = {"_target_": "vanishlab.nets.MLP", "_args_": [1, {"_target_": "os.mkdir"}]}
    with pytest.raises(ConfigError, match=r"'os.mkdir' at model\._args_\[1\].*trust=\[os\]"):
        check_targets(config, ALLOWED, "the config")


def test_the_config_is_resolved_by_omegaconfs_own_resolvers_only() -> None:
    calls = []
    OmegaConf.register_new_resolver("canary_resolver_xyz", lambda: calls.append(1))
    try:
        with pytest.raises(ConfigError, match="does not resolve with OmegaConf's own resolvers"):
            resolve(OmegaConf.create({"a": "${canary_resolver_xyz:}"}), "the config")
        assert not calls and OmegaConf.has_resolver("canary_resolver_xyz")  # kept for others
    finally:
        OmegaConf.clear_resolver("canary_resolver_xyz")
    made = resolve(OmegaConf.create({"a": "${oc.create:{b: 1}}", "c": "${a.b}"}), "the config")
    assert made == {"a": {"b": 1}, "c": 1}


def test_the_command_lines_data_settings_resolve_nothing_of_the_run(tmp_path) -> None:
    """They replace the run's values: merged into them, they would resolve the run's
    interpolations with every resolver this process has."""
    calls = []
    OmegaConf.register_new_resolver("canary_resolver_xyz", lambda: calls.append(1))
    setting = "+data.extra={k: 2}"
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("eval", overrides=[setting, f"paths.output_dir={tmp_path}"])
        saved = {"data": {"extra": {"k": "${canary_resolver_xyz:}"}}, "seed": 0}
        overrides = OverridesParser.create().parse_overrides([setting])
        run_cfg = run_config(cfg, saved, overrides)
    finally:
        OmegaConf.clear_resolver("canary_resolver_xyz")
    assert not calls and run_cfg.data.extra == {"k": 2}


@pytest.fixture(scope="module")
def checkpoint(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine checkpoint of a quick run, for the tests to doctor."""
    run_dir = tmp_path_factory.mktemp("trust") / "run"
    result = run_cli("vanishlab.train", *FAST, f"hydra.run.dir={run_dir}", data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


def evaluate_doctored(
    checkpoint: Path,
    tmp_path: Path,
    tiny_data: Path,
    doctor: Callable[[dict[str, Any]], None],
    *args: str,
) -> subprocess.CompletedProcess:
    """Evaluate a copy of `checkpoint` whose saved config `doctor` changed, into tmp_path/eval."""
    ckpt_path, run_dir = tmp_path / "doctored.ckpt", tmp_path / "eval"
    doctored = torch.load(checkpoint, weights_only=True)
    doctor(doctored["hyper_parameters"]["config"])
    torch.save(doctored, ckpt_path)
    return run_cli(
        "vanishlab.eval",
        f"ckpt_path={ckpt_path}",
        *args,
        f"hydra.run.dir={run_dir}",
        data_dir=tiny_data,
    )


def assert_refused(result: subprocess.CompletedProcess, tmp_path: Path, *phrases: str) -> None:
    """The one-paragraph error, with `phrases` in it, and no record written."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Error: " in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "eval" / "metrics.json").exists()


def a_path(path: Path) -> dict[str, Any]:
    """A config node that makes a `pathlib.Path`, through the trusted module that imports it."""
    return {"_target_": "vanishlab.data.Path", "_args_": [str(path)]}


@pytest.mark.slow
def test_a_method_reached_through_a_trusted_module_writes_no_file(
    checkpoint, tmp_path, tiny_data
) -> None:
    canary = tmp_path / "written"

    def doctor(config: dict[str, Any]) -> None:
        config["data"] = {
            "_target_": "vanishlab.data.Path.write_text",
            "_args_": [a_path(canary), "ran"],
        }

    result = evaluate_doctored(checkpoint, tmp_path, tiny_data, doctor)
    assert_refused(
        result,
        tmp_path,
        "_target_: 'vanishlab.data.Path.write_text' at data,",
        "not a top-level class or function",
    )
    assert not canary.exists()


@pytest.mark.slow
def test_a_method_reached_through_a_trusted_module_deletes_no_file(
    checkpoint, tmp_path, tiny_data
) -> None:
    kept = tmp_path / "kept.txt"
    kept.write_text("mine")

    def doctor(config: dict[str, Any]) -> None:
        config["data"] = {"_target_": "vanishlab.data.Path.unlink", "_args_": [a_path(kept)]}

    result = evaluate_doctored(checkpoint, tmp_path, tiny_data, doctor)
    assert_refused(result, tmp_path, "_target_: 'vanishlab.data.Path.unlink' at data,")
    assert kept.read_text() == "mine"


@pytest.mark.slow
def test_a_function_walked_to_from_a_trusted_module_does_not_run(
    checkpoint, tmp_path, tiny_data
) -> None:
    canary = tmp_path / "made"

    def doctor(config: dict[str, Any]) -> None:
        target = "vanishlab.data.datasets.utils.os.mkdir"  # torchvision's utils import os
        config["data"] = {"_target_": target, "_args_": [str(canary)]}

    result = evaluate_doctored(checkpoint, tmp_path, tiny_data, doctor)
    module = os.mkdir.__module__
    assert_refused(
        result,
        tmp_path,
        "_target_: 'vanishlab.data.datasets.utils.os.mkdir' at data,",
        f"is {module}.mkdir, and module {module} is not trusted",
        f"trust=[{module}]",
    )
    assert not canary.exists()


@pytest.mark.slow
def test_a_target_in_the_seed_does_not_run(checkpoint, tmp_path, tiny_data) -> None:
    """`seed` is no group `build` instantiates, but `data.seed: ${seed}` would make it one."""
    canary = tmp_path / "made"

    def doctor(config: dict[str, Any]) -> None:
        config["seed"] = {"_target_": "os.mkdir", "_args_": [str(canary)]}

    result = evaluate_doctored(checkpoint, tmp_path, tiny_data, doctor)
    assert_refused(result, tmp_path, "_target_: 'os.mkdir' at data.seed,", "trust=[os]")
    assert not canary.exists()


@pytest.mark.slow
def test_a_target_made_by_an_interpolation_does_not_run(checkpoint, tmp_path, tiny_data) -> None:
    canary = tmp_path / "made"

    def doctor(config: dict[str, Any]) -> None:
        made = f"${{oc.create:{{_target_: os.mkdir, _args_: ['{canary}']}}}}"
        config["data"]["download"] = made

    result = evaluate_doctored(checkpoint, tmp_path, tiny_data, doctor)
    assert_refused(result, tmp_path, "_target_: 'os.mkdir' at data.download,", "trust=[os]")
    assert not canary.exists()


@pytest.mark.slow
def test_a_value_escaped_to_resolve_once_more_does_not_run(checkpoint, tmp_path, tiny_data) -> None:
    """Resolved once, `\\${...}` reads `${...}`: an interpolation again, if it were built."""
    canary = tmp_path / "made"

    def doctor(config: dict[str, Any]) -> None:
        made = f"\\${{oc.create:{{_target_: os.mkdir, _args_: ['{canary}']}}}}"
        config["data"]["download"] = made

    result = evaluate_doctored(checkpoint, tmp_path, tiny_data, doctor)
    assert_refused(result, tmp_path, "at data.download, which still reads as an interpolation")
    assert not canary.exists()


@pytest.mark.slow
def test_a_resolver_that_is_not_omegaconfs_is_refused(checkpoint, tmp_path, tiny_data) -> None:
    """Hydra's and vanishlab's resolvers are this process's, not the checkpoint's to call."""

    def doctor(config: dict[str, Any]) -> None:
        config["model"]["activation"] = "${now:relu}"  # strftime("relu") == "relu"

    result = evaluate_doctored(checkpoint, tmp_path, tiny_data, doctor)
    assert_refused(result, tmp_path, "does not resolve with OmegaConf's own resolvers (oc.*)")


@pytest.mark.slow
def test_a_trusted_module_that_cannot_be_imported_is_named(checkpoint, tmp_path, tiny_data) -> None:
    def doctor(config: dict[str, Any]) -> None:
        config["model"] = {"_target_": "mynets_elsewhere.OneHidden", "width": 32}

    result = evaluate_doctored(checkpoint, tmp_path, tiny_data, doctor, "trust=[mynets_elsewhere]")
    assert_refused(
        result,
        tmp_path,
        "the module mynets_elsewhere given in trust=[...] cannot be imported: it is not on "
        "Python's path",
        "Fix: run from the directory that holds it, or add that directory to PYTHONPATH.",
    )
    assert "give it only the keys" not in result.stderr
