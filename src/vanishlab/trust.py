"""What a checkpoint's config may make `vanishlab.eval` run: the rule for its `_target_`s.

A checkpoint may come from someone else, and its config names code: Hydra finds a `_target_`'s
object by importing the modules its dotted name starts with and walking attributes from there.
So a name that starts like a trusted module can still reach anything: `vanishlab.data.Path` is
pathlib's class and `vanishlab.data.Path.write_text` its method;
`vanishlab.data.datasets.utils.os.mkdir` is the os module's function. The rule is therefore about
the object a name finds, not about how it is spelt. An object is allowed only if it is

- a class or function at the top level of its module (no `.` in its `__qualname__`): a method
  such as `Path.unlink` acts on whatever object the config passes it;
- the very object its module exports under that name (`sys.modules[obj.__module__]` holds it
  as `obj.__qualname__`): `__module__` and `__qualname__` are writable, so this keeps an object
  from passing for a trusted module's;
- defined in an allowed module or below one: those vanishlab's own config groups point into
  (read from their YAML files, so a new option is trusted with no list to edit), torch's layers,
  optimizers and schedulers, and those the user names with `trust=[module,...]`.

Finding the object imports only modules that are allowed or below one, and their parent packages
(an import runs the module's code), and walks attributes with `inspect.getattr_static`, which
runs no code either (a module's `__getattr__` may import, a property computes).

The config checked must be the one instantiated, resolved once: an interpolation resolved later
(`${oc.create:{_target_: ...}}`, `${seed}` naming a node) would make targets after the check.
`resolve` does that once, with OmegaConf's own resolvers only (`oc.*`: none that Hydra or
vanishlab registered in this process, such as `hydra:` or `now:`), and refuses a value that
still reads as an interpolation (`\\${...}`, escaped, resolves to one).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.basecontainer import BaseContainer
from omegaconf.errors import OmegaConfBaseException

from vanishlab import ConfigError
from vanishlab.config import CONFIG_DIR

# Besides what vanishlab's options name: a run may name any of torch's layers, optimizers and
# learning-rate schedulers (torch.optim.lr_scheduler) on its command line, with no option file
# (optimizer._target_=torch.optim.AdamW). Not all of torch: `torch.hub.load` runs fetched code.
TORCH = ("torch.nn", "torch.optim")

# The fix when no `trust=[...]` would make a target runnable.
GENUINE_CHECKPOINT = (
    "pass a checkpoint a vanishlab run wrote (<run>/checkpoints/last.ckpt); its _target_s name "
    "classes and functions by their module and their own name (e.g. torch.optim.SGD)"
)


class Refusal(NamedTuple):
    """Why a `_target_` is not run, and what the user can do about it."""

    why: str
    fix: str


def nodes(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """Every value in a config container with its dotted key (`data._args_[0]`), the container
    itself first."""
    yield key, node
    if isinstance(node, dict):
        for name, value in node.items():
            yield from nodes(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from nodes(value, f"{key}[{index}]")


def targets(node: Any) -> Iterator[tuple[str, Any]]:
    """Every `_target_` in a config container, with the dotted key of the node that holds it."""
    for key, value in nodes(node):
        if isinstance(value, dict) and "_target_" in value:
            yield key, value["_target_"]


def within(name: str, modules: Iterable[str]) -> bool:
    """Whether module `name` is one of `modules` or below one (`torch.optim.sgd`, `torch.optim`)."""
    return any(name == module or name.startswith(f"{module}.") for module in modules)


def config_modules(groups: Iterable[str]) -> set[str]:
    """The modules the `_target_`s of vanishlab's own options in config `groups` point into
    (`vanishlab.nets.MLP` -> `vanishlab.nets`), read from `CONFIG_DIR`'s YAML files."""
    modules = set()
    for group in groups:
        for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
            option = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            modules.update(str(target).rpartition(".")[0] for _, target in targets(option))
    return modules


def allowed_modules(groups: Iterable[str], trust: Iterable[str]) -> tuple[str, ...]:
    """The modules whose classes and functions a checkpoint's config may name (less those below
    another): what vanishlab's `groups` point into, `TORCH`, and the user's `trust`. A trusted
    module that cannot be imported is reported as such, not later as a class that cannot be
    built."""
    trust = [str(module) for module in trust]
    for module in trust:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # its package is missing, or not a module name
            found = False
        if not found:
            raise ConfigError(
                f"the module {module} given in trust=[...] cannot be imported: it is not on "
                f"Python's path, so nothing it defines can be trusted or built. Fix: run from "
                f"the directory that holds it, or add that directory to PYTHONPATH."
            )
    modules = {*config_modules(groups), *TORCH, *trust}
    return tuple(sorted(m for m in modules if not within(m.rpartition(".")[0], modules)))


def untrusted(module: str, why: str, allowed: tuple[str, ...]) -> Refusal:
    """The refusal of code in `module`, which the user may choose to trust."""
    return Refusal(
        f"{why} (eval trusts {', '.join(allowed)}, and what trust=[...] names)",
        f"if you trust that code, name its module: python -m vanishlab.eval ckpt_path=... "
        f"trust=[{module}]",
    )


def not_imported(module: str, allowed: tuple[str, ...]) -> Refusal:
    why = f"would need module {module} imported to be found, and that module is not trusted"
    return untrusted(module, why, allowed)


def submodule(package: ModuleType, name: str, allowed: tuple[str, ...]) -> ModuleType | Refusal:
    """`package`'s submodule `name`, not imported yet: imported only if it is allowed."""
    module = f"{package.__name__}.{name}"
    if not within(module, allowed):
        return not_imported(module, allowed)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:  # it exists, but imports something missing: the user's to fix
            raise
        return Refusal(f"names nothing: there is no {module}", GENUINE_CHECKPOINT)


def find(target: str, allowed: tuple[str, ...]) -> Any | Refusal:
    """The object `target` names, found as Hydra finds it, but importing only `allowed` modules
    (and so their parent packages) and running no attribute lookup's code."""
    parts = target.split(".")
    start = next((n for n in range(1, len(parts) + 1) if within(".".join(parts[:n]), allowed)), 0)
    if not start:
        return not_imported(target.rpartition(".")[0], allowed)
    found = importlib.import_module(".".join(parts[:start]))
    for n in range(start, len(parts)):
        try:
            found = inspect.getattr_static(found, parts[n])
        except AttributeError:
            if inspect.getattr_static(found, "__path__", None) is None:  # not a package
                return Refusal(
                    f"names nothing: {'.'.join(parts[:n])} has no {parts[n]}", GENUINE_CHECKPOINT
                )
            found = submodule(found, parts[n], allowed)
            if isinstance(found, Refusal):
                return found
    return found


def refusal(target: Any, allowed: tuple[str, ...]) -> Refusal | None:
    """Why the object `target` names may not be run, or None if it may (the rule above)."""
    parts = target.split(".") if isinstance(target, str) else []
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        return Refusal(
            "is not the dotted name (module.name) of a class or function", GENUINE_CHECKPOINT
        )
    found = find(target, allowed)
    if isinstance(found, Refusal):
        return found
    if not (inspect.isclass(found) or inspect.isroutine(found)):
        return Refusal(f"is a {type(found).__name__}, not a class or function", GENUINE_CHECKPOINT)
    module, name = getattr(found, "__module__", None), getattr(found, "__qualname__", "")
    if "." in name:
        return Refusal(
            f"is {name} of module {module}, not a top-level class or function (a method acts "
            f"on whatever object the config passes it)",
            GENUINE_CHECKPOINT,
        )
    home = sys.modules.get(module) if isinstance(module, str) else None
    if home is None or inspect.getattr_static(home, name, None) is not found:
        return Refusal(
            f"is not what its module {module} exports as {name} (an object's __module__ and "
            f"__qualname__ can be set to anything)",
            GENUINE_CHECKPOINT,
        )
    if not within(module, allowed):
        return untrusted(module, f"is {module}.{name}, and module {module} is not trusted", allowed)
    return None


def check_targets(config: dict[str, Any], allowed: tuple[str, ...], source: str) -> None:
    """Refuse `config` (from `source`, for the paragraph) if any `_target_` anywhere in it names
    an object the rule does not allow; nothing is instantiated before every one has passed."""
    for key, target in targets(config):
        refused = refusal(target, allowed)
        if refused is not None:
            raise ConfigError(
                f"{source} names _target_: {target!r} at {key}, which {refused.why}; nothing "
                f"in the checkpoint was run (a checkpoint from someone else could name any "
                f"code). Fix: {refused.fix}."
            )


@contextmanager
def builtin_resolvers_only() -> Iterator[None]:
    """OmegaConf's own resolvers (`oc.*`) alone while the block runs; the registered ones after.

    `OmegaConf.clear_resolvers` leaves exactly OmegaConf's own in a new registry, so the old
    one, kept aside, is put back whole."""
    registered = BaseContainer._resolvers
    OmegaConf.clear_resolvers()
    try:
        yield
    finally:
        BaseContainer._resolvers = registered


def resolve(config: DictConfig, source: str) -> dict[str, Any]:
    """`config` resolved once, with OmegaConf's own resolvers only, as plain containers in which
    no interpolation is left: instantiating it resolves nothing more, so it can make no target
    that `check_targets` did not see."""
    try:
        with builtin_resolvers_only():
            resolved = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"{source} does not resolve with OmegaConf's own resolvers (oc.*), the only ones a "
            f"checkpoint's config may use: {str(err).splitlines()[0]}; nothing in it was run. "
            f"Fix: pass a checkpoint a vanishlab run wrote (<run>/checkpoints/last.ckpt)."
        ) from None
    for key, value in nodes(resolved):
        if isinstance(value, str) and "${" in value:  # an escaped \${...}: it would resolve again
            raise ConfigError(
                f"{source} holds {value!r} at {key}, which still reads as an interpolation once "
                f"resolved, and would be resolved again when built; nothing in it was run. Fix: "
                f"pass a checkpoint a vanishlab run wrote (<run>/checkpoints/last.ckpt)."
            )
    return resolved
