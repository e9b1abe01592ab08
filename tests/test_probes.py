"""Probes of any module: a probe names the parameters it measures and initialises, and its role
says whether the `init` group or the network's own code initialises them; probes that cannot be
measured as declared end in the one-paragraph error when the network is built."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

from vanishlab import ConfigError
from vanishlab.init import initialise, zeros
from vanishlab.nets import Probe, check_probes

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
    ],
    ids=["missing", "duplicate", "unmatched", "role", "no_weight", "shared"],
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
            Probe("layer_00", self, self.rnn, ("position",), role="embedding"),
            Probe("layer_01", self.rnn, self.rnn, ("weight_ih_l0", "bias_ih_l0"), role="input"),
            Probe("layer_02", self.rnn, self.rnn, ("weight_hh_l0", "bias_hh_l0"), role="recurrent"),
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
