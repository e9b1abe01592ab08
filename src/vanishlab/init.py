"""Weight initialisations: each `conf/init/<name>.yaml` points at one function here.

An init function fills one weight in place, and its bias if it has a rule for it (biases start
at zero otherwise). `initialise` applies it to every weight the network's probes name (Linear,
Conv, RNN and attention weights alike), by role: it puts norm probes at weight 1 and bias 0,
leaves the roles the network initialises itself as its own code made them, and names in the log
any parameter no probe names, so no weight keeps PyTorch's default init unnoticed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from vanishlab.nets import Network, Probe, is_bias, roles_initialised_by

log = logging.getLogger(__name__)

InitFn = Callable[[Tensor, Tensor | None], object]


def kaiming_normal(weight: Tensor, bias: Tensor | None, nonlinearity: str = "relu") -> None:
    """He et al.: variance 2/fan_in keeps ReLU activations at constant scale with depth."""
    nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity)


def kaiming_uniform(weight: Tensor, bias: Tensor | None, nonlinearity: str = "relu") -> None:
    nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity)


def xavier_normal(weight: Tensor, bias: Tensor | None) -> None:
    """Glorot & Bengio: variance 2/(fan_in+fan_out), derived for tanh/sigmoid-like units."""
    nn.init.xavier_normal_(weight)


def xavier_uniform(weight: Tensor, bias: Tensor | None) -> None:
    nn.init.xavier_uniform_(weight)


def normal(weight: Tensor, bias: Tensor | None, std: float = 1.0) -> None:
    """N(0, std^2) whatever the layer size; std=1.0 is the course code's plain `torch.randn`."""
    nn.init.normal_(weight, mean=0.0, std=std)


def orthogonal(weight: Tensor, bias: Tensor | None, gain: float = 1.0) -> None:
    nn.init.orthogonal_(weight, gain=gain)


def zeros(weight: Tensor, bias: Tensor | None) -> None:
    """All units compute the same thing and get the same gradient: symmetry is never broken."""
    nn.init.zeros_(weight)


def variance_scaling(
    weight: Tensor, bias: Tensor | None, sigma_w2: float = 1.0, sigma_b2: float = 0.0
) -> None:
    """Weights N(0, sigma_w2 / fan_in), biases N(0, sigma_b2): the parametrisation of
    signal-propagation theory (Poole et al. 2016; `vanishlab.theory`), whose (sigma_w2, sigma_b2)
    plane holds the ordered and chaotic phases and the critical line between them."""
    fan_in = weight[0].numel()
    nn.init.normal_(weight, std=math.sqrt(sigma_w2 / fan_in))
    if bias is not None:
        nn.init.normal_(bias, std=math.sqrt(sigma_b2))


@torch.no_grad()
def initialise(net: Network, init: InitFn) -> None:
    """Initialise every parameter `net`'s probes name (`initialise_probe`), but those of the roles
    `net` initialises itself; log any parameter no probe names, left as PyTorch made it."""
    own = roles_initialised_by(net)
    named = set()
    for probe in net.probes():
        if probe.role not in own:
            initialise_probe(probe, init)
        named.update(id(p) for p in probe.parameters().values())
    untouched = [name for name, p in net.named_parameters() if id(p) not in named]
    if untouched:
        log.warning(
            "init left %d parameter(s) at PyTorch's default init, as no probe declares them: %s",
            len(untouched),
            ", ".join(untouched),
        )


def initialise_probe(probe: Probe, init: InitFn) -> None:
    """A norm probe's weights to 1 and biases to 0; any other's biases to 0, then `init` on each
    weight with its bias (PyTorch's name for it: `weight_ih_l0` -> `bias_ih_l0`), if named."""
    params = probe.parameters()
    if probe.is_norm:
        for name, p in params.items():
            nn.init.constant_(p, 0.0 if is_bias(name) else 1.0)
        return
    biases = {name: p for name, p in params.items() if is_bias(name)}
    for bias in biases.values():
        nn.init.zeros_(bias)
    for name, weight in params.items():
        if name not in biases:
            init(weight, biases.get(name.replace("weight", "bias")))
