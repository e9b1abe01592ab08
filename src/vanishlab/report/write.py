"""Writing the report: its sections and figures found as modules (`vanishlab.report.figures`,
`vanishlab.report.sections`), and the command line."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
from collections import Counter
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from vanishlab import ConfigError, exit_with, results
from vanishlab.report import figures, sections
from vanishlab.report.load import Sweep, counts, load_sweep, newest_sweep

# The entry-point group through which an installed package adds figures: each entry names a
# figure module (`[project.entry-points."vanishlab.report_figures"] mine = "mypkg.figure"`).
FIGURES_GROUP = "vanishlab.report_figures"
FIGURE_NEEDS = ("NAME", "CAPTION", "applies", "draw")
SECTION_NEEDS = ("applies", "write")
LAST = 1000  # the ORDER of a module that gives none: after vanishlab's own


def package_modules(package: ModuleType) -> list[ModuleType]:
    """Every module in `package`: adding a file adds a figure or a section."""
    return [
        importlib.import_module(f"{package.__name__}.{info.name}")
        for info in pkgutil.iter_modules(package.__path__)
    ]


def user_module(name: str) -> ModuleType:
    """A figure module named on the command line or to `write_report`: a `.py` file by its path,
    anything else by its import name."""
    try:
        if not name.endswith(".py"):
            return importlib.import_module(name)
        spec = importlib.util.spec_from_file_location(Path(name).stem, name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except (ImportError, OSError) as err:
        raise ConfigError(
            f"figure module {name!r} does not import: {err}. Fix: pass a .py file's path, or a "
            f"module importable from here (on sys.path, e.g. installed)."
        ) from err


def in_order(modules: Iterable[ModuleType], needs: tuple[str, ...]) -> list[ModuleType]:
    """`modules` by their `ORDER`, each checked for what the report calls."""
    modules = list(dict.fromkeys(modules))
    for module in modules:
        missing = [name for name in needs if not hasattr(module, name)]
        if missing:
            raise ConfigError(
                f"{module.__name__} lacks {', '.join(missing)}. Fix: a report module declares "
                f"{', '.join(needs)} (see vanishlab.report.figures and .sections)."
            )
    return sorted(modules, key=lambda module: getattr(module, "ORDER", LAST))


def find_figures(extra: Iterable[str | ModuleType] = ()) -> list[ModuleType]:
    """vanishlab's figures, those of installed packages (`FIGURES_GROUP`) and `extra` (modules,
    or their names as `user_module` reads them), in order; two of one name are refused."""
    found = in_order(
        [
            *package_modules(figures),
            *(entry.load() for entry in entry_points(group=FIGURES_GROUP)),
            *(m if isinstance(m, ModuleType) else user_module(m) for m in extra),
        ],
        FIGURE_NEEDS,
    )
    twice = [name for name, n in Counter(module.NAME for module in found).items() if n > 1]
    if twice:
        raise ConfigError(
            f"two figures are named {', '.join(twice)}. Fix: give your figure another NAME."
        )
    return found


def write_figures(sweep: Sweep, out: Path, modules: list[ModuleType]) -> list[str]:
    """Draw and save each figure that applies to the sweep; return their markdown."""
    for stale in out.glob("*.png"):  # a figure that no longer applies must not linger
        stale.unlink()
    shown = []
    for module in modules:
        fig = module.draw(sweep) if module.applies(sweep) else None
        if fig is not None:
            fig.savefig(out / f"{module.NAME}.png", dpi=100)
            shown.append(f"![{module.NAME}]({module.NAME}.png)\n\n{module.CAPTION}\n")
    return shown


def write_report(sweep_dir: Path, figures: Iterable[str | ModuleType] = ()) -> Path:
    """Write the sections (`results.csv`, the seed summary), the figures and `report.md` into
    `<sweep_dir>/report/`; return the path of `report.md`. `figures`: a user's figure modules,
    beside vanishlab's and installed packages'. Sections and figures that do not apply to this
    sweep are left out."""
    modules = find_figures(figures)
    sweep = load_sweep(sweep_dir)
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    table = sweep.table
    md = out / "report.md"
    md.write_text(
        "\n".join(
            [
                f"# Sweep report: {sweep_dir.name}\n",
                f"`{sweep_dir}`: {len(table)} jobs; status: {counts(table[results.STATUS])}; "
                f"verdict: {counts(table[results.VERDICT])}. Varied: "
                f"{', '.join(f'`{c}`' for c in sweep.varied.values()) or 'nothing'}.\n",
                *(
                    section.write(sweep, out)
                    for section in in_order(package_modules(sections), SECTION_NEEDS)
                    if section.applies(sweep)
                ),
                "## Figures\n",
                *write_figures(sweep, out, modules),
            ]
        )
    )
    return md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vanishlab.report",
        description="Write a sweep's results table, figures and report.md into <sweep>/report/.",
    )
    parser.add_argument(
        "sweep_dir",
        nargs="?",
        type=Path,
        help="a sweep directory (default: the newest one under ./outputs/sweeps/)",
    )
    parser.add_argument(
        "--figure",
        action="append",
        default=[],
        metavar="MODULE",
        help="a figure module of your own, a .py file or an importable name (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        print(write_report(args.sweep_dir or newest_sweep(), args.figure))
    except ConfigError as err:
        exit_with(err)
