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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import NoReturn, Protocol

import torch
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
    "time": "a recurrent network's hidden state at one time step: an activation, no parameters",
    "memory": "an LSTM's cell state at one time step: an activation, no parameters",
    "stream": "a residual stream after one block (a transformer's): an activation, no parameters",
}
# Roles measured by their output alone: no parameters, no weight figures.
ACTIVATION_ROLES = ("time", "memory", "stream")
# The axes the backward signal's first-over-last ratio can run along, by the probes' role, with
# the axis's name: the first a network has (time steps, else the residual stream's blocks), else
# its hidden layers ("layer").
SIGNAL_AXES = {"time": "time step", "stream": "block"}


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

    `element` is for an `output` module that returns a tuple (`nn.MultiheadAttention`: the
    attended values and the attention weights; `nn.LSTM`: the output and its states): the index
    of the tensor measured there. None: the output is one tensor.
    """

    name: str
    layer: nn.Module
    output: nn.Module
    params: tuple[str, ...] = ("weight", "bias")
    role: str | None = None
    element: int | None = None

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
    def is_time(self) -> bool:
        """An activation probe (h_t, an LSTM's c_t, a residual stream): no weight, measured by
        its output alone."""
        return self.role in ACTIVATION_ROLES

    def tapped(self, output: Tensor | tuple[Tensor, ...], tap: Tensor) -> Tensor | tuple:
        """`output` with `tap` added to the measured tensor (the `element` of a tuple)."""
        if self.element is None:
            return output + tap
        e = self.element
        return (*output[:e], output[e] + tap, *output[e + 1 :])

    def measured(self, output: Tensor | tuple[Tensor, ...]) -> Tensor:
        """The tensor this probe measures in its `output` module's output."""
        return output if self.element is None else output[self.element]

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
    naming no weight to measure (a `time` probe names none: it measures its output alone), or a
    parameter two probes name (both would initialise it); a module known to return a tuple
    (`TUPLE_OUTPUTS`) measured with no `element`; a fused recurrent module (`nn.RNN`,
    `nn.LSTM`, `nn.GRU`) as a time step or memory, which it cannot be."""
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
                "name it layer_<NN> (norm_<NN> for a norm layer, recurrent_<NN> for recurrent "
                "weights, step_<NNN> for a time step, memory_<NNN> for an LSTM's cell state "
                "there, stream_<NN> for a residual stream), numbered from the input side",
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
        output = type(probe.output).__name__
        if probe.element is None and isinstance(probe.output, TUPLE_OUTPUTS):
            fail(
                probe,
                f"measures the output of its {output}, which is a tuple, with element=None",
                "name the tensor to measure, e.g. element=0 (the output sequence of an RNN or "
                "LSTM, the attended values of an attention layer)",
            )
        if probe.role in ("time", "memory") and isinstance(probe.output, nn.RNNBase):
            fail(
                probe,
                f"has role {probe.role} at the output of its {output}, which runs every time "
                f"step inside one call: it exposes only its output sequence, whose gradient at "
                f"a step is the loss's direct share there, not what flows back through time",
                f"unroll the cell (nn.{output}Cell) one step at a time as model=rnn does, with an "
                f"nn.Identity per measured step, and probe the {output} by its weights "
                f"(params=('weight_ih_l0', 'weight_hh_l0', ...))",
            )
        named = probe.parameters()
        if probe.is_time and named:
            fail(
                probe,
                f"is a {probe.role} probe, which measures only its output",
                "give it params=()",
            )
        if not probe.is_time and all(is_bias(name) for name in named):
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


# Modules whose output is a tuple: a probe there names the tensor it measures (`element`).
TUPLE_OUTPUTS = (nn.RNNBase, nn.LSTMCell, nn.MultiheadAttention)


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
WIDTH = Domain("model.width", integer(1), "a layer needs at least one unit", "an integer >= 1")
# The keys MLP and CNN share; each is checked as the network is built.
MODEL_DOMAINS = (
    Domain("model.depth", integer(1), "the network needs a hidden layer", "an integer >= 1"),
    WIDTH,
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


PATCH = 4  # pixels on a side of a ViT's patch: 49 tokens for a 28 x 28 image
NORM_POSITIONS = ("pre", "post")
# nn.MultiheadAttention's projections, as one attention probe measures and initialises them.
ATTENTION_PARAMS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
VIT_DOMAINS = (
    WIDTH,
    Domain("model.depth", integer(1), "the network needs a transformer block", "an integer >= 1"),
    Domain("model.heads", integer(1), "attention needs at least one head", "an integer >= 1"),
    Domain(
        "model.norm_position",
        lambda v: v in NORM_POSITIONS,
        "it is not a place for a block's LayerNorms",
        "pre (x + f(norm(x))) or post (norm(x + f(x)))",
    ),
)


class ViT(nn.Module):
    """A vision transformer: the image cut into `PATCH` x `PATCH` patches, each mapped linearly
    to a token of `width` (a convolution whose stride is its kernel), plus a learned positional
    embedding; `depth` blocks of `heads`-head self-attention and an MLP of 4 x `width` GELU
    units; the tokens' mean, and a linear layer to the class logits.

    `norm_position` places each block's two LayerNorms. `pre`: x + attention(norm(x)), then
    x + mlp(norm(x)), and a final LayerNorm before the pool; `post`: norm(x + attention(x)),
    then norm(x + mlp(x)), as in the original transformer. Xiong et al. (2020) show why it
    matters: at init Post-LN's gradients are large near the output and small near the input
    (each LayerNorm on the stream scales the gradient passing back through it), which is why
    Post-LN needs a learning-rate warm-up, while Pre-LN's skip path carries the gradient back
    undivided to every block. The residual stream after each block passes through an
    `nn.Identity`, a `stream` probe, so the backward signal's ratio runs along it. There is
    no `hidden_map()`, so `callbacks=jacobian` refuses the model: the stream's map spans all
    49 tokens (3136 units at width 64, past the callback's `max_width`), not one chain of
    weighted layers.

    The positional embedding is the model's own (`initialised_roles`): truncated normal, std
    0.02, as in ViT (Dosovitskiy et al. 2021), whatever the `init` group.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        width: int = 64,
        depth: int = 6,
        heads: int = 4,
        norm_position: str = "pre",
    ) -> None:
        super().__init__()
        check_arguments(VIT_DOMAINS, locals())
        if width % heads:
            divisors = [h for h in range(1, width + 1) if width % h == 0]
            raise ConfigError(
                f"model.heads={heads} does not divide model.width={width}: each head attends "
                f"over width / heads units. Fix: set model.heads to a divisor of {width} "
                f"({', '.join(map(str, divisors))}) or model.width to a multiple of {heads}."
            )
        channels, height, breadth = input_shape
        self.patches = nn.Conv2d(channels, width, PATCH, stride=PATCH)
        tokens = (height // PATCH) * (breadth // PATCH)
        self.position = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, tokens, width), std=0.02))
        self.embedded = nn.Identity()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(width),
                    "attention": nn.MultiheadAttention(width, heads, batch_first=True),
                    "norm2": nn.LayerNorm(width),
                    "mlp": nn.Sequential(
                        nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
                    ),
                    "stream": nn.Identity(),
                }
            )
            for _ in range(depth)
        )
        self.pre = norm_position == "pre"
        self.norm = nn.LayerNorm(width) if self.pre else nn.Identity()
        self.output = Block(nn.Linear(width, num_classes), nn.Identity())

    def initialised_roles(self) -> tuple[str, ...]:
        return ("embedding",)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embedded(self.patches(x).flatten(2).transpose(1, 2) + self.position)
        for block in self.blocks:
            if self.pre:
                h = block.norm1(x)
                x = x + block.attention(h, h, h, need_weights=False)[0]
                x = x + block.mlp(block.norm2(x))
            else:
                x = block.norm1(x + block.attention(x, x, x, need_weights=False)[0])
                x = block.norm2(x + block.mlp(x))
            x = block.stream(x)
        return self.output(self.norm(x).mean(1))

    def probes(self) -> list[Probe]:
        """`layer_00` the patch embedding (role `input`), `layer_01` the positional embedding;
        per block b its attention (`layer_<3b+2>`, measured at the attended values), its MLP's
        two layers (`layer_<3b+3>` at the GELU, `layer_<3b+4>`), its LayerNorms (`norm_<2b>`,
        `norm_<2b+1>`) and the stream after it (`stream_<b>`); Pre-LN's final LayerNorm
        (`norm_<2 depth>`) and the readout, in the order the forward pass reaches them."""
        probes = [
            Probe("layer_00", self.patches, self.patches, role="input"),
            Probe("layer_01", self, self.embedded, ("position",), "embedding"),
        ]
        for b, block in enumerate(self.blocks):
            attention, mlp = block.attention, block.mlp
            norm1 = Probe(f"norm_{2 * b:02d}", block.norm1, block.norm1)
            norm2 = Probe(f"norm_{2 * b + 1:02d}", block.norm2, block.norm2)
            attend = Probe(
                f"layer_{3 * b + 2:02d}", attention, attention, ATTENTION_PARAMS, "attention", 0
            )
            feed = [
                Probe(f"layer_{3 * b + 3:02d}", mlp[0], mlp[1]),
                Probe(f"layer_{3 * b + 4:02d}", mlp[2], mlp[2]),
            ]
            order = [norm1, attend, norm2, *feed] if self.pre else [attend, norm1, *feed, norm2]
            probes += [*order, Probe(f"stream_{b:02d}", block.stream, block.stream, (), "stream")]
        depth = len(self.blocks)
        final = [Probe(f"norm_{2 * depth:02d}", self.norm, self.norm)] if self.pre else []
        return [*probes, *final, *self.output.probes(3 * depth + 2, "output")]


CELLS: dict[str, Callable[[int, int], nn.Module]] = {
    "tanh": partial(nn.RNNCell, nonlinearity="tanh"),
    "relu": partial(nn.RNNCell, nonlinearity="relu"),
    "lstm": nn.LSTMCell,
    "gru": nn.GRUCell,
}
SEQUENCES = ("rows", "pixels")
RECURRENT_INITS = ("orthogonal", "identity", "init")
MAX_TIME_PROBES = 32
RNN_DOMAINS = (
    Domain(
        "model.cell",
        lambda v: v in CELLS,
        "it is not a known recurrent cell",
        f"one of {', '.join(CELLS)}",
    ),
    Domain("model.depth", integer(1), "the network needs a recurrent layer", "an integer >= 1"),
    WIDTH,
    Domain(
        "model.sequence",
        lambda v: v in SEQUENCES,
        "it is not a way of reading the image as a sequence",
        "rows (28 steps of 28 pixels) or pixels (784 steps of 1)",
    ),
    Domain(
        "model.recurrent_init",
        lambda v: v in RECURRENT_INITS,
        "it is not a known recurrent-weight init",
        "orthogonal, identity, or init (whatever the init group says)",
    ),
    Domain(
        "model.recurrent_scale",
        number(0),
        "it is the recurrent weights' spectral radius",
        "a number >= 0, e.g. 1.0",
    ),
    Domain(
        "model.forget_bias",
        number(-math.inf),
        "it is the LSTM forget gate's bias",
        "a finite number, e.g. 1.0",
    ),
)


class RNN(nn.Module):
    """`depth` stacked recurrent layers of `width` units (`cell`: tanh, relu, lstm, gru) reading
    the image as a sequence (`rows`: 28 steps of 28 pixels; `pixels`: 784 steps of 1), and a
    linear readout of the top layer's last hidden state.

    The cells are unrolled in Python, one `nn.*Cell` call per step, so each step is its own
    autograd node and the top layer's hidden state h_t can be a probe output: an `nn.Identity`
    per recorded step (`self.steps`, at most `MAX_TIME_PROBES` evenly spaced steps, step 0 and
    the last always among them) is applied to h_t in the loop, so GradientFlow's tap there reads
    dL/dh_t. An LSTM's cell state c_t passes through its own identity on those steps
    (`self.memory`) on its way to the next step, so the tap there reads the gradient the memory
    carries back from later steps (the additive path through the forget gates that lets an LSTM
    keep a gradient, Hochreiter & Schmidhuber 1997); the part through h_t is h_t's probe's. The
    last step's c_t is passed to no later step, so it has no memory probe.

    The recurrent weights are the model's own (`initialised_roles`): each gate's block of
    `weight_hh` is `recurrent_scale` (rho, the spectral radius: Pascanu et al. 2013) times an
    orthogonal matrix or the identity (with `cell=relu`, Le et al.'s IRNN), and its biases zero
    but the LSTM forget gate's, at `forget_bias` (Jozefowicz et al. 2015). `recurrent_init=init`
    leaves the recurrent role to the init group (rho and the forget bias then unused).
    """

    # Keys that decide only the initial values, not the shape or the computation: a stack's jobs
    # may differ in them (`stack.stack_key`).
    INIT_KEYS = ("recurrent_init", "recurrent_scale", "forget_bias")

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        cell: str = "tanh",
        width: int = 128,
        depth: int = 1,
        sequence: str = "rows",
        recurrent_init: str = "orthogonal",
        recurrent_scale: float = 1.0,
        forget_bias: float = 1.0,
    ) -> None:
        super().__init__()
        check_arguments(RNN_DOMAINS, locals())
        pixels = math.prod(input_shape)
        self.step_size = input_shape[-1] if sequence == "rows" else 1
        self.num_steps = pixels // self.step_size
        sizes = [self.step_size] + [width] * depth
        self.cells = nn.ModuleList(
            CELLS[cell](i, o) for i, o in zip(sizes[:-1], sizes[1:], strict=True)
        )
        # Each layer's whole hidden sequence passes through its own identity: the output of
        # that layer's weight probes, the sequence the next layer (or the readout) reads.
        self.layers_out = nn.ModuleList(nn.Identity() for _ in self.cells)
        count = min(MAX_TIME_PROBES, self.num_steps)
        spacing = (self.num_steps - 1) / max(count - 1, 1)
        self.recorded = sorted({round(k * spacing) for k in range(count)})
        self.steps = nn.ModuleDict({str(t): nn.Identity() for t in self.recorded})
        lstm = cell == "lstm"
        self.memory = nn.ModuleDict({str(t): nn.Identity() for t in self.recorded if lstm})
        self.output = Block(nn.Linear(width, num_classes), nn.Identity())
        self.recurrent_init = recurrent_init
        if recurrent_init != "init":
            for layer in self.cells:
                init_recurrent(layer, recurrent_init, recurrent_scale, forget_bias)

    def initialised_roles(self) -> tuple[str, ...]:
        return ("recurrent",) if self.recurrent_init != "init" else ()

    def forward(self, x: Tensor) -> Tensor:
        sequence = x.flatten(1).unflatten(1, (self.num_steps, self.step_size))
        top = len(self.cells) - 1
        for index, (cell, out) in enumerate(zip(self.cells, self.layers_out, strict=True)):
            state: Tensor | tuple[Tensor, Tensor] | None = None
            hidden = []
            for t in range(self.num_steps):
                state = cell(sequence[:, t], state)
                h = state[0] if isinstance(state, tuple) else state
                if index == top and str(t) in self.steps:
                    h = self.steps[str(t)](h)
                    state = (h, self.memory[str(t)](state[1])) if isinstance(state, tuple) else h
                hidden.append(h)
            sequence = out(torch.stack(hidden, 1))
        return self.output(sequence[:, -1])

    def probes(self) -> list[Probe]:
        """Per layer `layer_<NN>` (its input weights: role `input` for the first, `hidden` after)
        and `recurrent_<NN>` (its recurrent weights), both measured at the layer's hidden
        sequence; the readout `layer_<depth>`; `step_<TTT>`, the top layer's h_t; and for an
        LSTM `memory_<TTT>`, its c_t."""
        weights = [
            probe
            for index, (cell, out) in enumerate(zip(self.cells, self.layers_out, strict=True))
            for probe in (
                Probe(
                    f"layer_{index:02d}",
                    cell,
                    out,
                    ("weight_ih", "bias_ih"),
                    "input" if index == 0 else "hidden",
                ),
                Probe(f"recurrent_{index:02d}", cell, out, ("weight_hh", "bias_hh"), "recurrent"),
            )
        ]
        readout = self.output.probes(len(self.cells), "output")
        times = [
            Probe(f"step_{t:03d}", m, m, (), "time")
            for t, m in zip(self.recorded, self.steps.values(), strict=True)
        ]
        # The last step's c_t goes to no later step: its identity is no probe.
        carried = list(self.memory.items())[:-1]
        memory = [Probe(f"memory_{int(t):03d}", m, m, (), "memory") for t, m in carried]
        return [*weights, *readout, *times, *memory]


@torch.no_grad()
def init_recurrent(cell: nn.Module, how: str, scale: float, forget_bias: float) -> None:
    """Each gate's `weight_hh` block to `scale` times an orthogonal matrix or the identity (the
    block's spectral radius is then `scale`); `bias_hh` to zero, but an LSTM's forget gate.
    A network built on the `meta` device (to check its keys and size) has no values to set."""
    if cell.weight_hh.is_meta:
        return
    for block in cell.weight_hh.chunk(cell.weight_hh.shape[0] // cell.hidden_size):
        if how == "orthogonal":
            nn.init.orthogonal_(block)
        else:
            block.copy_(torch.eye(cell.hidden_size))
        block.mul_(scale)
    nn.init.zeros_(cell.bias_hh)
    if isinstance(cell, nn.LSTMCell):  # gates i, f, g, o
        cell.bias_hh.chunk(4)[1].fill_(forget_bias)


@contextmanager
def buffers_kept(net: nn.Module) -> Iterator[None]:
    """Put `net`'s buffers (BatchNorm's running statistics) back as they were when the block
    ends: a measurement that runs a training-mode forward leaves no trace in them."""
    before = [b.clone() for b in net.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(net.buffers(), before, strict=True):
                buffer.copy_(value)
