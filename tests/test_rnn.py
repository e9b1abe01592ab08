"""model=rnn: cells unrolled step by step, time as a probe axis (dL/dh_t), the recurrent weights
initialised by the model (orthogonal or identity times rho, the LSTM forget bias), calibrated
against the vanishing and exploding of Pascanu et al. (2013) across rho."""

from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

from conftest import FAST, compose_config
from vanishlab import ConfigError
from vanishlab.init import initialise, xavier_normal, zeros
from vanishlab.nets import MAX_TIME_PROBES, RNN, SIGNAL_AXES, Probe, check_probes
from vanishlab.results import BACKWARD_START
from vanishlab.train import fit_and_test

CELLS = ("tanh", "relu", "lstm", "gru")


def log10_first_over_last(net: nn.Module, x: Tensor, y: Tensor) -> float:
    """log10 ||dL/dh_first|| / ||dL/dh_last|| along the network's signal axis (an RNN's time
    steps, a ViT's residual stream: `SIGNAL_AXES`), read from zero taps on those probes'
    outputs, as GradientFlow reads them."""
    taps: dict[str, Tensor] = {}

    def tap(name: str, module: nn.Module, inputs: object, output: Tensor) -> Tensor:
        taps[name] = torch.zeros_like(output, requires_grad=True)
        return output + taps[name]

    axis = next(a for a in SIGNAL_AXES if any(p.role == a for p in net.probes()))
    times = [p for p in net.probes() if p.role == axis]
    hooks = [
        p.output.register_forward_hook(lambda m, i, o, name=p.name: tap(name, m, i, o))
        for p in times
    ]
    loss = nn.functional.cross_entropy(net(x), y)
    for hook in hooks:
        hook.remove()
    first, last = torch.autograd.grad(loss, [taps[times[0].name], taps[times[-1].name]])
    return math.log10(first.norm() / last.norm())


def test_rho_orders_the_backward_signal_through_time_as_pascanu_et_al() -> None:
    """tanh, 28 rows, 128 units, W_xh Xavier, W_hh = rho x orthogonal: step 0's dL/dh vanishes
    below rho = 1 and explodes above (real MNIST, 200 images: -10.3, -3.1, +3.9 at rho = 0.5,
    1.0, 3.0; here random images)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (200,), generator=generator)
    ratios = []
    for rho in (0.5, 1.0, 3.0):
        torch.manual_seed(1)
        net = RNN((1, 28, 28), 10, recurrent_scale=rho)
        initialise(net, xavier_normal)
        ratios.append(log10_first_over_last(net, x, y))
    assert ratios == sorted(ratios) and len(set(ratios)) == 3
    assert ratios[0] < -5 and ratios[-1] > 1


@pytest.mark.parametrize("cell", CELLS)
def test_each_cell_trains_and_records_the_backward_ratio_through_time(
    cell, tiny_data, tmp_path
) -> None:
    """An LSTM's c_t is measured too, on the recorded steps that pass it on: `memory_<TTT>`."""
    overrides = [*FAST, "model=rnn", f"model.cell={cell}", "model.width=16", "model.depth=2"]
    record = fit_and_test(compose_config(overrides, tiny_data, tmp_path))
    assert math.isfinite(record[BACKWARD_START])
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    memory = sorted(t for t in events.Tags()["scalars"] if t.startswith("backward/memory_"))
    assert memory == ([f"backward/memory_{t:03d}" for t in range(27)] if cell == "lstm" else [])
    for name in memory:
        assert all(math.isfinite(e.value) and e.value > 0 for e in events.Scalars(name))


def test_time_probes_are_at_most_32_with_the_first_and_last_step() -> None:
    rows = RNN((1, 28, 28), 10, width=8)
    pixels = RNN((1, 28, 28), 10, width=8, sequence="pixels")
    for net, steps in ((rows, 28), (pixels, 784)):
        names = [p.name for p in net.probes() if p.is_time]
        assert len(names) == min(steps, MAX_TIME_PROBES)
        assert names[0] == "step_000" and names[-1] == f"step_{steps - 1:03d}"
        check_probes(net, "rnn")
    assert pixels(torch.rand(2, 1, 28, 28)).shape == (2, 10)  # one tiny step of 784


def test_the_model_initialises_its_recurrent_weights_and_the_init_group_the_rest() -> None:
    irnn = RNN(
        (1, 28, 28), 10, cell="relu", width=8, recurrent_init="identity", recurrent_scale=0.9
    )
    initialise(irnn, zeros)
    cell = irnn.cells[0]
    assert torch.equal(cell.weight_hh, 0.9 * torch.eye(8))  # not zeroed by init=zeros
    assert not cell.weight_ih.any() and not irnn.output[0].weight.any()

    lstm = RNN((1, 28, 28), 10, cell="lstm", width=8, forget_bias=1.5)
    initialise(lstm, zeros)
    forget = lstm.cells[0].bias_hh.chunk(4)
    assert (forget[1] == 1.5).all() and not forget[0].any() and not forget[3].any()
    assert not lstm.cells[0].bias_ih.any()
    for block in lstm.cells[0].weight_hh.chunk(4):  # each gate's block orthogonal
        assert torch.allclose(block @ block.T, torch.eye(8), atol=1e-5)

    by_group = RNN((1, 28, 28), 10, width=8, recurrent_init="init")
    initialise(by_group, zeros)
    assert not by_group.cells[0].weight_hh.any()


def test_a_time_probe_measures_only_its_output() -> None:
    net = RNN((1, 28, 28), 10, width=8)
    bad = Probe("step_000", net.cells[0], net.steps["0"], ("weight_hh",), "time")
    net.probes = lambda: [bad]
    with pytest.raises(ConfigError, match="measures only its output"):
        check_probes(net, "rnn")
