"""Summarise a sweep: `python -m vanishlab.report [sweep dir] [--figure MODULE ...]` (default:
the newest sweep under ./outputs/sweeps/) writes `<sweep>/report/`: `results.csv`, the figures,
and `report.md` showing both.

The report reads only what the jobs left on disk (`.hydra/config.yaml`, `metrics.json`, the
TensorBoard events), so it works on any sweep, one still running or with failed jobs included
(`load`). What varied is `vanishlab.varied`'s rule, the one job names and the HParams table
follow.

`report.md` opens with its sections (`sections/`, a module each): with seeds, the seed summary,
also `seed_summary.csv` (a row per setting of the other varied keys, with `seeds` (its jobs),
`test/acc mean` and `test/acc std` (sample standard deviation) over the seeds that have a test
accuracy, and `verdicts`, e.g. `2 trained, 1 dead`; a job without a verdict counts by its
status); then a row per job, also `results.csv`. Its figures follow (`figures/`, a module each,
with its caption), those that apply to the sweep's data: a figure treats the seed as the summary
does (means with +- one standard deviation, a heatmap cell's median).

A figure of one's own is a module like those in `figures/`, passed as `--figure` (or
`write_report(figures=[...])`), or installed under the entry-point group
`vanishlab.report_figures` (`write.FIGURES_GROUP`).
"""

from vanishlab.report.write import main, write_report

__all__ = ["main", "write_report"]
