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

    def probes(self) -> list[Probe]:
        """Named by position: `layer_00` (and `norm_00`) is the first hidden block."""
        blocks = [*self.hidden, self.output]
        return [probe for index, block in enumerate(blocks) for probe in block.probes(index)]


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
