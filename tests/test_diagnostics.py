"""Gradient-flow logging, divergence handling and verdicts, read back with TensorBoard's own
event reader."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from conftest import FAST, compose_config
from vanishlab.dashboard import LOG10, LOG10_FLOOR
from vanishlab.diagnostics import row_std
from vanishlab.divergence import StopOnDivergence
from vanishlab.hparams import row
from vanishlab.results import (
    BACKWARD_FIRST_OVER_LAST,
    BACKWARD_START,
    CLASSES,
    CLASSES_PREDICTED,
    DEAD_CLASSES,
    DIVERGED_AT_EPOCH,
    DIVERGED_AT_STEP,
    EPOCHS,
    FIRST_OVER_LAST,
    FULL_EPOCHS,
    GRAD_NORMS_AT_START,
    JOB_CONFIG,
    MAX_DEAD,
    MAX_SATURATED,
    START,
    STATUS,
    TEST_ACC,
    TEST_LOSS,
    VAL_ACC,
    VERDICT,
    job_identity,
    verdict,
)
from vanishlab.train import fit_and_test


def read_events(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_every_tag_family_histograms_figure_and_hparams_are_logged(tiny_data, tmp_path) -> None:
    cfg = compose_config(
        [
            *FAST,
            "model.depth=3",
            "model.output_activation=relu",
            "trainer.max_epochs=2",
            "callbacks.gradient_flow.every_n_steps=4",
        ],
        tiny_data,
        tmp_path,
    )
    record = fit_and_test(cfg)
    events = read_events(tmp_path)
    tags = events.Tags()
    for family in ("grad_norm", "weight_norm", "update_ratio", "act_mean", "act_std"):
        assert {f"{family}/layer_{i:02d}" for i in range(4)} <= set(tags["scalars"]), family
    assert {f"dead_frac/layer_{i:02d}" for i in range(3)} <= set(tags["scalars"])
    for tag in (
        FIRST_OVER_LAST,
        "dead_outputs",
        "train/loss",
        "train/acc",
        "val/loss",
        VAL_ACC,
        TEST_LOSS,
        TEST_ACC,
        "lr-SGD",
    ):
        assert tag in tags["scalars"], tag
    for family in ("weights", "grads", "activations"):
        assert f"{family}/layer_03" in tags["histograms"]
    # One image per epoch (at its last global step), the same figure redrawn with a line more.
    assert [e.step for e in events.Images("gradient_flow")] == [10, 20]

    # 10 steps per epoch, logged every 4 steps: 0, 4, 8, 12, 16 and nothing between, and the
    # last step of training (19); histograms at each epoch's first measured step and the last.
    assert [e.step for e in events.Scalars("grad_norm/layer_00")] == [0, 4, 8, 12, 16, 19]
    assert [e.step for e in events.Histograms("grads/layer_00")] == [0, 12, 19]
    # Log10/: the same figures as log10, for a linear axis.
    for raw in ("grad_norm/layer_00", "update_ratio/layer_03", FIRST_OVER_LAST):
        shown = [e.value for e in events.Scalars(f"{LOG10}{raw}")]
        assert shown == pytest.approx([math.log10(e.value) for e in events.Scalars(raw)], abs=1e-5)
    layout = events.PluginTagToContent("custom_scalars")
    assert layout, "no custom-scalars layout written"
    ratios = [e.value for e in events.Scalars(FIRST_OVER_LAST)]
    norms = [events.Scalars(f"grad_norm/layer_{i:02d}")[0].value for i in (0, 3)]
    assert ratios[0] == pytest.approx(norms[0] / norms[1], rel=1e-5)
    assert record[START] == pytest.approx(ratios[0], rel=1e-5)
    assert record[GRAD_NORMS_AT_START][0] == pytest.approx(norms[0], rel=1e-5)


def test_loggers_other_than_tensorboard_get_the_same_figures(tiny_data, tmp_path) -> None:
    """TensorBoard gets a measured step's figures as one event; a CSV logger row by row."""
    overrides = [*FAST, "trainer.max_epochs=1", "callbacks.gradient_flow.every_n_steps=4"]
    fit_and_test(compose_config([*overrides, "logger=csv"], tiny_data, tmp_path / "csv"))
    fit_and_test(compose_config(overrides, tiny_data, tmp_path / "tb"))
    with open(tmp_path / "csv" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["grad_norm/layer_00"]]
    events = read_events(tmp_path / "tb")
    for tag in ("grad_norm/layer_00", f"{LOG10}update_ratio/layer_02", FIRST_OVER_LAST):
        logged = events.Scalars(tag)
        assert [int(row["step"]) for row in rows] == [e.step for e in logged] == [0, 4, 8, 9]
        assert [float(row[tag]) for row in rows] == pytest.approx([e.value for e in logged])


def test_update_ratio_is_measured_from_the_applied_update(tiny_data, tmp_path) -> None:
    # Plain SGD: the update is lr * grad, so update_ratio = lr * grad_norm / weight_norm_after.
    cfg = compose_config([*FAST, "optimizer.lr=0.05"], tiny_data, tmp_path)
    fit_and_test(cfg)
    events = read_events(tmp_path)
    grad, weight, ratio = (
        events.Scalars(f"{f}/layer_01")[0].value
        for f in ("grad_norm", "weight_norm", "update_ratio")
    )
    assert ratio == pytest.approx(0.05 * grad / weight, rel=1e-4)


def test_saturation_is_logged_for_sigmoid(tiny_data, tmp_path) -> None:
    cfg = compose_config(
        [*FAST, "model.activation=sigmoid", "init=normal", "init.std=1.0"], tiny_data, tmp_path
    )
    record = fit_and_test(cfg)
    events = read_events(tmp_path)
    assert "saturated_frac/layer_00" in events.Tags()["scalars"]
    assert "dead_frac/layer_00" not in events.Tags()["scalars"]
    assert record[MAX_SATURATED] > 0.3  # randn weights on 784 inputs saturate


def test_huge_learning_rate_ends_diverged_with_finite_weights(tiny_data, tmp_path) -> None:
    cfg = compose_config([*FAST, "optimizer.lr=1e4", "trainer.max_epochs=3"], tiny_data, tmp_path)
    record = fit_and_test(cfg)
    assert record[STATUS] == "diverged" and record[VERDICT] == "diverged"
    assert record[DIVERGED_AT_EPOCH] == 0 and 0 < record[DIVERGED_AT_STEP] < 10
    assert record[EPOCHS] == 1  # stopped in its first epoch, not trained on NaNs for 3
    assert record[FULL_EPOCHS] == 0
    assert record[TEST_LOSS] == record[TEST_LOSS]  # the kept weights are finite: not NaN


def check_divergence(bad_entry: float | None) -> tuple:
    """(trainer, callback, net) after one StopOnDivergence check that saw a finite loss and
    gradients of 1e3, one entry of which is `bad_entry` (none if None)."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    trainer = SimpleNamespace(global_step=7, current_epoch=1, should_stop=False)
    stop = StopOnDivergence()
    stop.on_before_backward(trainer, net, torch.tensor(0.5))
    for p in net.parameters():
        p.grad = torch.full_like(p, 1e3)
    if bad_entry is not None:
        net[0].weight.grad[2, 1] = bad_entry
    stop.on_before_optimizer_step(trainer, net, torch.optim.SGD(net.parameters(), lr=0.1))
    return trainer, stop, net


@pytest.mark.parametrize("bad_entry", [math.inf, -math.inf, math.nan])
def test_one_non_finite_gradient_entry_stops_the_run_and_drops_the_step(bad_entry) -> None:
    trainer, stop, net = check_divergence(bad_entry)
    assert trainer.should_stop and stop.diverged_at == {"step": 7, "epoch": 1}
    assert all(p.grad is None for p in net.parameters())


def test_finite_gradients_do_not_stop_the_run() -> None:
    trainer, stop, net = check_divergence(None)
    assert not trainer.should_stop and stop.diverged_at is None
    assert all(p.grad is not None for p in net.parameters())


TRAINED = {FULL_EPOCHS: 1}  # one full pass over the training split


def signal(first: float, last: float | None = None) -> dict[str, float]:
    """A measured run's backward-signal ratio at its first and last measured step (`last`
    defaults to `first`: one measured step), its weight-gradient ratio balanced."""
    last = first if last is None else last
    return {START: 1.0, BACKWARD_START: first, BACKWARD_FIRST_OVER_LAST: last}


@pytest.mark.parametrize(
    ("evidence", "expected"),
    [
        ({STATUS: "diverged", **signal(1.0)}, "diverged"),
        ({TEST_LOSS: math.nan, **TRAINED}, "diverged"),  # no StopOnDivergence (callbacks=none)
        ({DEAD_CLASSES: 1, **signal(1e5), **TRAINED}, "dead"),
        ({MAX_DEAD: 1.0, **signal(1e-5)}, "dead"),
        (signal(101.0), "exploding"),
        # An exploding signal is read at the start: the damage is done in the first steps.
        ({**signal(101.0, 1.0), CLASSES_PREDICTED: 10, **TRAINED}, "exploding"),
        ({**signal(99.0, 1e3), CLASSES_PREDICTED: 10, **TRAINED}, "trained"),
        # A vanishing one at the start, where training did not outgrow it: it still vanishes
        # at the end, or the network is stuck.
        (signal(0.009), "vanishing"),  # fast_dev_run: its one step is first and last
        ({**signal(0.009), CLASSES_PREDICTED: 10, **TRAINED}, "vanishing"),
        ({**signal(0.009, 0.011), CLASSES_PREDICTED: 1, **TRAINED}, "vanishing"),
        ({**signal(0.009, 0.011), CLASSES_PREDICTED: 10, **TRAINED}, "trained"),
        ({**signal(0.009, 0.011), CLASSES_PREDICTED: 1}, "too_short"),  # no full pass
        ({**signal(1.0, 0.009), CLASSES_PREDICTED: 10, **TRAINED}, "trained"),  # not at init
        ({**signal(1.0), CLASSES_PREDICTED: 9, **TRAINED}, "undertrained"),
        ({CLASSES_PREDICTED: 9, **TRAINED}, "undertrained"),  # no GradientFlow
        ({**signal(1.0), MAX_SATURATED: 0.5}, "vanishing"),
        ({**signal(101.0), MAX_SATURATED: 0.9}, "exploding"),
        ({**signal(0.011), CLASSES_PREDICTED: 10, **TRAINED}, "trained"),
        ({**signal(99.0), MAX_DEAD: 0.99, **TRAINED}, "trained"),
        ({CLASSES_PREDICTED: 10, **TRAINED}, "trained"),  # no GradientFlow
        # The weight-gradient ratio is no evidence: balanced with a vanished signal (ReLU +
        # Xavier), vanishing with a balanced one.
        ({**signal(10**-2.2), START: 10**0.35, CLASSES_PREDICTED: 10, **TRAINED}, "vanishing"),
        ({**signal(1.0), START: 1e-5, CLASSES_PREDICTED: 10, **TRAINED}, "trained"),
        # Without the evidence a rule needs, it does not fire:
        ({}, "too_short"),  # max_epochs=0: nothing measured, no full pass
        ({**signal(1.0), CLASSES_PREDICTED: 1}, "too_short"),  # fast_dev_run
        ({DEAD_CLASSES: 3, CLASSES_PREDICTED: 2}, "too_short"),
        ({MAX_DEAD: 1.0, **TRAINED}, "trained"),  # dead_frac needs a measurement
    ],
)
def test_verdict_rules_in_order_and_the_evidence_each_needs(evidence, expected) -> None:
    assert verdict({STATUS: "completed", CLASSES: 10, **evidence}) == expected


def test_zero_gradients_and_zero_weights_are_logged_without_failing(tiny_data, tmp_path) -> None:
    # init=zeros: every hidden gradient is exactly 0 (log10 undefined), histograms of constants.
    cfg = compose_config([*FAST, "init=zeros", "trainer.max_epochs=2"], tiny_data, tmp_path)
    record = fit_and_test(cfg)
    assert record[STATUS] == "completed"
    assert record[GRAD_NORMS_AT_START][0] == 0.0
    events = read_events(tmp_path)
    assert "gradient_flow" in events.Tags()["images"]
    # A zero gradient reads 0 in the raw tag and the documented floor in the log10 one.
    assert events.Scalars("grad_norm/layer_00")[0].value == 0.0
    assert events.Scalars(f"{LOG10}grad_norm/layer_00")[0].value == LOG10_FLOOR


FLOW = "{_target_:vanishlab.diagnostics.GradientFlow,every_n_steps:1}"
STOP = "{_target_:vanishlab.divergence.StopOnDivergence}"


def test_gradient_flow_and_divergence_stop_work_in_either_order(tiny_data, tmp_path) -> None:
    """StopOnDivergence drops a bad step's gradients; whether GradientFlow measures that step
    before or after, the record is the same (the dropped step's norms read nan either way)."""
    records = []
    for first, second in ((FLOW, STOP), (STOP, FLOW)):
        order = ["~callbacks.gradient_flow", "~callbacks.stop_on_divergence"]
        order += [f"+callbacks.first={first}", f"+callbacks.second={second}"]
        output_dir = tmp_path / str(len(records))
        cfg = compose_config([*FAST, "optimizer.lr=1e4", *order], tiny_data, output_dir)
        record = fit_and_test(cfg)
        records.append({k: v for k, v in record.items() if not k.endswith("_seconds")})
    assert records[0][STATUS] == "diverged" and START in records[0]
    assert json.dumps(records[0], sort_keys=True) == json.dumps(records[1], sort_keys=True)


def test_a_new_group_reaches_the_lr_monitor_and_the_hparams_row(tiny_data, tmp_path) -> None:
    """`scheduler` is a group added after the HParams row was written: nothing names it there."""
    cfg = compose_config([*FAST, "scheduler=cosine", "trainer.max_epochs=3"], tiny_data, tmp_path)
    record = fit_and_test(cfg)
    rates = [e.value for e in read_events(tmp_path).Scalars("lr-SGD")]
    assert rates[0] == pytest.approx(0.01) and rates == sorted(rates, reverse=True)
    assert rates[-1] < rates[0]
    hparams = row({**record, JOB_CONFIG: job_identity(cfg)})
    assert (hparams["scheduler"], hparams["scheduler.T_max"]) == ("cosineannealinglr", "3")


def test_row_std_is_torchs_std_to_float_rounding() -> None:
    """GradientFlow's act_std in two passes is `Tensor.std(1)` (Bessel-corrected), ReLU
    activations, a constant row and a row far from 0 included."""
    torch.manual_seed(0)
    rows = torch.randn(8, 40_000).relu()
    rows[1] = 3.0  # constant: 0
    rows[2] = 1e3 + torch.randn(40_000)  # a large mean that one pass would cancel badly
    torch.testing.assert_close(row_std(rows), rows.std(1), rtol=1e-6, atol=1e-7)
