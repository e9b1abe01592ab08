"""The networks under study, and the one interface every network offers the rest of vanishlab.

A network is an `nn.Module` built as `Net(input_shape=..., num_classes=..., **its config keys)`
(the data module supplies the first two) with one more method, `probes()`: the places that can
be measured, in input-to-output order. Initialisation, gradient-flow diagnostics, verdicts, the
HParams row and the sweep report see a network only through its probes, so a new family (a CNN, a
transformer block) is one class here or in the user's own code, plus one YAML in `conf/model/`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

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


@dataclass(frozen=True)
class Probe:
    """One measured place: `layer` holds the weight (and bias) whose gradient is measured, and
    `output` is the module whose output is the activation measured there.

    `name` is the probe's stable tag (`layer_03`, `norm_03`). A norm layer is its own probe
    (`layer` and `output` are the norm), so its scale and shift are measured beside the weights.
    """

    name: str
    layer: nn.Module
    output: nn.Module

    @property
    def kind(self) -> str:
        """What the activation is (`relu`, `sigmoid`, `norm`, ...; `other` if unknown)."""
        return next((kind for cls, kind in KINDS if isinstance(self.output, cls)), "other")

    @property
    def is_norm(self) -> bool:
        return isinstance(self.layer, NORM_LAYERS)


class Network(Protocol):
    """What vanishlab needs of a network beyond `nn.Module`."""

    def probes(self) -> list[Probe]: ...


class Block(nn.Sequential):
    """A weighted layer, an optional norm of its output, and an activation: the unit most
    networks stack, with its probes named after its place (`index`) in the network."""

    def __init__(self, layer: nn.Module, activation: nn.Module, norm: nn.Module | None = None):
        super().__init__(*(m for m in (layer, norm, activation) if m is not None))

    def probes(self, index: int) -> list[Probe]:
        layer, *norms, activation = self
        norm_probes = [Probe(f"norm_{index:02d}", norm, norm) for norm in norms]
        return [Probe(f"layer_{index:02d}", layer, activation), *norm_probes]


class Residual(nn.Module):
    """`x + scale * block(x)`: a skip connection around `block`, whose probes are its own."""

    def __init__(self, block: Block, scale: float) -> None:
        super().__init__()
        self.block, self.scale = block, scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.scale * self.block(x)

    def probes(self, index: int) -> list[Probe]:
        return self.block.probes(index)


def hidden_blocks(
    layers: list[nn.Module],
    sizes: list[int],
    activation: str,
    make_norm: Callable[[int], nn.Module] | None,
) -> list[Block]:
    """Each weighted layer with a norm of its `size` outputs (if any) and its activation."""
    return [
        Block(layer, ACTIVATIONS[activation](), make_norm(size) if make_norm else None)
        for layer, size in zip(layers, sizes, strict=True)
    ]


def output_block(width: int, num_classes: int, output_activation: str | None) -> Block:
    return Block(nn.Linear(width, num_classes), OUTPUT_ACTIVATIONS[output_activation]())


def with_skips(blocks: list[Block], start: int, scale: float) -> list[nn.Module]:
    """`blocks`, those from `start` on wrapped in `Residual`."""
    return [*blocks[:start], *(Residual(block, scale) for block in blocks[start:])]


def block_probes(blocks: list[nn.Module]) -> list[Probe]:
    """The probes of a network that is a stack of (`Residual`) `Block`s, named by position."""
    return [probe for index, block in enumerate(blocks) for probe in block.probes(index)]


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


class MLP(nn.Module):
    """`depth` hidden layers of `width` units, then a linear layer to the class logits.

    `norm` normalises each hidden layer's pre-activation (Linear -> norm -> activation). With
    `residual`, every hidden layer after the first adds its output to its input,
    `x + residual_scale * act(norm(W x + b))`; the first maps the input to `width`.
    `output_activation="relu"` reproduces the historical course code, which applied a ReLU to
    the logits. The input is flattened here, so batches keep the image's shape.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        depth: int = 2,
        width: int = 200,
        activation: str = "relu",
        output_activation: str | None = None,
        norm: str = "none",
        residual: bool = False,
        residual_scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_arguments(MODEL_DOMAINS, locals())
        sizes = [math.prod(input_shape)] + [width] * depth
        linears = [nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
        norms = {"none": None, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
        hidden = hidden_blocks(linears, sizes[1:], activation, norms[norm])
        if residual:
            hidden = with_skips(hidden, 1, residual_scale)
        output = output_block(width, num_classes, output_activation)
        self.blocks = nn.Sequential(*hidden, output)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x.flatten(1))

    def probes(self) -> list[Probe]:
        return block_probes(list(self.blocks))


class CNN(nn.Module):
    """`depth` 3x3 convolutions of `width` channels (the first two halve the image), a global
    average pool, and a linear layer to the class logits. `norm` and `residual` as in `MLP`
    (`layer` is a GroupNorm of one group, LayerNorm over channels and positions; the skips start
    at the third convolution, the first whose input has its shape)."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        depth: int = 2,
        width: int = 16,
        activation: str = "relu",
        output_activation: str | None = None,
        norm: str = "none",
        residual: bool = False,
        residual_scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_arguments(MODEL_DOMAINS, locals())
        channels = [input_shape[0]] + [width] * depth
        convolutions = [
            nn.Conv2d(c_in, c_out, 3, stride=2 if index < 2 else 1, padding=1)
            for index, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True))
        ]
        norms = {"none": None, "batch": nn.BatchNorm2d, "layer": lambda c: nn.GroupNorm(1, c)}
        hidden = hidden_blocks(convolutions, channels[1:], activation, norms[norm])
        if residual:
            hidden = with_skips(hidden, 2, residual_scale)
        self.features = nn.Sequential(*hidden)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.output = output_block(width, num_classes, output_activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.pool(self.features(x)))

    def probes(self) -> list[Probe]:
        return block_probes([*self.features, self.output])
