"""The sweep report on a hand-made sweep: real composed configs, written metrics.json files
(one failed and one unfinished job among them), and one job with real TensorBoard scalars."""

from __future__ import annotations

import json
import shutil
import statistics
from collections import Counter
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

import vanishlab.results as rec
from conftest import FAST, compose_config
from vanishlab.report import main, write_report
from vanishlab.report.events import LOSS_TAGS, scalar_curves
from vanishlab.report.figures import (
    accuracy,
    backward_profiles,
    grad_ratio_heatmap,
    jacobian_spectra,
    phase_diagram,
    sharpness,
)
from vanishlab.report.load import CONFIG, column_names, load_sweep
from vanishlab.train import fit_and_test

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN_LOSS = [2.3, 1.5, 0.9, 0.6, 0.4]


def finished(verdict: str, acc: float, ratio: float, depth: int, **extra) -> dict:
    """A metrics.json as `train` writes it, with a gradient profile that falls by `ratio`."""
    return {
        rec.STATUS: "completed",
        rec.EPOCHS: 1,
        rec.TRAIN_SECONDS: 1.5,
        "val/loss": 0.5,
        rec.VAL_ACC: acc,
        rec.FIRST_OVER_LAST: ratio,
        rec.START: ratio,
        rec.MAX_DEAD: 0.0,
        rec.MAX_SATURATED: 0.0,
        rec.DEAD_CLASSES: 0,
        rec.GRAD_NORMS_AT_START: np.geomspace(ratio, 1.0, depth + 1).tolist(),
        rec.TEST_LOSS: 0.5,
        rec.TEST_ACC: acc,
        rec.CLASSES_PREDICTED: 10,
        rec.VERDICT: verdict,
        **extra,
    }


def add_job(sweep: Path, overrides: list[str], record: dict | None) -> Path:
    """A job directory as a multirun leaves it; `record` None: started, not finished."""
    job = sweep / ",".join(overrides)
    cfg = compose_config(overrides, sweep / "data", output_dir=sweep)
    cfg.paths.output_dir = "${hydra:runtime.output_dir}"  # as Hydra saves it
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, job / ".hydra" / "config.yaml", resolve=False)
    (job / ".hydra" / "overrides.yaml").write_text("\n".join(f"- {o}" for o in overrides))
    if record is not None:
        (job / "metrics.json").write_text(json.dumps(record))
    return job


def trained_job(sweep: Path, name: str, overrides: list[str], data: Path) -> dict:
    """A job trained for real into `sweep / name` (no "=" in it: compose_config passes the
    directory as an override), with its record and config as a multirun leaves them."""
    job = sweep / name
    cfg = compose_config([*FAST, *overrides], data, job)
    record = fit_and_test(cfg)
    (job / "metrics.json").write_text(json.dumps(record))
    (job / ".hydra").mkdir()
    OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
    return record


def write_losses(job: Path) -> None:
    writer = SummaryWriter(log_dir=str(job))
    for step, loss in enumerate(TRAIN_LOSS):
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("grad_norm/layer_00", 1.0, step)
    writer.add_scalar("val/loss", 0.5, len(TRAIN_LOSS) - 1)
    writer.close()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Depth x activation x init, with one job of each status; the report is written once."""
    sweep = tmp_path_factory.mktemp("sweep")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    write_losses(
        add_job(sweep, ["init=kaiming_normal", "model.depth=2"], finished("trained", 0.9, 1.2, 2))
    )
    add_job(sweep, ["init=kaiming_normal", "model.depth=8"], finished("trained", 0.95, 0.8, 8))
    add_job(
        sweep,
        ["init=normal", "model.activation=sigmoid", "model.depth=2"],
        finished("vanishing", 0.3, 1e-3, 2),
    )
    add_job(
        sweep,
        ["init=normal", "model.activation=sigmoid", "model.depth=8"],
        finished("diverged", 0.1, 1e-6, 8, status="diverged", diverged_at_step=3),
    )
    add_job(
        sweep,
        ["init=kaiming_normal", "model.depth=4"],
        {rec.STATUS: "failed", rec.ERROR: "ConfigError: optimizer.lr=0 is not allowed"},
    )
    add_job(sweep, ["init=normal", "model.activation=sigmoid", "model.depth=4"], None)
    write_report(sweep)
    return sweep


def test_varied_keys_are_the_ones_that_differ(sweep) -> None:
    results = pd.read_csv(sweep / "report" / "results.csv")
    varied = list(results.columns[1 : results.columns.get_loc(rec.STATUS)])
    # init=normal brings a key (std) that kaiming_normal does not have, and the reverse: they
    # follow from `init`, so they are no columns.
    assert sorted(varied) == ["activation", "depth", "init"]
    assert set(results["init"]) == {"kaiming_normal", "normal"}


def test_a_key_the_sweep_names_is_varied_though_it_follows_from_another(tmp_path) -> None:
    for init, std in (("normal", 0.5), ("normal", 1.0), ("kaiming_normal", None)):
        add_job(tmp_path, [f"init={init}", *([f"init.std={std}"] if std else [])], None)
    assert list(load_sweep(tmp_path).varied) == ["init._target_"]
    (tmp_path / "varied.json").write_text('["init", "init.std"]')
    assert list(load_sweep(tmp_path).varied) == ["init._target_", "init.std"]


def test_column_names_are_short_unless_ambiguous() -> None:
    keys = ["model.depth", "init._target_", "init.std", "seed"]
    all_keys = [*keys, "data.std", "data.seed", "model.width"]
    assert column_names(keys, all_keys) == {
        "model.depth": "depth",
        "init._target_": "init",
        "init.std": "init.std",
        "seed": "seed",
    }


def test_results_csv_has_every_job_with_its_status_and_verdict(sweep) -> None:
    results = pd.read_csv(sweep / "report" / "results.csv")
    assert len(results) == 6
    got = {
        (row.depth, row.activation, row.status, str(row.verdict))
        for row in results.itertuples(index=False)
    }
    assert got == {
        (2, "relu", "completed", "trained"),
        (8, "relu", "completed", "trained"),
        (2, "sigmoid", "completed", "vanishing"),
        (8, "sigmoid", "diverged", "diverged"),
        (4, "relu", "failed", "nan"),
        (4, "sigmoid", "unfinished", "nan"),
    }
    failed = results[results[rec.STATUS] == "failed"].iloc[0]
    assert failed[rec.ERROR].startswith("ConfigError: optimizer.lr=0")


def table_rows(report_md: str, index: int = 0) -> list[dict[str, str]]:
    """The rows of report.md's `index`-th table."""
    tables = [block for block in report_md.split("\n\n") if block.startswith("| ")]
    lines = tables[index].splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_report_table_is_sorted_with_failed_and_unfinished_last(sweep) -> None:
    report_md = (sweep / "report" / "report.md").read_text()
    assert "6 jobs" in report_md and "1 failed" in report_md and "1 unfinished" in report_md
    rows = table_rows(report_md)
    assert [row[rec.STATUS] for row in rows[-2:]] == ["failed", "unfinished"]
    accuracies = [float(row[rec.TEST_ACC]) for row in rows[:-2]]
    assert accuracies == sorted(accuracies, reverse=True) == [0.95, 0.9, 0.3, 0.1]


def test_figures_are_valid_pngs_embedded_in_the_report(sweep) -> None:
    report_md = (sweep / "report" / "report.md").read_text()
    # depth is the only numeric key with two values: init.std is 1.0 or absent.
    expected = ["accuracy", "grad_ratio_heatmap", "grad_profiles", "loss_curves"]
    assert sorted(p.stem for p in (sweep / "report").glob("*.png")) == sorted(expected)
    assert not (sweep / "report" / "seed_summary.csv").exists()  # no seed varied
    for name in expected:
        png = sweep / "report" / f"{name}.png"
        assert png.read_bytes().startswith(PNG_MAGIC)
        assert matplotlib.image.imread(png).shape[0] > 100
        assert f"]({name}.png)" in report_md


def test_heatmap_has_a_panel_per_activation_and_a_column_per_init(sweep) -> None:
    fig = grad_ratio_heatmap.draw(load_sweep(sweep))
    relu, sigmoid = (ax for ax in fig.axes if ax.get_title())
    assert (relu.get_title(), sigmoid.get_title()) == ("activation=relu", "activation=sigmoid")
    inits = ["kaiming_normal", "normal"]
    assert [label.get_text() for label in relu.get_xticklabels()] == inits
    assert [label.get_text() for label in relu.get_yticklabels()] == ["2", "4", "8"]
    # log10 of the ratios at the start; the failed and unfinished jobs' cells stay empty.
    assert sorted(text.get_text() for text in relu.texts) == ["-0.1", "0.1"]
    assert sorted(text.get_text() for text in sigmoid.texts) == ["-3.0", "-6.0"]


# (depth, seed) -> (verdict, test accuracy); None: the job failed.
SEED_JOBS = {
    (2, 0): ("trained", 0.9),
    (2, 1): ("trained", 0.8),
    (2, 2): ("dead", 0.5),
    (4, 0): ("vanishing", 0.2),
    (4, 1): ("vanishing", 0.35),
    (4, 2): None,
}


@pytest.fixture(scope="module")
def seed_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 depths x 3 seeds (`data.seed` follows `seed`), one of them failed; reported once."""
    sweep = tmp_path_factory.mktemp("seed_sweep")
    for (depth, seed), job in SEED_JOBS.items():
        record = finished(*job, 1.0, depth) if job else {rec.STATUS: "failed", rec.ERROR: "boom"}
        add_job(sweep, [f"model.depth={depth}", f"seed={seed}"], record)
    write_report(sweep)
    return sweep


def verdict_counts(cell: str) -> dict[str, int]:
    """`2 trained, 1 dead` -> {"trained": 2, "dead": 1}."""
    return {name: int(n) for n, name in (part.split(" ", 1) for part in cell.split(", "))}


def test_seed_summary_has_the_mean_spread_and_verdicts_of_each_depth(seed_sweep) -> None:
    summary = pd.read_csv(seed_sweep / "report" / "seed_summary.csv")
    columns = ["depth", "seeds", "test/acc mean", "test/acc std", "verdicts"]
    assert list(summary.columns) == columns  # neither seed nor data.seed is a setting
    assert sorted(summary["depth"]) == [2, 4]
    for row in summary.to_dict("records"):
        jobs = [job for (depth, _), job in SEED_JOBS.items() if depth == row["depth"]]
        accuracies = [acc for _, acc in filter(None, jobs)]  # the failed job has none
        assert row["seeds"] == len(jobs)
        assert row["test/acc mean"] == pytest.approx(statistics.mean(accuracies))
        assert row["test/acc std"] == pytest.approx(statistics.stdev(accuracies))
        verdicts = Counter(job[0] if job else "failed" for job in jobs)
        assert verdict_counts(row["verdicts"]) == verdicts
    assert list(summary["test/acc mean"]) == sorted(summary["test/acc mean"], reverse=True)
    results = pd.read_csv(seed_sweep / "report" / "results.csv")
    assert sorted(results["job"]) == sorted(f"model.depth={d},seed={s}" for d, s in SEED_JOBS)


def test_seed_report_shows_the_summary_and_its_figures(seed_sweep) -> None:
    report = seed_sweep / "report"
    report_md = (report / "report.md").read_text()
    summary = pd.read_csv(report / "seed_summary.csv")
    rows = table_rows(report_md, 0)
    assert [(row["depth"], row["verdicts"]) for row in rows] == [
        (str(row.depth), row.verdicts) for row in summary.itertuples()
    ]
    assert len(table_rows(report_md, 1)) == len(SEED_JOBS)  # and a row per job after it
    # No accuracy plot against the seed: the seeds are drawn per setting instead.
    expected = ["accuracy", "accuracy_over_seeds", "grad_profiles"]
    assert sorted(p.stem for p in report.glob("*.png")) == expected
    for name in expected:
        assert (report / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
        assert f"]({name}.png)" in report_md


def test_accuracy_plot_draws_the_mean_over_seeds(seed_sweep) -> None:
    loaded = load_sweep(seed_sweep)
    (ax,) = accuracy.draw(loaded).axes
    (line,) = (line for line in ax.get_lines() if line.get_linestyle() == "-")
    means = loaded.table.groupby("depth")[rec.TEST_ACC].mean()
    assert list(line.get_xdata()) == list(means.index)
    assert list(line.get_ydata()) == pytest.approx(list(means))


def test_sweep_over_seeds_only_has_one_summary_row_and_a_figure(tmp_path) -> None:
    accuracies = [0.9, 0.1, 0.85, 0.95]
    for seed, acc in enumerate(accuracies):
        verdict = "trained" if acc > 0.5 else "dead"
        add_job(tmp_path, [f"seed={seed}"], finished(verdict, acc, 1.0, 2))
    write_report(tmp_path)
    (row,) = pd.read_csv(tmp_path / "report" / "seed_summary.csv").to_dict("records")
    assert row["seeds"] == len(accuracies)
    assert row["test/acc mean"] == pytest.approx(statistics.mean(accuracies))
    assert verdict_counts(row["verdicts"]) == {"trained": 3, "dead": 1}
    png = tmp_path / "report" / "accuracy_over_seeds.png"
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_loss_curves_read_the_events_and_survive_a_cut_record(sweep, tmp_path) -> None:
    job = shutil.copytree(sweep / "init=kaiming_normal,model.depth=2", tmp_path / "job")
    events = next(job.glob("events.out.tfevents.*"))
    with events.open("ab") as f:  # a record whose writer was killed mid-way
        f.write((1000).to_bytes(8, "little") + b"\0" * 20)
    curves = scalar_curves(job, LOSS_TAGS)
    assert set(curves) == {"train/loss", "val/loss"}
    steps, values = curves["train/loss"]
    assert steps == list(range(len(TRAIN_LOSS)))
    assert values == pytest.approx(TRAIN_LOSS)
    assert scalar_curves(sweep / "init=kaiming_normal,model.depth=4", LOSS_TAGS) == {}


def test_sweep_over_lr_only_has_no_heatmap_and_a_log_axis(tmp_path) -> None:
    for lr, acc in ((1.0, 0.1), (0.01, 0.9), (0.001, 0.6)):
        add_job(tmp_path, [f"optimizer.lr={lr}"], finished("trained", acc, 1.0, 2))
    write_report(tmp_path)
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == ["accuracy.png", "grad_profiles.png"]
    results = pd.read_csv(tmp_path / "report" / "results.csv")
    assert list(results["lr"]) == [0.01, 0.001, 1.0]
    assert accuracy.draw(load_sweep(tmp_path)).axes[0].get_xscale() == "log"


def test_columns_hold_resolved_values_and_no_underscore_keys(tmp_path) -> None:
    for scheduler in ("cosine", "step"):
        overrides = [f"scheduler={scheduler}", "trainer.max_epochs=3"]
        add_job(tmp_path, overrides, finished("trained", 0.9, 1.0, 2))
    loaded = load_sweep(tmp_path)
    # Each scheduler's own keys (T_max, step_size, ...) follow from the scheduler's choice.
    assert list(loaded.varied.values()) == ["scheduler"]
    cosine = loaded.table[loaded.table["scheduler"] == "cosineannealinglr"].iloc[0]
    assert cosine[CONFIG]["scheduler.T_max"] == 3  # ${trainer.max_epochs}, resolved
    assert "scheduler._target_" in cosine[CONFIG] and "scheduler._partial_" not in cosine[CONFIG]


def test_heatmap_without_a_numeric_key_has_a_row_per_setting(tmp_path) -> None:
    for remedy, init, ratio in (
        ("none", "xavier_normal", 1e-4),
        ("residual", "xavier_normal", 0.5),
        ("layernorm", "kaiming_normal", 2.0),
    ):
        add_job(tmp_path, [f"remedy={remedy}", f"init={init}"], finished("trained", 0.9, ratio, 4))
    (ax,) = (ax for ax in grad_ratio_heatmap.draw(load_sweep(tmp_path)).axes if ax.get_images())
    assert [label.get_text() for label in ax.get_yticklabels()] == [
        "norm=layer, residual=False",
        "norm=none, residual=False",
        "norm=none, residual=True",
    ]
    assert sorted(text.get_text() for text in ax.texts) == ["-0.3", "-4.0", "0.3"]


@pytest.mark.parametrize("kind", ["missing", "empty", "single run"])
def test_cli_names_a_non_sweep_directory_and_exits_2(kind, tmp_path, capsys) -> None:
    path = tmp_path / "dir"
    if kind != "missing":
        path.mkdir()
    if kind == "single run":
        (path / ".hydra").mkdir()
        (path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(SystemExit) as exit_:
        main([str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{path} is not a sweep directory" in err and "Fix:" in err
    assert not (path / "report").exists()


def test_cli_without_argument_reports_the_newest_sweep(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "no sweep under" in capsys.readouterr().err
    sweeps = tmp_path / "outputs" / "sweeps"
    for name in ("2026-01-01/23-00-00-000000", "2026-01-02/01-00-00-000000"):
        add_job(sweeps / name, ["model.depth=2"], finished("trained", 0.9, 1.0, 2))
        (sweeps / name / "multirun.yaml").write_text("hydra: {}\n")
    # A sweep.dir named by hand (hydra.sweep.dir=outputs/sweeps/mine): its jobs are not sweeps.
    add_job(sweeps / "mine", ["model.depth=2"], finished("trained", 0.9, 1.0, 2))
    main([])
    newest = sweeps / "2026-01-02/01-00-00-000000" / "report" / "report.md"
    assert capsys.readouterr().out.strip() == str(newest)
    assert newest.is_file() and not (sweeps / "2026-01-01").joinpath("report").exists()


# (init.sigma_w2, model.depth) of a tiny criticality sweep; each job's accuracy is its own.
PHASE_JOBS = [(sigma_w2, depth) for sigma_w2 in (0.5, 1.76, 4.0) for depth in (3, 12, 50)]


@pytest.fixture(scope="module")
def phase_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The criticality preset's keys on a 3 x 3 grid; reported once."""
    sweep = tmp_path_factory.mktemp("phase_sweep")
    for i, (sigma_w2, depth) in enumerate(PHASE_JOBS):
        overrides = ["experiment=criticality", f"init.sigma_w2={sigma_w2}", f"model.depth={depth}"]
        add_job(sweep, overrides, finished("trained", 0.1 + 0.08 * i, 1.0, depth))
    write_report(sweep)
    return sweep


def test_phase_diagram_is_written_and_shown_in_the_report(phase_sweep) -> None:
    report = phase_sweep / "report"
    assert (report / "phase_diagram.png").read_bytes().startswith(PNG_MAGIC)
    assert "](phase_diagram.png)" in (report / "report.md").read_text()


def test_phase_diagram_draws_each_jobs_accuracy_and_the_theory_for_its_config(phase_sweep):
    (ax,) = (ax for ax in phase_diagram.draw(load_sweep(phase_sweep)).axes if ax.get_images())
    sigmas = [float(label.get_text()) for label in ax.get_xticklabels()]
    depths = [int(label.get_text()) for label in ax.get_yticklabels()]
    assert sigmas == [0.5, 1.76, 4.0] and depths == [3, 12, 50]
    assert ax.get_ylim()[0] < ax.get_ylim()[1]  # depth grows upwards
    accuracies = {
        (sigmas[round(text.get_position()[0])], depths[round(text.get_position()[1])]): text
        for text in ax.texts
    }
    for i, job in enumerate(PHASE_JOBS):
        assert accuracies[job].get_text() == f"{0.1 + 0.08 * i:.2f}"
    # The preset's tanh and sigma_b2 = 0.05, read from the configs: critical at the 1.76 column
    # (with sigma_b2 = 0 it would be at 1.0, left of it), trainable depth 7.1 at sigma_w2 = 0.5
    # (between the rows of depths 3 and 12), and deepest near the critical point.
    assert ax.get_title() == "theory for tanh, sigma_b2=0.05"
    curve, critical = ax.get_lines()
    assert critical.get_xdata()[0] == pytest.approx(1.0, abs=0.01)
    x, y = curve.get_xdata(), curve.get_ydata()
    assert x[0] == 0 and 0 < y[0] < 1
    assert x[np.nanargmax(np.where(np.isfinite(y), y, np.nan))] == pytest.approx(1.0, abs=0.1)


def test_sharpness_figures_from_a_tiny_sweep_with_the_callback_on(tiny_data, tmp_path) -> None:
    """Two jobs trained for real with `callbacks=sharpness`: a line per lr, each through the
    values it logged and ending at its record's evidence, beside a dashed line at its 2/lr;
    and the final sharpness against lr."""
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    overrides = ["callbacks=sharpness", "callbacks.sharpness.every_n_steps=2"]
    records = {
        lr: trained_job(tmp_path, f"lr{lr}", [*overrides, f"optimizer.lr={lr}"], tiny_data)
        for lr in (0.05, 0.2)
    }
    report_md = write_report(tmp_path).read_text()
    for name in ("sharpness.png", "sharpness_vs_lr.png"):
        assert (tmp_path / "report" / name).read_bytes().startswith(PNG_MAGIC)
        assert f"]({name})" in report_md
    results = pd.read_csv(tmp_path / "report" / "results.csv").set_index("lr")
    for lr, record in records.items():
        assert results.loc[lr, rec.SHARPNESS] == pytest.approx(record[rec.SHARPNESS])

    (ax,) = sharpness.draw(load_sweep(tmp_path)).axes
    solid = [line for line in ax.lines if line.get_linestyle() == "-"]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(solid) == len(dashed) == 2
    for curve, limit in zip(solid, dashed, strict=True):
        assert curve.get_color() == limit.get_color()
        (lr,) = [lr for lr in records if 2 / lr == pytest.approx(limit.get_ydata()[0])]
        assert list(curve.get_xdata()) == [0, 2, 4, 6, 8, 9]  # and the last step
        assert curve.get_ydata()[-1] == pytest.approx(records[lr][rec.SHARPNESS])


@pytest.fixture(scope="module")
def profile_sweep(tiny_data, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Two jobs trained for real: an RNN (its backward profile runs through time) and a tanh
    MLP with callbacks=jacobian (through its hidden layers, and the Jacobian's spectrum);
    reported once. Returns the sweep and the records by job."""
    sweep = tmp_path_factory.mktemp("profile_sweep")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    jobs = {
        "rnn": ["model=rnn", "model.width=8"],
        "mlp": ["callbacks=jacobian", "model.depth=3", "model.activation=tanh"],
    }
    records = {name: trained_job(sweep, name, job, tiny_data) for name, job in jobs.items()}
    write_report(sweep)
    return sweep, records


def test_backward_profiles_are_drawn_along_each_jobs_axis(profile_sweep) -> None:
    """A row per axis, labelled as the probes' role says (the RNN's: time step), the start and
    the last measured step side by side, each line through its record's profile."""
    sweep, records = profile_sweep
    report_md = (sweep / "report" / "report.md").read_text()
    assert "](backward_profiles.png)" in report_md and "](jacobian_spectra.png)" in report_md
    figure = backward_profiles.draw(load_sweep(sweep))
    layers_start, layers_end, time_start, time_end = figure.axes[:4]
    assert layers_start.get_xlabel() == layers_end.get_xlabel() == "layer (0 = input side)"
    assert time_start.get_xlabel() == time_end.get_xlabel() == "time step"
    assert time_start.get_yscale() == "log"
    for ax, key in ((time_start, rec.BACKWARD_NORMS_START), (time_end, rec.BACKWARD_NORMS)):
        (line,) = ax.lines
        profile = records["rnn"][key]
        assert list(line.get_xdata()) == list(range(28))
        assert list(line.get_ydata()) == list(profile.values())
    (line,) = layers_start.lines
    assert list(line.get_xdata()) == [0, 1, 2]  # the MLP's hidden layers
    assert line.get_ydata()[0] / line.get_ydata()[-1] == pytest.approx(
        records["mlp"][rec.BACKWARD_START]
    )


def test_jacobian_spectra_are_drawn_for_the_jobs_that_measured_them(profile_sweep) -> None:
    """The MLP's quantiles at the start and the end, from the smallest singular value to the
    largest; the RNN, which has no Jacobian callback, draws no line."""
    sweep, records = profile_sweep
    start, end = jacobian_spectra.draw(load_sweep(sweep)).axes[:2]
    for ax, key in ((start, rec.JACOBIAN_QUANTILES_START), (end, rec.JACOBIAN_QUANTILES)):
        spectrum, zero = ax.lines  # the job's quantiles, and the dotted isometry line
        assert list(spectrum.get_ydata()) == records["mlp"][key]
        assert spectrum.get_xdata()[0] == 0 and spectrum.get_xdata()[-1] == 1
        assert list(zero.get_ydata()) == [0, 0]


USER_FIGURE = """
from matplotlib.figure import Figure

NAME = "{name}"
CAPTION = "Each job's test accuracy, by a figure vanishlab does not ship."


def applies(sweep):
    return "depth" in sweep.varied.values()


def draw(sweep):
    fig = Figure()
    fig.subplots().bar(sweep.table["job"], sweep.table["test/acc"].fillna(0))
    return fig
"""


def user_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    for depth in (2, 4):
        add_job(sweep, [f"model.depth={depth}"], finished("trained", 0.9, 1.0, depth))
    return sweep


def shows(sweep: Path, name: str) -> bool:
    """Whether the report holds figure `name`, with its caption."""
    report_md = (sweep / "report" / "report.md").read_text()
    png = sweep / "report" / f"{name}.png"
    return f"]({name}.png)\n\nEach job's test accuracy" in report_md and png.is_file()


def test_a_users_figure_module_appears_in_the_report(tmp_path, monkeypatch) -> None:
    """A figure defined outside vanishlab, by its import name, and on the command line by its
    file; where it does not apply (no depth varies), it is left out."""
    (tmp_path / "my_figure.py").write_text(USER_FIGURE.format(name="my_figure"))
    monkeypatch.syspath_prepend(str(tmp_path))
    sweep = user_sweep(tmp_path)
    write_report(sweep, figures=["my_figure"])
    assert shows(sweep, "my_figure")
    write_report(sweep)
    assert not shows(sweep, "my_figure")  # not asked for: gone, its png too
    main([str(sweep), "--figure", str(tmp_path / "my_figure.py")])
    assert shows(sweep, "my_figure")
    seeds = tmp_path / "seeds"
    add_job(seeds, ["seed=1"], finished("trained", 0.9, 1.0, 2))
    add_job(seeds, ["seed=2"], finished("trained", 0.8, 1.0, 2))
    write_report(seeds, figures=["my_figure"])
    assert not shows(seeds, "my_figure")


def test_an_installed_packages_figure_comes_through_its_entry_point(tmp_path, monkeypatch):
    """A package that declares a figure in the `vanishlab.report_figures` group (here a
    distribution's metadata on sys.path, as pip leaves it) adds it to every report."""
    (tmp_path / "their_figure.py").write_text(USER_FIGURE.format(name="their_figure"))
    dist = tmp_path / "their_figures-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: their-figures\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vanishlab.report_figures]\ntheirs = their_figure\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sweep = user_sweep(tmp_path)
    write_report(sweep)
    assert shows(sweep, "their_figure")


def test_a_figure_module_that_cannot_work_is_refused(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "half_figure.py").write_text("NAME = 'half'\n")
    (tmp_path / "twin_figure.py").write_text(USER_FIGURE.format(name="loss_curves"))
    monkeypatch.syspath_prepend(str(tmp_path))
    sweep = user_sweep(tmp_path)
    for module, says in (
        ("half_figure", "half_figure lacks CAPTION, applies, draw"),
        ("twin_figure", "two figures are named loss_curves"),
        ("no_such_figure", "figure module 'no_such_figure' does not import"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main([str(sweep), "--figure", module])
        assert exit_.value.code == 2 and says in capsys.readouterr().err
