"""Probes of any module: a probe names the parameters it measures and initialises, and its role
says whether the `init` group or the network's own code initialises them; probes that cannot be
measured as declared end in the one-paragraph error when the network is built."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

from conftest import FAST, compose_config
from vanishlab import ConfigError
from vanishlab.init import initialise, zeros
from vanishlab.nets import Probe, check_probes
from vanishlab.results import STATUS
from vanishlab.train import fit_and_test

# Modules whose parameters are not `weight` and `bias`.
LAYERS = {
    "rnn": lambda: nn.RNN(4, 3),
    "lstm": lambda: nn.LSTM(4, 3, proj_size=2),
    "gru": lambda: nn.GRU(4, 3),
    "attention": lambda: nn.MultiheadAttention(4, 2),
}


class Probed(nn.Module):
    """A network of `layer` alone, probed as `probes` say (a function of the network)."""

    def __init__(self, layer: nn.Module, probes) -> None:
        super().__init__()
        self.layer, self.out = layer, nn.Identity()
        self.declared = probes

    def probes(self) -> list[Probe]:
        return self.declared(self)


@pytest.mark.parametrize("layer", LAYERS)
def test_recurrent_and_attention_layers_are_probed_by_their_parameter_names(layer, caplog):
    """All parameters but the last named: init zeroes the named biases, gives each named weight
    to the init with its own bias, measures the first, and leaves the unnamed one alone."""
    module = LAYERS[layer]()
    *named, left = (name for name, _ in module.named_parameters())
    net = Probed(module, lambda net: [Probe("layer_00", net.layer, net.out, tuple(named))])
    check_probes(net, "Probed")
    before = module.get_parameter(left).detach().clone()
    calls = []

    def init(weight: Tensor, bias: Tensor | None) -> None:
        calls.append((weight, bias))
        nn.init.constant_(weight, 0.5)

    with caplog.at_level(logging.WARNING, logger="vanishlab.init"):
        initialise(net, init)
    weights = [name for name in named if "bias" not in name]
    biases = [name for name in named if "bias" in name]
    assert [w for w, _ in calls] == [module.get_parameter(name) for name in weights]
    for (_, bias), name in zip(calls, weights, strict=True):
        paired = name.replace("weight", "bias")
        assert bias is (module.get_parameter(paired) if paired in biases else None)
    assert all(torch.all(module.get_parameter(name) == 0.5) for name in weights)
    assert all(torch.all(module.get_parameter(name) == 0) for name in biases)
    assert torch.equal(module.get_parameter(left), before)
    assert "1 parameter(s)" in caplog.text and f"layer.{left}" in caplog.text
    assert net.probes()[0].weight is module.get_parameter(weights[0])


def rnn_probe(net: Probed) -> list[Probe]:
    """What a new user writes first: `weight` and `bias` are not an RNN's."""
    return [Probe("layer_00", net.layer, net.out)]


def two_named_alike(net: Probed) -> list[Probe]:
    return [Probe("layer_00", net.layer, net.out, ("weight",)), Probe("layer_00", net.out, net.out)]


@pytest.mark.parametrize(
    ("layer", "probes", "message"),
    [
        (nn.RNN(4, 3), rnn_probe, "'layer_00' names weight, bias, which its RNN does not have"),
        (nn.Linear(4, 3), two_named_alike, "'layer_00' is the name of two probes"),
        (
            nn.Linear(4, 3),
            lambda net: [Probe("rnn_00", net.layer, net.out)],
            r"'rnn_00' is not named as the dashboards' charts expect",
        ),
        (
            nn.Linear(4, 3),
            lambda net: [Probe("layer_00", net.layer, net.out, role="recurent")],
            "has role 'recurent', not a known role",
        ),
        (
            nn.Linear(4, 3),
            lambda net: [Probe("layer_00", net.layer, net.out, ("bias",))],
            "names no weight of its Linear to measure",
        ),
        (
            nn.Linear(4, 3),
            lambda net: [
                Probe("layer_00", net.layer, net.out, ("weight",)),
                Probe("layer_01", net.layer, net.out, ("weight",)),
            ],
            "'layer_01' names weight, which probe 'layer_00' names too",
        ),
        (
            nn.LSTM(4, 3),
            lambda net: [Probe("layer_00", net.layer, net.layer, ("weight_ih_l0",))],
            "measures the output of its LSTM, which is a tuple, with element=None",
        ),
        (
            nn.MultiheadAttention(4, 2),
            lambda net: [Probe("layer_00", net.layer, net.layer, ("in_proj_weight",))],
            "measures the output of its MultiheadAttention, which is a tuple",
        ),
        (
            nn.LSTM(4, 3),
            lambda net: [Probe("step_000", net.layer, net.layer, (), "time", element=0)],
            r"has role time at the output of its LSTM, .* Fix: unroll the cell \(nn.LSTMCell\)",
        ),
        (
            nn.GRU(4, 3),
            lambda net: [Probe("memory_000", net.out, net.layer, (), "memory", element=0)],
            "has role memory at the output of its GRU",
        ),
    ],
    ids=[
        "missing",
        "duplicate",
        "unmatched",
        "role",
        "no_weight",
        "shared",
        "tuple_lstm",
        "tuple_attention",
        "fused_time",
        "fused_memory",
    ],
)
def test_probes_that_cannot_be_measured_as_declared_end_in_one_paragraph(layer, probes, message):
    with pytest.raises(ConfigError, match=message) as error:
        check_probes(Probed(layer, probes), "mynets.Probed")
    assert str(error.value).startswith("model=mynets.Probed: probe") and "Fix:" in str(error.value)


class OwnRecurrent(nn.Module):
    """The mechanism a recurrent family uses: its input and recurrent weights are two probes of
    one RNN, and its own code initialises the recurrent ones (orthogonal, the biases at
    `forget_bias`) and its positional embedding, unless `recurrent_init="init"` leaves the
    recurrent ones to the `init` group. `extra` is declared by no probe."""

    def __init__(self, recurrent_init: str = "orthogonal", forget_bias: float = 1.0) -> None:
        super().__init__()
        self.recurrent_init = recurrent_init
        self.rnn, self.readout, self.logits = nn.RNN(4, 3), nn.Linear(3, 2), nn.Identity()
        self.position = nn.Parameter(torch.randn(5, 4))
        self.extra = nn.Parameter(torch.ones(2))
        if recurrent_init == "orthogonal":
            nn.init.orthogonal_(self.rnn.weight_hh_l0)
            nn.init.constant_(self.rnn.bias_hh_l0, forget_bias)

    def initialised_roles(self) -> set[str]:
        return {"embedding"} | ({"recurrent"} if self.recurrent_init != "init" else set())

    def probes(self) -> list[Probe]:
        return [
            Probe("layer_00", self, self.rnn, ("position",), "embedding", element=0),
            Probe("layer_01", self.rnn, self.rnn, ("weight_ih_l0", "bias_ih_l0"), "input", 0),
            Probe("layer_02", self.rnn, self.rnn, ("weight_hh_l0", "bias_hh_l0"), "recurrent", 0),
            Probe("layer_03", self.readout, self.logits, role="output"),
        ]


@pytest.mark.parametrize("recurrent_init", ["orthogonal", "init"])
def test_a_network_owning_a_role_keeps_its_init_and_the_group_inits_the_others(
    recurrent_init, caplog
) -> None:
    net = OwnRecurrent(recurrent_init)
    check_probes(net, "OwnRecurrent")
    own = {name: p.detach().clone() for name, p in net.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="vanishlab.init"):
        initialise(net, zeros)
    recurrent = {"rnn.weight_hh_l0", "rnn.bias_hh_l0"}
    kept = {"position", "extra"} | (recurrent if recurrent_init == "orthogonal" else set())
    for name, p in net.named_parameters():
        assert torch.equal(p, own[name]) if name in kept else torch.all(p == 0), name
    # Only the parameter no probe declares was left as PyTorch made it.
    assert "init left 1 parameter(s)" in caplog.text and caplog.text.rstrip().endswith(": extra")


class FusedRows(nn.Module):
    """A user's LSTM over the image's rows in one fused call, probed by its weights at its output
    sequence (`element=0`: an `nn.LSTM` returns the sequence and its last states)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_shape[-1], 8, batch_first=True)
        self.readout, self.logits = nn.Linear(8, num_classes), nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        states, _ = self.lstm(x.flatten(1, 2))
        return self.logits(self.readout(states[:, -1]))

    def probes(self) -> list[Probe]:
        weights = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
        return [
            Probe("layer_00", self.lstm, self.lstm, weights, "input", element=0),
            Probe("layer_01", self.readout, self.logits, role="output"),
        ]


def test_a_fused_lstm_probed_at_its_output_sequence_trains_and_is_measured(tiny_data, tmp_path):
    cfg = compose_config(FAST, tiny_data, tmp_path)
    cfg.model = {"_target_": f"{__name__}.FusedRows"}
    record = fit_and_test(cfg)
    assert record[STATUS] == "completed"
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    for family in ("grad_norm", "backward", "act_std"):
        values = [e.value for e in events.Scalars(f"{family}/layer_00")]
        assert values and all(math.isfinite(v) and v > 0 for v in values)
