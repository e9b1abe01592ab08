"""Every job's row: its varied keys, status, verdict and results (`load.RESULTS`)."""

from __future__ import annotations

from pathlib import Path

from vanishlab.report.load import Sweep
from vanishlab.report.markdown import markdown_table

ORDER = 20
FILE = "results.csv"


def applies(sweep: Sweep) -> bool:
    return True


def write(sweep: Sweep, out: Path) -> str:
    columns = sweep.columns()
    sweep.table[columns].to_csv(out / FILE, index=False)
    return (
        "Best test accuracy first; failed and unfinished jobs last. All rows: "
        f"[{FILE}]({FILE}).\n\n{markdown_table(sweep.table[[*columns[1:], 'job']])}\n"
    )
