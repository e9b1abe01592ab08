"""The networks under study, and the one interface every network offers the rest of vanishlab.

A network is an `nn.Module` built as `Net(input_shape=..., num_classes=..., **its config keys)`
(the data module supplies the first two) with one more method, `probes()`: the places that can
be measured, in input-to-output order. Initialisation, gradient-flow diagnostics, verdicts, the
HParams row and the sweep report see a network only through its probes, so a new family (a CNN, a
transformer block) is one class here or in the user's own code, plus one YAML in `conf/model/`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol

from torch import Tensor, nn

from vanishlab import ConfigError
from vanishlab.config import Domain, integer, number

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}
OUTPUT_ACTIVATIONS: dict[str | None, type[nn.Module]] = {None: nn.Identity, "relu": nn.ReLU}
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
# An activation's kind comes from its module's type; the first matching entry names it.
KINDS: tuple[tuple[type[nn.Module] | tuple[type[nn.Module], ...], str], ...] = (
    (nn.ReLU, "relu"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.GELU, "gelu"),
    (nn.Tanh, "tanh"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Identity, "identity"),
    (NORM_LAYERS, "norm"),
)


# What a probe's parameters are to the network, which decides who initialises them: the `init`
# group, unless the network initialises that role itself (`Network.initialised_roles`).
ROLES = {
    "input": "the first weighted layer, which reads the data",
    "hidden": "a weighted layer between the input and output layers",
    "output": "the last weighted layer, which gives the class logits",
    "recurrent": "a recurrent layer's hidden-to-hidden weights",
    "attention": "an attention layer's projections",
    "embedding": "embeddings, positional embeddings and class tokens",
    "norm": "a norm layer's scale and shift, which start at 1 and 0 whatever the init",
}


def is_bias(name: str) -> bool:
    """Whether a probe's parameter `name` is a bias, as PyTorch names them (`bias`,
    `bias_ih_l0`, `in_proj_bias`, `out_proj.bias`); every other parameter is a weight."""
    return "bias" in name.rpartition(".")[2]


def parameter(layer: nn.Module, name: str) -> nn.Parameter | None:
    """`layer`'s parameter `name` (dotted names reach into submodules: `out_proj.weight`), or None
    where the layer keeps the place empty (`nn.Linear(..., bias=False)`'s `bias`). Raises
    AttributeError where it has no such parameter (`nn.RNN` has no `weight`; its `bias` is a flag).
    """
    path, _, attribute = name.rpartition(".")
    value = getattr(layer.get_submodule(path), attribute)
    if value is not None and not isinstance(value, nn.Parameter):
        raise AttributeError(f"{attribute} is a {type(value).__name__}, not a parameter")
    return value


@dataclass(frozen=True)
class Probe:
    """One measured place: `layer` holds the parameters `params` names, which are measured and
    initialised, and `output` is the module whose output is the activation measured there.

    `name` is the probe's stable tag (`layer_03`, `norm_03`: the dashboards' charts match
    `dashboard.PROBE`). `params` are `layer`'s parameter names, dotted into its submodules where
    needed: `("weight", "bias")` by default; `nn.RNN`, `nn.LSTM` and `nn.GRU` name theirs
    `weight_ih_l0`, `weight_hh_l0`, `bias_ih_l0`, ..., and `nn.MultiheadAttention` its
    `in_proj_weight`, `in_proj_bias`, `out_proj.weight`, `out_proj.bias`. A name containing
    `bias` is a bias, any other a weight (`is_bias`). The gradient-flow figures of a probe with
    several weights are those of the first it names (`weight`): list the one to watch first, or
    give each weight a probe of its own (two probes may share a layer and an output, not a
    parameter).

    `role` (one of `ROLES`) says what the parameters are to the network, and so whether the
    `init` group or the network's own code initialises them; it is `norm` for a norm layer (its
    own probe: `layer` and `output` are the norm) and `hidden` for any other layer unless given.
    """

    name: str
    layer: nn.Module
    output: nn.Module
    params: tuple[str, ...] = ("weight", "bias")
    role: str | None = None

    def __post_init__(self) -> None:
        if self.role is None:
            object.__setattr__(
                self, "role", "norm" if isinstance(self.layer, NORM_LAYERS) else "hidden"
            )

    @property
    def kind(self) -> str:
        """What the activation is (`relu`, `sigmoid`, `norm`, ...; `other` if unknown)."""
        return next((kind for cls, kind in KINDS if isinstance(self.output, cls)), "other")

    @property
    def is_norm(self) -> bool:
        return self.role == "norm"

    def parameters(self) -> dict[str, nn.Parameter]:
        """The named parameters, by name; a place the layer keeps empty is left out."""
        found = {name: parameter(self.layer, name) for name in self.params}
        return {name: p for name, p in found.items() if p is not None}

    @property
    def weight(self) -> nn.Parameter:
        """The weight the gradient-flow figures measure: the first named one."""
        return next(p for name, p in self.parameters().items() if not is_bias(name))


class Network(Protocol):
    """What vanishlab needs of a network beyond `nn.Module`: its probes. A network whose own code
    initialises some roles' parameters (an RNN's recurrent weights, a positional embedding) also
    has `initialised_roles() -> Collection[str]`, naming those roles: init leaves them as they
    are (`roles_initialised_by`)."""

    def probes(self) -> list[Probe]: ...


def roles_initialised_by(net: Network) -> frozenset[str]:
    """The roles `net` initialises itself (none, unless it has `initialised_roles()`)."""
    own = getattr(net, "initialised_roles", None)
    return frozenset(own()) if own else frozenset()


def check_probes(net: Network, model: str) -> None:
    """Raise the paragraph `ConfigError` for probes that cannot be measured and initialised as
    declared: a name the dashboards' charts do not match, or that two probes share (their
    figures would be merged); a role outside `ROLES`; a parameter the layer lacks, a probe
    naming no weight to measure, or a parameter two probes name (both would initialise it)."""
    from vanishlab.dashboard import PROBE  # imported here: dashboard imports this module

    def fail(probe: Probe, why: str, fix: str) -> NoReturn:
        raise ConfigError(f"model={model}: probe {probe.name!r} {why}. Fix: {fix}.")

    roles = f"one of {', '.join(ROLES)}"
    names: set[str] = set()
    owners: dict[int, str] = {}
    for probe in net.probes():
        if not re.fullmatch(PROBE, probe.name):
            fail(
                probe,
                f"is not named as the dashboards' charts expect ({PROBE})",
                "name it layer_<NN> (norm_<NN> for a norm layer), numbered from the input side",
            )
        if probe.name in names:
            fail(
                probe,
                "is the name of two probes, whose figures would be merged",
                "number them apart",
            )
        names.add(probe.name)
        if probe.role not in ROLES:
            fail(probe, f"has role {probe.role!r}, not a known role", f"give it {roles}")
        layer = type(probe.layer).__name__
        has = tuple(name for name, _ in probe.layer.named_parameters())
        example = f"Probe({probe.name!r}, layer, output, params={has!r})"
        lacks = [name for name in probe.params if not has_parameter(probe.layer, name)]
        if lacks:
            fail(
                probe,
                f"names {', '.join(lacks)}, which its {layer} does not have",
                f"name the parameters to measure and initialise, e.g. {example} (all it has)",
            )
        named = probe.parameters()
        if all(is_bias(name) for name in named):
            fail(probe, f"names no weight of its {layer} to measure", f"name one, e.g. {example}")
        for name, p in named.items():
            if id(p) in owners:
                fail(
                    probe,
                    f"names {name}, which probe {owners[id(p)]!r} names too",
                    "name each parameter in one probe",
                )
            owners[id(p)] = probe.name
    own = roles_initialised_by(net) - ROLES.keys()
    if own:
        raise ConfigError(
            f"model={model} initialises roles {', '.join(sorted(own))}, which are not known "
            f"roles. Fix: name {roles} in its initialised_roles()."
        )


def has_parameter(layer: nn.Module, name: str) -> bool:
    try:
        parameter(layer, name)
    except AttributeError:
        return False
    return True


class Block(nn.Sequential):
    """A weighted layer, an optional norm of its output, and an activation: the unit most
    networks stack, with its probes named after its place (`index`) in the network and its
    layer's `role` there."""

    def __init__(self, layer: nn.Module, activation: nn.Module, norm: nn.Module | None = None):
        super().__init__(*(m for m in (layer, norm, activation) if m is not None))

    def probes(self, index: int, role: str) -> list[Probe]:
        layer, *norms, activation = self
        norm_probes = [Probe(f"norm_{index:02d}", norm, norm) for norm in norms]
        return [Probe(f"layer_{index:02d}", layer, activation, role=role), *norm_probes]


class Residual(nn.Module):
    """`x + scale * block(x)`: a skip connection around `block`, whose probes are its own."""

    def __init__(self, block: Block, scale: float) -> None:
        super().__init__()
        self.block, self.scale = block, scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.scale * self.block(x)

    def probes(self, index: int, role: str) -> list[Probe]:
        return self.block.probes(index, role)


def check_arguments(domains: tuple[Domain, ...], values: dict[str, object]) -> None:
    """Each `model.<key>` value inside its `Domain` (raises `ConfigError` before any training)."""
    for domain in domains:
        domain.check(values[domain.key.removeprefix("model.")])


NORM_CHOICES = ("none", "batch", "layer")
# The keys MLP and CNN share; each is checked as the network is built.
MODEL_DOMAINS = (
    Domain("model.depth", integer(1), "the network needs a hidden layer", "an integer >= 1"),
    Domain("model.width", integer(1), "a layer needs at least one unit", "an integer >= 1"),
    Domain(
        "model.activation",
        lambda v: v in ACTIVATIONS,
        "it is not a known activation",
        f"one of {', '.join(ACTIVATIONS)}",
    ),
    Domain(
        "model.output_activation",
        lambda v: v in OUTPUT_ACTIVATIONS,
        "it is not a known output activation",
        "null (raw logits) or relu",
    ),
    Domain(
        "model.norm",
        lambda v: v in NORM_CHOICES,
        "it is not a known normalisation",
        f"one of {', '.join(NORM_CHOICES)}",
    ),
    Domain("model.residual", lambda v: isinstance(v, bool), "it is a switch", "true or false"),
    Domain(
        "model.residual_scale",
        number(-math.inf),
        "it multiplies each residual branch",
        "a finite number, e.g. 1.0",
    ),
)


class BlockNet(nn.Module):
    """A stack of hidden `Block`s (weighted layer -> optional norm -> activation) and a linear
    output block: what `MLP` and `CNN` share. A family says which weighted layers it stacks
    (`weighted_layers`), which norm each `norm` option means (`NORMS`), and from which hidden
    block on skips can be added (`SKIPS_FROM`: the first whose input has its output's shape).

    `residual` wraps each of those blocks as `x + residual_scale * block(x)`;
    `output_activation="relu"` reproduces the historical course code, which applied a ReLU to
    the logits. Every key is checked as the network is built (`MODEL_DOMAINS`).
    """

    NORMS: dict[str, Callable[[int], nn.Module] | None]
    SKIPS_FROM: int

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        depth: int,
        width: int,
        activation: str = "relu",
        output_activation: str | None = None,
        norm: str = "none",
        residual: bool = False,
        residual_scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_arguments(MODEL_DOMAINS, locals())
        make_norm = self.NORMS[norm]
        hidden: list[nn.Module] = [
            Block(layer, ACTIVATIONS[activation](), make_norm(width) if make_norm else None)
            for layer in self.weighted_layers(input_shape, depth, width)
        ]
        if residual:
            skips = hidden[self.SKIPS_FROM :]
            hidden[self.SKIPS_FROM :] = [Residual(block, residual_scale) for block in skips]
        self.hidden = nn.Sequential(*hidden)
        output = nn.Linear(width, num_classes)
        self.output = Block(output, OUTPUT_ACTIVATIONS[output_activation]())

    def weighted_layers(
        self, input_shape: tuple[int, ...], depth: int, width: int
    ) -> list[nn.Module]:
        raise NotImplementedError

    def hidden_map(self) -> nn.Module:
        """The map from the first probe's output (the first hidden block's) to the last hidden
        block's output, the identity for one block: the hidden stack `jacobian.Jacobian`
        differentiates. An optional part of the network interface: `callbacks=jacobian` refuses
        a network without it, and nothing else asks for it."""
        return self.hidden[1:]

    def probes(self) -> list[Probe]:
        """Named by position: `layer_00` (and `norm_00`) is the first hidden block, whose layer
        is the `input` one; the output block's is the `output` one, the others `hidden`."""
        blocks = [*self.hidden, self.output]
        roles = ["input", *["hidden"] * (len(blocks) - 2), "output"]
        return [
            probe
            for index, (block, role) in enumerate(zip(blocks, roles, strict=True))
            for probe in block.probes(index, role)
        ]


class MLP(BlockNet):
    """`depth` hidden Linear layers of `width` units on the flattened image, then a linear layer
    to the class logits; `norm` is BatchNorm1d or LayerNorm, and every hidden layer after the
    first can take a skip. Batches keep the image's shape: the MLP flattens its own input."""

    NORMS = {"none": None, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
    SKIPS_FROM = 1

    def __init__(self, input_shape, num_classes, depth: int = 2, width: int = 200, **options):
        super().__init__(input_shape, num_classes, depth, width, **options)

    def weighted_layers(self, input_shape, depth, width) -> list[nn.Module]:
        sizes = [math.prod(input_shape)] + [width] * depth
        return [nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.hidden(x.flatten(1)))


class CNN(BlockNet):
    """`depth` 3x3 convolutions of `width` channels (the first two halve the image), a global
    average pool, and a linear layer to the class logits; `norm` is BatchNorm2d or a GroupNorm of
    one group (LayerNorm over channels and positions), and skips start at the third convolution.
    """

    NORMS = {"none": None, "batch": nn.BatchNorm2d, "layer": lambda c: nn.GroupNorm(1, c)}
    SKIPS_FROM = 2

    def __init__(self, input_shape, num_classes, depth: int = 2, width: int = 16, **options):
        super().__init__(input_shape, num_classes, depth, width, **options)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def weighted_layers(self, input_shape, depth, width) -> list[nn.Module]:
        channels = [input_shape[0]] + [width] * depth
        return [
            nn.Conv2d(c_in, c_out, 3, stride=2 if index < 2 else 1, padding=1)
            for index, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True))
        ]

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.pool(self.hidden(x)))
