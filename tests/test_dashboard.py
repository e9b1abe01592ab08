"""What a sweep shows on TensorBoard besides its scalars: job names that lead with what varies,
and the HParams table written from the records, read back with TensorBoard's own reader."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from conftest import FAST, compose_config, run_cli
from vanishlab.dashboard import (
    GradientFlowFigure,
    histogram_protos,
    job_histograms,
    write_histograms,
)
from vanishlab.hparams import (
    FILE_SUFFIX,
    METRICS,
    STATUS_COLUMN,
    VERDICT_COLUMN,
    column_infos,
    write_hparams,
)
from vanishlab.results import BACKWARD_START, JOB_CONFIG, START, STATUS, VERDICT, read_record
from vanishlab.stack import fit_and_test_stack
from vanishlab.sweep import job_name
from vanishlab.train import fit_and_test

SHOWN = 5  # hparams and metrics TensorBoard 2.21 shows without a click


def hparams_content(directory: Path) -> dict[str, bytes]:
    events = EventAccumulator(str(directory))
    events.Reload()
    return events.PluginTagToContent("hparams")


def experiment(directory: Path) -> api_pb2.Experiment:
    content = hparams_content(directory)[metadata.EXPERIMENT_TAG]
    return metadata.parse_experiment_plugin_data(content)


def shown_by_default(infos) -> list[str]:
    """The columns TensorBoard shows before any click: those marked `differs` first, by name
    (backend_context._sort_and_reduce_to_hparams_limit), then the first five."""
    ordered = sorted(infos, key=lambda info: (not info.differs, info.name))
    return [info.name for info in ordered[:SHOWN]]


def jobs(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: read_record(p) for p in sweep_dir.glob("*/metrics.json")}


def test_job_names_hold_the_varied_keys_under_aliases(tiny_sweep) -> None:
    records = jobs(tiny_sweep)
    assert set(records) == {
        f"act={act},lr={lr}" for act in ("relu", "sigmoid") for lr in ("0.05", "10000.0")
    }
    for name, record in records.items():
        act, lr = (part.split("=")[1] for part in name.split(","))
        config = record[JOB_CONFIG]
        assert (config["model"]["activation"], config["optimizer"]["lr"]) == (act, float(lr))
        # The constant overrides stay in .hydra/, out of the name.
        overrides = OmegaConf.load(tiny_sweep / name / ".hydra" / "overrides.yaml")
        assert "model.depth=3" in overrides and config["model"]["depth"] == 3


def test_a_job_name_is_sorted_aliases_unique_where_last_parts_clash() -> None:
    overrides = ["model.width=8", "data.width=2", "model.activation=tanh", "paths.root=/a/b"]
    assert job_name(overrides, None) == "act=tanh,data.width=2,model.width=8,root=_a_b"
    assert job_name(overrides, ["model.activation"]) == "act=tanh"
    assert job_name([], ["seed"]) == "defaults"


def test_sweep_hparams_show_status_verdict_and_the_varied_keys_first(tiny_sweep) -> None:
    config = experiment(tiny_sweep)
    infos = {info.name: info for info in config.hparam_infos}
    assert shown_by_default(config.hparam_infos) == [
        STATUS_COLUMN,
        VERDICT_COLUMN,
        "model.activation",
        "optimizer.lr",
    ]
    assert list(infos) == shown_by_default(config.hparam_infos)  # constants are no columns
    assert list(infos["model.activation"].domain_discrete) == ["relu", "sigmoid"]
    assert list(infos["optimizer.lr"].domain_discrete) == [0.05, 10000.0]
    assert [m.name.tag for m in config.metric_infos] == list(METRICS)
    # The backward ratio as initialised, what `exploding` reads, shows without a click.
    assert "Log10/backward/first_over_last_at_start" in list(METRICS)[:SHOWN]


def test_columns_are_typed_and_only_what_differs() -> None:
    rows = [
        {STATUS_COLUMN: "completed", "depth": "16", "lr": 0.1, "norm": True, "width": "8"},
        {STATUS_COLUMN: "completed", "depth": "2", "lr": 0.1, "norm": False, "width": "8"},
        {STATUS_COLUMN: "diverged", "depth": "4", "lr": 1.0, "norm": True, "std": 1.0},
    ]
    infos = {info.name: info for info in column_infos(rows)}
    assert list(infos) == [STATUS_COLUMN, "depth", "lr", "norm", "width", "std"]
    # An integer is text (it reads 16, not 16.000), its domain in the order of its values.
    assert infos["depth"].type == api_pb2.DATA_TYPE_STRING
    assert list(infos["depth"].domain_discrete) == ["2", "4", "16"]
    assert infos["lr"].type == api_pb2.DATA_TYPE_FLOAT64
    assert list(infos["norm"].domain_discrete) == [False, True]
    # `width` is the same where present, but one run has none; so is `std`: both differ.
    assert all(info.differs for info in infos.values())
    assert [info.name for info in column_infos(rows[:1])] == [STATUS_COLUMN]  # a lone run


def test_what_only_follows_from_another_column_is_not_shown_first() -> None:
    """`init.std` differs because `init` does, `data.seed` copies `seed`: in the vanishing_depth
    sweep they sorted before `model.activation` and `model.depth` and hid them."""
    rows = [
        {"init": "normal", "init.std": 1.0, "model.depth": "8", "seed": "0", "data.seed": "0"},
        {"init": "xavier_normal", "model.depth": "16", "seed": "1", "data.seed": "1"},
    ]
    infos = column_infos([{STATUS_COLUMN: "completed", **row} for row in rows])
    marked = {info.name for info in infos if info.differs}
    assert marked == {STATUS_COLUMN, "init", "model.depth", "seed"}
    assert {info.name for info in infos} - marked == {"init.std", "data.seed"}


def test_each_session_says_what_its_record_says(tiny_sweep) -> None:
    records = jobs(tiny_sweep)
    assert {record[STATUS] for record in records.values()} == {"completed", "diverged"}
    for name, record in records.items():
        content = hparams_content(tiny_sweep / name)
        start = metadata.parse_session_start_info_plugin_data(
            content[metadata.SESSION_START_INFO_TAG]
        )
        end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
        assert start.hparams[STATUS_COLUMN].string_value == record[STATUS]
        assert start.hparams[VERDICT_COLUMN].string_value == record[VERDICT]
        succeeded = record[STATUS] == "completed"
        assert (end.status == api_pb2.STATUS_SUCCESS) == succeeded, name
        events = EventAccumulator(str(tiny_sweep / name))
        events.Reload()
        for evidence in (START, BACKWARD_START):  # the weight-gradient and backward ratios
            (at_start,) = [tag for tag, key in METRICS.items() if key == evidence]
            shown = events.Scalars(at_start)[-1].value
            assert shown == pytest.approx(math.log10(record[evidence]), abs=1e-5)


def test_a_single_run_writes_its_own_hparams_table(tiny_data, tmp_path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("vanishlab.train", *FAST, f"hydra.run.dir={run_dir}", data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shown_by_default(experiment(run_dir).hparam_infos)[:2] == [STATUS_COLUMN, VERDICT_COLUMN]
    assert metadata.SESSION_START_INFO_TAG in hparams_content(run_dir)


def test_writing_again_replaces_the_table(tiny_sweep, tmp_path) -> None:
    """A re-run sweep writes its table again: TensorBoard reads a tag's first metadata, so an
    older file beside the new one would win."""
    sweep_dir = shutil.copytree(tiny_sweep, tmp_path / "sweep")
    job_dirs = sorted(path.parent for path in sweep_dir.glob("*/metrics.json"))
    write_hparams(sweep_dir, {job: read_record(job / "metrics.json") for job in job_dirs})
    for directory in (sweep_dir, *job_dirs):
        assert len(list(directory.glob(f"events.out.tfevents.*{FILE_SUFFIX}"))) == 1


@pytest.mark.parametrize(
    "jobs",
    [
        torch.randn(3, 784, 200).transpose(1, 2),  # weights laid out as their gradients: strided
        torch.randn(3, 40_000).relu(),  # many at the least value
        torch.stack([torch.linspace(-1.0, 1.0, 65), torch.linspace(0.0, 4.0, 65)]),  # on limits
        torch.stack([torch.full((7,), 2.5), torch.arange(7.0)]),  # one value: histc widens by 1
    ],
    ids=["strided", "relu", "limits", "constant"],
)
def test_each_jobs_histogram_bins_as_histc_bins_that_job_alone(jobs: torch.Tensor) -> None:
    """A fused stack bins its jobs at once; each job's buckets must be its own."""
    histograms = histogram_protos(jobs, bins=64)
    assert len(histograms) == len(jobs)
    for values, histogram in zip(jobs, histograms, strict=True):
        low, high = values.min().item(), values.max().item()
        assert (histogram.min, histogram.max, histogram.num) == (low, high, values.numel())
        expected = torch.histc(values.flatten(), 64, min=low, max=high)
        assert list(histogram.bucket) == expected.tolist()


def test_histograms_leave_out_non_finite_values_and_missing_gradients(tmp_path) -> None:
    """An overflowing activation or a dropped gradient must not cost a run its histograms."""
    logger = TensorBoardLogger(str(tmp_path), name="", version="")
    values = torch.tensor([[1.0, math.inf], [-2.0, math.nan], [3.0, 0.5]])
    first, second = job_histograms(  # two jobs: the second's values are finite
        {
            "mixed": torch.stack([values, values.nan_to_num(0.0, 0.0, 0.0)]),
            "none_finite": torch.full((2, 4), math.nan),
            "cleared": None,
        }
    )
    assert sorted(first) == sorted(second) == ["mixed"]
    write_histograms([logger], {**first, "finite": second["mixed"]}, step=1)
    logger.experiment.close()
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    assert sorted(events.Tags()["histograms"]) == ["finite", "mixed"]
    (mixed,) = events.Histograms("mixed")
    assert (mixed.histogram_value.min, mixed.histogram_value.max) == (-2.0, 3.0)
    assert (mixed.histogram_value.num, mixed.histogram_value.sum) == (4, 2.5)
    assert mixed.histogram_value.sum_squares == 1 + 4 + 9 + 0.25
    assert sum(mixed.histogram_value.bucket) == 4
    (finite,) = events.Histograms("finite")
    assert (finite.histogram_value.num, finite.histogram_value.max) == (6, 3.0)


def test_the_redrawn_figure_is_what_a_full_render_draws(tmp_path) -> None:
    """Each draw renders only its lines on the kept background; the image must be the figure a
    whole render of it gives: every line, marker and the title, on the same axes."""
    positions = [0, 7, 14, 27]  # time steps: the backward panel is drawn at them
    figure = GradientFlowFigure(5, positions, "time step", log10_range=(-16.0, 4.0))
    writer = TensorBoardLogger(str(tmp_path))
    background = np.asarray(figure.canvas.buffer_rgba()).copy()
    profiles: dict[int, list[float]] = {}
    backward: dict[int, list[float]] = {}
    for epoch, norms in enumerate(
        ([1e-3] * 5, [0.0, 1e-20, 1e-6, 1e-2, 1e6], [1e-9, 1e-5, 1e-2, 1.0, 10.0])
    ):
        profiles[epoch], backward[epoch] = norms, norms[1:]
        figure.draw([writer], profiles, backward, step=epoch)
        redrawn = np.asarray(figure.canvas.buffer_rgba()).copy()
        figure.canvas.draw()
        whole = np.asarray(figure.canvas.buffer_rgba())
        changed = (redrawn != background).any(axis=-1)
        differs = (redrawn != whole).any(axis=-1)
        # Only where a marker overlaps a spine or the grid, drawn above it in a whole render.
        assert differs.sum() < 0.05 * changed.sum(), (epoch, differs.sum(), changed.sum())
    writer.experiment.close()
    events = EventAccumulator(writer.log_dir, size_guidance={"images": 0})
    events.Reload()
    images = events.Images("gradient_flow")
    assert [image.step for image in images] == [0, 1, 2]
    assert (images[-1].width, images[-1].height) == whole.shape[1::-1]
    layers, signal = figure.figure.axes
    assert layers.get_xlabel() == "layer (0 = input side)" and signal.get_xlabel() == "time step"
    # Each epoch's backward line at the time steps, log10, clamped to the y-range.
    *_, last = signal.lines
    assert list(last.get_xdata()) == positions
    assert list(last.get_ydata()) == pytest.approx([-5.0, -2.0, 0.0, 1.0])
    assert signal.get_ylim() == layers.get_ylim() == (-16.0, 4.0)


@pytest.mark.parametrize("jobs", [1, 2])  # a single run; a fused stack's jobs
def test_a_jobs_fit_and_test_go_to_one_event_file(jobs: int, tiny_data, tmp_path) -> None:
    """Lightning closes its loggers after fitting: the test's values went to a second file,
    which TensorBoard's `EventAccumulator` reads first when both were begun in the same second
    and its counter has more digits, dropping the training's steps (`OneFileTensorBoardLogger`)."""
    cfgs = [compose_config([*FAST, f"seed={i}"], tiny_data, tmp_path / str(i)) for i in range(jobs)]
    if jobs == 1:
        fit_and_test(cfgs[0])
    else:
        fit_and_test_stack(cfgs)
    for i in range(jobs):
        (events,) = (tmp_path / str(i)).glob("events.out.tfevents.*")
        loaded = EventAccumulator(str(events), size_guidance={"scalars": 0})
        loaded.Reload()
        assert {"train/loss", "val/acc", "test/acc"} <= set(loaded.Tags()["scalars"])
