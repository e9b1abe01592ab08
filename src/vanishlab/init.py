"""Weight initialisations: each `conf/init/<name>.yaml` points at one function here.

An init function fills one weight matrix in place; `initialise` applies it to every Linear
layer and sets biases to zero, so a new init is a single function of the weight (plus its keys).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

InitFn = Callable[[Tensor], object]


def kaiming_normal(weight: Tensor) -> None:
    """He et al.: variance 2/fan_in keeps ReLU activations at constant scale with depth."""
    nn.init.kaiming_normal_(weight, nonlinearity="relu")


def kaiming_uniform(weight: Tensor) -> None:
    nn.init.kaiming_uniform_(weight, nonlinearity="relu")


def xavier_normal(weight: Tensor) -> None:
    """Glorot & Bengio: variance 2/(fan_in+fan_out), derived for tanh/sigmoid-like units."""
    nn.init.xavier_normal_(weight)


def xavier_uniform(weight: Tensor) -> None:
    nn.init.xavier_uniform_(weight)


def normal(weight: Tensor, std: float = 1.0) -> None:
    """N(0, std^2) whatever the layer size; std=1.0 is the course code's plain `torch.randn`."""
    nn.init.normal_(weight, mean=0.0, std=std)


def orthogonal(weight: Tensor, gain: float = 1.0) -> None:
    nn.init.orthogonal_(weight, gain=gain)


def zeros(weight: Tensor) -> None:
    """All units compute the same thing and get the same gradient: symmetry is never broken."""
    nn.init.zeros_(weight)


def initialise(net: nn.Module, init: InitFn) -> None:
    """Apply `init` to every Linear weight of `net`; zero every Linear bias."""
    for module in net.modules():
        if isinstance(module, nn.Linear):
            init(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
