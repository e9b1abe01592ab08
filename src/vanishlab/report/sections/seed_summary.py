"""The seed summary: each setting's seeds together (`load.seed_summary`)."""

from __future__ import annotations

from pathlib import Path

from vanishlab.report.load import ACC_MEAN, ACC_STD, VERDICTS, Sweep, seed_summary
from vanishlab.report.markdown import markdown_table

ORDER = 10
FILE = "seed_summary.csv"


def applies(sweep: Sweep) -> bool:
    return sweep.seeded


def write(sweep: Sweep, out: Path) -> str:
    summary = seed_summary(sweep.table, sweep.settings)
    summary.to_csv(out / FILE, index=False)
    seed_columns = [column for key, column in sweep.varied.items() if key not in sweep.settings]
    return (
        f"Jobs that differ only in `{'`, `'.join(seed_columns)}`, together: `{ACC_MEAN}` and "
        f"`{ACC_STD}` (sample standard deviation) over the seeds with a test accuracy; "
        f"`{VERDICTS}` counts the seeds' verdicts (a job without one by its status). Best "
        f"mean first; also [{FILE}]({FILE}).\n\n{markdown_table(summary)}\n"
    )
