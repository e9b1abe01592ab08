"""Mean-field signal propagation: how deep a randomly initialised network can be and still train
(Poole et al. 2016, "Exponential expressivity in deep neural networks through transient chaos";
Schoenholz et al. 2017, "Deep Information Propagation").

With `init=variance_scaling` (weights N(0, sigma_w2 / fan_in), biases N(0, sigma_b2)) a wide
network's pre-activations are Gaussian, layer after layer. Their variance q follows the length map

    q' = sigma_w2 E[phi(sqrt(q) z)^2] + sigma_b2,        z ~ N(0, 1),

and settles at its fixed point q*. The correlation c of two inputs' pre-activations then follows
the correlation map

    c' = (sigma_w2 E[phi(u1) phi(u2)] + sigma_b2) / q*,
    u1 = sqrt(q*) z1,  u2 = sqrt(q*) (c z1 + sqrt(1 - c^2) z2),

for which c = 1 is always a fixed point, of slope chi_1 = sigma_w2 E[phi'(sqrt(q*) z)^2]. With
chi_1 < 1 (the ordered phase) c = 1 attracts: every pair of inputs ends at one output. With
chi_1 > 1 (chaotic) it repels, and nearby inputs decorrelate to a fixed point c* < 1. Either way
the correlations reach c* as chi_c^depth, chi_c the map's slope at c*: over xi_c = -1 / ln(chi_c)
layers, the correlation depth scale. Information about the input (and the gradient, its dual)
survives about xi_c layers, and Schoenholz et al. found networks train up to a depth of about
6 xi_c (`trainable_depth`). At the critical sigma_w2 (chi_1 = 1), xi_c diverges: any depth trains.

The expectations are Gauss-Hermite quadratures, one-dimensional for the length map and chi_1, on
the product grid for the correlation map; the fixed points are found by bisection, which needs no
derivative and cannot step out of its bracket.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

Function = Callable[[np.ndarray], np.ndarray]

# name (as in model.activation) -> (phi, phi'). Written without exp, so no overflow at large q.
ACTIVATIONS: dict[str, tuple[Function, Function]] = {
    "tanh": (np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "relu": (lambda x: np.maximum(x, 0), lambda x: (x > 0).astype(float)),
    "sigmoid": (
        lambda x: (1 + np.tanh(x / 2)) / 2,
        lambda x: (1 - np.tanh(x / 2) ** 2) / 4,
    ),
}
# Schoenholz et al.: networks deeper than about 6 xi_c did not train.
TRAINABLE_DEPTH_SCALE = 6
# Probabilists' Gauss-Hermite nodes and weights, normalised so that the weights sum to 1. A
# saturating phi varies over a width of about 1 / sqrt(q) in z, which the nodes must resolve:
# 300 (numpy's weights overflow from about 350) give tanh's values here to 1e-9, and sigmoid's
# critical sigma_w2 (about 103, where q* is about 46) to 0.05%. An even count puts no node at 0,
# where relu' jumps.
NODES, WEIGHTS = np.polynomial.hermite_e.hermegauss(300)
WEIGHTS = WEIGHTS / math.sqrt(2 * math.pi)
# A fixed point q* of 0 (the signal dies out) or inf (it grows without bound) is a limit the
# signal approaches: the slopes are taken at these ends of the scale.
Q_MIN, Q_MAX = 1e-12, 1e12


def phi_and_derivative(activation: str) -> tuple[Function, Function]:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation={activation!r} has no mean-field theory here. "
            f"Fix: use one of {', '.join(ACTIVATIONS)}."
        )
    return ACTIVATIONS[activation]


def check_variances(sigma_w2: float, sigma_b2: float) -> None:
    if not (sigma_w2 > 0 and sigma_b2 >= 0):
        raise ValueError(
            f"sigma_w2={sigma_w2!r}, sigma_b2={sigma_b2!r} are not variances of an init that "
            f"passes a signal. Fix: sigma_w2 > 0 and sigma_b2 >= 0, e.g. 1.76 and 0.05."
        )


def gaussian_mean(f: Function, q: float) -> float:
    """E[f(sqrt(q) z)], z ~ N(0, 1)."""
    return float(WEIGHTS @ f(math.sqrt(q) * NODES))


def pair_mean(f: Function, q: float, c: float) -> float:
    """E[f(u1) f(u2)] for u1, u2 Gaussian with variance q each and correlation c."""
    z1, z2 = NODES[:, None], NODES[None, :]
    u1 = math.sqrt(q) * z1
    u2 = math.sqrt(q) * (c * z1 + math.sqrt(max(1 - c * c, 0.0)) * z2)
    return float(WEIGHTS @ (f(u1) * f(u2)) @ WEIGHTS)


def bisect(f: Callable[[float], float], low: float, high: float) -> float:
    """A root of `f` between `low` and `high`, where f changes sign: 60 halvings reach the
    float's precision on any bracket used here."""
    low_sign = f(low) > 0
    for _ in range(60):
        middle = (low + high) / 2
        if (f(middle) > 0) == low_sign:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def length_map(q: float, activation: str, sigma_w2: float, sigma_b2: float) -> float:
    """The variance of the next layer's pre-activations, given this layer's: q'(q)."""
    phi, _ = phi_and_derivative(activation)
    return sigma_w2 * gaussian_mean(lambda x: phi(x) ** 2, q) + sigma_b2


@functools.cache  # every map below asks for it, the bisections again at each step
def fixed_point_q(activation: str, sigma_w2: float, sigma_b2: float) -> float:
    """q*, the variance a deep network's pre-activations settle at whatever the input: 0 when
    the signal dies out (no bias, and sigma_w2 below where the map's slope at 0 passes 1), inf
    when no fixed point holds it (relu above sigma_w2 = 2: the signal grows without bound).
    For the activations here the length map crosses the diagonal at most once above 0."""
    check_variances(sigma_w2, sigma_b2)

    def excess(q: float) -> float:
        return length_map(q, activation, sigma_w2, sigma_b2) - q

    if excess(Q_MIN) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        if high >= Q_MAX:
            return math.inf
        high *= 4
    return bisect(excess, Q_MIN, high)


def signal_variance(activation: str, sigma_w2: float, sigma_b2: float) -> float:
    """q*, taken at Q_MIN or Q_MAX when it is 0 or inf: the slopes there are their limits."""
    return min(max(fixed_point_q(activation, sigma_w2, sigma_b2), Q_MIN), Q_MAX)


def chi_1(activation: str, sigma_w2: float, sigma_b2: float) -> float:
    """The correlation map's slope at c = 1, sigma_w2 E[phi'(sqrt(q*) z)^2]: also the factor by
    which a layer multiplies the squared norm of a backpropagated gradient. Below 1 gradients
    vanish with depth and inputs merge (ordered); above 1 they explode and inputs decorrelate
    (chaotic)."""
    _, derivative = phi_and_derivative(activation)
    q = signal_variance(activation, sigma_w2, sigma_b2)
    return sigma_w2 * gaussian_mean(lambda x: derivative(x) ** 2, q)


def correlation_map(c: float, activation: str, sigma_w2: float, sigma_b2: float) -> float:
    """The correlation of two inputs' pre-activations in the next layer, given this layer's
    c, both inputs' variances being at q*."""
    phi, _ = phi_and_derivative(activation)
    q = signal_variance(activation, sigma_w2, sigma_b2)
    return (sigma_w2 * pair_mean(phi, q, c) + sigma_b2) / q


def fixed_point_c(activation: str, sigma_w2: float, sigma_b2: float) -> float:
    """c*, the correlation every pair of inputs ends at: 1 in the ordered phase (chi_1 <= 1),
    below 1 in the chaotic phase, where the map rises above the diagonal at c = 0 (or touches it:
    odd phi without bias) and, of slope chi_1 > 1 at c = 1, ends below it just before. nan when
    q* is inf: correlations then have no fixed point the theory describes."""
    if chi_1(activation, sigma_w2, sigma_b2) <= 1:
        return 1.0
    if math.isinf(fixed_point_q(activation, sigma_w2, sigma_b2)):
        return math.nan

    def excess(c: float) -> float:
        return correlation_map(c, activation, sigma_w2, sigma_b2) - c

    return bisect(excess, 0.0, 1 - 1e-9)


def chi_c(activation: str, sigma_w2: float, sigma_b2: float) -> float:
    """The correlation map's slope at c*, sigma_w2 E[phi'(u1) phi'(u2)] at correlation c*:
    chi_1 in the ordered phase (c* = 1)."""
    c = fixed_point_c(activation, sigma_w2, sigma_b2)
    if c == 1.0:
        return chi_1(activation, sigma_w2, sigma_b2)
    if math.isnan(c):
        return math.nan
    _, derivative = phi_and_derivative(activation)
    q = signal_variance(activation, sigma_w2, sigma_b2)
    return sigma_w2 * pair_mean(derivative, q, c)


def correlation_depth(activation: str, sigma_w2: float, sigma_b2: float) -> float:
    """xi_c = -1 / ln(chi_c): the depth over which correlations between inputs reach c*, so the
    depth over which a network still tells its inputs apart; inf at the critical sigma_w2."""
    slope = chi_c(activation, sigma_w2, sigma_b2)
    return math.inf if slope >= 1 else -1 / math.log(slope)


def trainable_depth(activation: str, sigma_w2: float, sigma_b2: float) -> float:
    """Schoenholz et al.'s bound: networks deeper than about 6 xi_c did not train."""
    return TRAINABLE_DEPTH_SCALE * correlation_depth(activation, sigma_w2, sigma_b2)


def critical_sigma_w2(activation: str, sigma_b2: float) -> float:
    """The sigma_w2 at which chi_1 = 1 for this bias variance: the edge between order and chaos,
    where signals and gradients neither vanish nor explode with depth. chi_1 rises with sigma_w2,
    so the search doubles sigma_w2 until chi_1 passes 1, then bisects."""

    def crossing(sigma_w2: float) -> float:
        return chi_1(activation, sigma_w2, sigma_b2) - 1

    high = 1.0
    while crossing(high) <= 0:
        high *= 2
    return bisect(crossing, high / 2 if high > 1 else 1e-6, high)


def jacobian_log10_mean_sq_singular_value(
    activation: str, sigma_w2: float, sigma_b2: float, layers: int
) -> float:
    """log10 of the mean squared singular value of the Jacobian of `layers` layers at q*,
    chi_1^layers: each layer multiplies a vector's squared norm by chi_1 on average
    (Pennington, Schoenholz & Ganguli 2017), whatever the spread of the singular values, which
    the mean does not tell. Orthogonal weights with gain g have the same chi_1 at sigma_w2 = g^2.
    Taken as log10, so a deep product of slopes far from 1 neither overflows nor reads 0."""
    return layers * math.log10(chi_1(activation, sigma_w2, sigma_b2))
