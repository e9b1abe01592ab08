"""The networks under study: plain MLPs whose depth and activation are the experiment."""

from __future__ import annotations

from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}
OUTPUT_ACTIVATIONS: dict[str | None, type[nn.Module]] = {None: nn.Identity, "relu": nn.ReLU}


class MLP(nn.Module):
    """`depth` hidden layers of `width` units, then a linear layer to the class logits.

    Layers sit in one flat `nn.Sequential` (Linear, activation, ..., Linear, output activation),
    so diagnostics can pair each Linear layer with its activation in input-to-output order.
    `output_activation="relu"` reproduces the historical course code, which applied a ReLU to
    the logits.
    """

    def __init__(
        self,
        depth: int = 2,
        width: int = 200,
        activation: str = "relu",
        output_activation: str | None = None,
        in_features: int = 784,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.output_activation = output_activation
        sizes = [in_features] + [width] * depth
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
        layers += [nn.Linear(sizes[-1], num_classes), OUTPUT_ACTIVATIONS[output_activation]()]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    def blocks(self) -> list[tuple[nn.Linear, nn.Module]]:
        """Each Linear layer with the activation after it, input side first."""
        return list(zip(self.layers[0::2], self.layers[1::2], strict=True))
