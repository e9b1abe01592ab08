"""The backward signal: dL/dh at each probe's output, read from zero taps on GradientFlow's
measured steps; exact, harmless to training, and the evidence the verdict reads."""

from __future__ import annotations

import copy
import math
import re
from functools import partial

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

from conftest import FAST, Recorder, bare_trainer, compose_config
from vanishlab.dashboard import LAYOUT, LOG10, LOG10_FAMILIES
from vanishlab.data import TensorBatches
from vanishlab.diagnostics import GradientFlow
from vanishlab.init import initialise, xavier_normal
from vanishlab.losses import cross_entropy, mean_loss
from vanishlab.module import Classifier
from vanishlab.nets import MLP
from vanishlab.results import (
    BACKWARD_FIRST_OVER_LAST,
    BACKWARD_NORMS,
    BACKWARD_NORMS_START,
    BACKWARD_START,
    FIRST_OVER_LAST,
    SIGNAL_AXIS,
    START,
    STEPS,
)
from vanishlab.stack import StackedBatches, StackedClassifier
from vanishlab.train import build, fit_and_test


def probe_gradients(net: nn.Module, loss_of_outputs, x: Tensor) -> dict[str, Tensor]:
    """dL/dh at every probe's output by `torch.autograd.grad`, for comparison."""
    outputs: dict[str, Tensor] = {}
    hooks = [
        probe.output.register_forward_hook(
            lambda module, inputs, h, name=probe.name: outputs.setdefault(name, h)
        )
        for probe in net.probes()
    ]
    loss = loss_of_outputs(net(x))
    for hook in hooks:
        hook.remove()
    gradients = torch.autograd.grad(loss, list(outputs.values()))
    return dict(zip(outputs, gradients, strict=True))


def measured(recorder: Recorder) -> list[dict[str, float]]:
    """GradientFlow's figures, one dict per measured step."""
    return [metrics for _, metrics in recorder.logged if "backward/layer_00" in metrics]


def one_step(net: nn.Module, x: Tensor, y: Tensor, *callbacks) -> Recorder:
    """One SGD step on the batch (`x`, `y`), with `callbacks` and a `Recorder`."""
    recorder = Recorder()
    module = Classifier(net, cross_entropy, partial(torch.optim.SGD, lr=0.1))
    trainer = bare_trainer(max_steps=1, callbacks=list(callbacks), logger=recorder)
    trainer.fit(module, train_dataloaders=TensorBatches(x, y, len(x)))
    return recorder


def batch(n: int, shape: tuple[int, ...], classes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=generator), torch.randint(0, classes, (n,))


def test_backward_signal_is_dl_dh_exactly_and_the_taps_change_nothing() -> None:
    """Every probe's `backward/` norm is the norm of `torch.autograd.grad(loss, h)`, norm
    probes and the output included; the step's weights are those of a run without taps."""
    torch.manual_seed(0)
    net = MLP(input_shape=(1, 4, 4), num_classes=3, depth=3, width=8, norm="layer")
    x, y = batch(32, (1, 4, 4), 3)
    expected = probe_gradients(copy.deepcopy(net), lambda out: mean_loss(cross_entropy, out, y), x)
    untapped = copy.deepcopy(net)

    (figures,) = measured(one_step(net, x, y, GradientFlow(every_n_steps=1)))
    one_step(untapped, x, y)
    assert {p.name for p in net.probes()} == set(expected) and len(expected) == 7
    for name, gradient in expected.items():
        assert figures[f"backward/{name}"] == pytest.approx(gradient.norm().item(), rel=1e-6)
    first, last = (expected[name].norm().item() for name in ("layer_00", "layer_02"))
    assert figures[BACKWARD_FIRST_OVER_LAST] == pytest.approx(first / last, rel=1e-6)
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, untapped.state_dict()[name]), name


def test_relu_xavier_backward_signal_vanishes_where_weight_gradients_look_balanced() -> None:
    """ReLU with Xavier init halves the signal's variance in each layer, forward and backward:
    the weight gradients (activation x backward signal) read balanced, the backward signal
    has fallen by 2**-7.5 over 16 layers."""
    torch.manual_seed(0)
    net = MLP(input_shape=(1, 28, 28), num_classes=10, depth=16, width=200)
    initialise(net, xavier_normal)
    x, y = batch(200, (1, 28, 28), 10)
    (figures,) = measured(one_step(net, x, y, GradientFlow(every_n_steps=1)))
    assert 1e-2 < figures[FIRST_OVER_LAST] < 1e2
    assert figures[BACKWARD_FIRST_OVER_LAST] < 1e-2


def test_backward_tags_and_record_keys_after_a_run(tiny_data, tmp_path) -> None:
    """`backward/<probe>` for every probe and `backward/first_over_last` (first hidden over last
    hidden: depth 3 has hidden layers 00-02) with their Log10 forms, on the measured steps; the
    record keeps the ratio at the first and the last measured step beside the weight ratio,
    and the profile it divides: the hidden layers' norms, along the axis `layer`."""
    overrides = [*FAST, "model.depth=3", "callbacks.gradient_flow.every_n_steps=4"]
    record = fit_and_test(compose_config(overrides, tiny_data, tmp_path))
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    values = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert "backward" in LOG10_FAMILIES
    (charts,) = LAYOUT.values()
    backward_charts = [regex for _, (_, [regex]) in charts.items() if "backward/" in regex]
    # Per layer and the ratio; time steps, the cell state and the stream are not an MLP's.
    drawn = [regex for regex in backward_charts if any(re.match(regex, t) for t in values)]
    assert len(backward_charts) == 5 and len(drawn) == 2
    for name in ("layer_00", "layer_01", "layer_02", "layer_03", "first_over_last"):
        logged = values[f"backward/{name}"]
        assert [e.step for e in events.Scalars(f"backward/{name}")] == [0, 4, 8, 9]
        assert values[f"{LOG10}backward/{name}"] == pytest.approx(
            [math.log10(v) for v in logged], abs=1e-5
        )
    first, last = values["backward/layer_00"], values["backward/layer_02"]
    ratios = [a / b for a, b in zip(first, last, strict=True)]
    assert values[BACKWARD_FIRST_OVER_LAST] == pytest.approx(ratios, rel=1e-5)
    assert record[BACKWARD_START] == pytest.approx(ratios[0], rel=1e-5)
    assert record[BACKWARD_FIRST_OVER_LAST] == pytest.approx(ratios[-1], rel=1e-5)
    assert START in record and FIRST_OVER_LAST in record
    assert record[SIGNAL_AXIS] == "layer"
    for key, at in ((BACKWARD_NORMS_START, 0), (BACKWARD_NORMS, -1)):
        profile = record[key]
        assert list(profile) == ["layer_00", "layer_01", "layer_02"]
        assert profile == pytest.approx({n: values[f"backward/{n}"][at] for n in profile})
        assert profile["layer_00"] / profile["layer_02"] == pytest.approx(ratios[at], rel=1e-5)


def test_accumulated_steps_read_the_backward_signal_of_their_last_batch(
    tiny_data, tmp_path
) -> None:
    """Two batches per optimizer step: dL/dh is the second batch's, of its loss as Lightning
    scales it (1/2), as the activations are that batch's."""
    overrides = [
        *FAST,
        "trainer.accumulate_grad_batches=2",
        "callbacks.gradient_flow.every_n_steps=1",
    ]
    cfg = compose_config(overrides, tiny_data, tmp_path)
    fit_and_test(cfg)
    torch.manual_seed(cfg.seed)
    datamodule, module = build(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    x, y = list(datamodule.train_dataloader())[1]
    expected = probe_gradients(module.net, lambda out: mean_loss(module.loss_fn, out, y) / 2, x)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    first = events.Scalars("backward/layer_00")[0]
    assert first.step == 0
    assert first.value == pytest.approx(expected["layer_00"].norm().item(), rel=1e-5)


def test_a_stacked_job_measures_the_backward_signal_it_measures_alone() -> None:
    """In a stack the loss is the jobs' sum, so each job's dL/dh is its own loss's."""
    nets, jobs_x = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(MLP(input_shape=(1, 4, 4), num_classes=3, depth=2, width=8))
        jobs_x.append(batch(16, (1, 4, 4), 3, seed))
    alone = [
        measured(one_step(copy.deepcopy(net), x, y, GradientFlow(every_n_steps=1)))
        for net, (x, y) in zip(nets, jobs_x, strict=True)
    ]
    modules = [Classifier(net, cross_entropy, partial(torch.optim.SGD, lr=0.1)) for net in nets]
    recorders = [Recorder(), Recorder()]
    stack = StackedClassifier(
        modules, [[GradientFlow(every_n_steps=1)] for _ in nets], [[r] for r in recorders]
    )
    batches = StackedBatches([TensorBatches(x, y, len(x)) for x, y in jobs_x])
    bare_trainer(max_steps=1).fit(stack, train_dataloaders=batches)
    for recorder, (figures,) in zip(recorders, alone, strict=True):
        (stacked,) = measured(recorder)
        backward = {k: v for k, v in figures.items() if "backward" in k}
        assert {k: stacked[k] for k in backward} == pytest.approx(backward, rel=1e-6)


def test_an_rnns_profile_runs_through_time_on_a_chart_of_its_own(tiny_data, tmp_path) -> None:
    """model=rnn: the profile is dL/dh_t at each time probe, along the axis `time step`, its
    first over its last the ratio; TensorBoard's time chart draws exactly those steps."""
    overrides = [*FAST, "model=rnn", "model.width=8", "callbacks.gradient_flow.every_n_steps=4"]
    record = fit_and_test(compose_config(overrides, tiny_data, tmp_path))
    assert record[SIGNAL_AXIS] == "time step"
    profile = record[BACKWARD_NORMS_START]
    steps = [f"step_{t:03d}" for t in range(28)]
    assert list(profile) == list(record[BACKWARD_NORMS]) == steps
    assert profile["step_000"] / profile["step_027"] == pytest.approx(record[BACKWARD_START])
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    (charts,) = LAYOUT.values()
    ((_, [regex]),) = (chart for title, chart in charts.items() if "through time" in title)
    drawn = [tag for tag in events.Tags()["scalars"] if re.match(regex, tag)]
    assert sorted(drawn) == [f"{LOG10}backward/{step}" for step in steps]


def test_a_checkpoint_from_before_the_profile_resumes(tiny_data, tmp_path) -> None:
    """A checkpoint whose GradientFlow state has no backward profile (written before it was
    kept) trains on: the record has the last step's profile, not the first's, and the figure
    draws the epochs it has."""

    def run(name: str, *overrides: str) -> dict:
        cfg = compose_config([*FAST, "model.depth=2", *overrides], tiny_data, tmp_path / name)
        return fit_and_test(cfg)

    run("first")
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    flow = state["callbacks"]["GradientFlow"]
    del flow["epoch_backward_profiles"], flow["at_first_step"]["backward_norms"]
    torch.save(state, checkpoint)
    record = run("resumed", "trainer.max_epochs=2", f"ckpt_path={checkpoint}")
    assert BACKWARD_NORMS_START not in record and BACKWARD_START in record
    assert list(record[BACKWARD_NORMS]) == ["layer_00", "layer_01"]
    assert record[SIGNAL_AXIS] == "layer"
    events = EventAccumulator(str(tmp_path / "resumed"), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("gradient_flow")][-1] == record[STEPS]
