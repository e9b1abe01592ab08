"""The mean-field theory (vanishlab.theory) against the published critical points, closed forms,
an independent brute-force integral, and wide random networks simulated at init."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vanishlab import theory


@pytest.mark.parametrize(
    ("activation", "sigma_b2", "critical"),
    [
        ("tanh", 0.0, 1.0),  # tanh'(0) = 1: at q* = 0, chi_1 = sigma_w2
        ("relu", 0.0, 2.0),  # He et al.: chi_1 = sigma_w2 / 2 at any q
        ("relu", 0.05, 2.0),  # ... with a bias too
        ("tanh", 0.05, 1.76),  # Schoenholz et al. 2017
    ],
)
def test_critical_sigma_w2_is_where_the_papers_put_it(activation, sigma_b2, critical) -> None:
    assert theory.critical_sigma_w2(activation, sigma_b2) == pytest.approx(critical, abs=2e-3)


def test_relu_fixed_point_has_its_closed_form_and_none_above_critical() -> None:
    """relu: q' = sigma_w2 q / 2 + sigma_b2, so q* = sigma_b2 / (1 - sigma_w2 / 2) below 2."""
    for sigma_w2, sigma_b2 in ((1.0, 0.05), (1.5, 0.3), (0.5, 1.0)):
        expected = sigma_b2 / (1 - sigma_w2 / 2)
        assert theory.fixed_point_q("relu", sigma_w2, sigma_b2) == pytest.approx(expected)
        assert theory.chi_1("relu", sigma_w2, sigma_b2) == pytest.approx(sigma_w2 / 2)
    assert theory.fixed_point_q("relu", 3.0, 0.05) == math.inf
    assert math.isnan(theory.correlation_depth("relu", 3.0, 0.05))


def test_without_bias_a_weak_tanh_signal_dies_and_chi_1_is_sigma_w2() -> None:
    assert theory.fixed_point_q("tanh", 0.5, 0.0) == 0.0
    assert theory.chi_1("tanh", 0.5, 0.0) == pytest.approx(0.5)
    assert theory.fixed_point_q("tanh", 1.5, 0.0) > 0.1


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_q_star_is_a_fixed_point_of_the_length_map(activation) -> None:
    q = theory.fixed_point_q(activation, 1.5, 0.05)
    assert 0 < q < math.inf
    assert theory.length_map(q, activation, 1.5, 0.05) == pytest.approx(q, rel=1e-9)


def brute_force_chi_1(sigma_w2: float, sigma_b2: float) -> float:
    """chi_1 for sigmoid, its own definition, with the Gaussian integrals as trapezoids on a
    fine grid of x and q* by bisection."""

    def sigmoid(x):
        return 1 / (1 + np.exp(-np.clip(x, -500, 500)))  # exp(500) still fits a float

    def mean(f, q):
        x = np.linspace(-12, 12, 200_001) * math.sqrt(q)
        return np.trapezoid(f(x) * np.exp(-(x**2) / (2 * q)), x) / math.sqrt(2 * math.pi * q)

    low, high = 1e-9, 1e4
    for _ in range(60):
        q = (low + high) / 2
        if sigma_w2 * mean(lambda x: sigmoid(x) ** 2, q) + sigma_b2 > q:
            low = q
        else:
            high = q
    return sigma_w2 * mean(lambda x: (sigmoid(x) * (1 - sigmoid(x))) ** 2, q)


def test_sigmoid_critical_point_holds_by_an_independent_integral() -> None:
    """Sigmoid's critical sigma_w2 is about 100, where q* is about 46: the quadrature must resolve
    a phi that changes over a small part of the Gaussian's width."""
    critical = theory.critical_sigma_w2("sigmoid", 0.05)
    assert 50 < critical < 200
    assert brute_force_chi_1(critical, 0.05) == pytest.approx(1.0, abs=2e-3)


def test_ordered_phase_correlations_go_to_one_at_the_rate_chi_1() -> None:
    assert theory.fixed_point_c("tanh", 1.0, 0.05) == 1.0
    chi_1 = theory.chi_1("tanh", 1.0, 0.05)
    assert chi_1 < 1
    assert theory.correlation_depth("tanh", 1.0, 0.05) == pytest.approx(-1 / math.log(chi_1))


def test_chaotic_phase_has_a_stable_fixed_point_below_one() -> None:
    c = theory.fixed_point_c("tanh", 3.0, 0.05)
    assert 0 < c < 1
    assert theory.correlation_map(c, "tanh", 3.0, 0.05) == pytest.approx(c, abs=1e-9)
    assert theory.chi_1("tanh", 3.0, 0.05) > 1 > theory.chi_c("tanh", 3.0, 0.05)
    assert theory.correlation_map(1.0, "tanh", 3.0, 0.05) == pytest.approx(1.0)


def test_trainable_depth_peaks_at_the_critical_point() -> None:
    critical = theory.critical_sigma_w2("tanh", 0.05)
    grid = [0.5, 1.0, 1.5, critical - 0.05, critical + 0.05, 2.5, 4.0]
    depths = [theory.trainable_depth("tanh", sigma_w2, 0.05) for sigma_w2 in grid]
    assert depths[:4] == sorted(depths[:4]) and depths[4:] == sorted(depths[4:], reverse=True)
    assert min(depths[3:5]) > 5 * max(depths[0], depths[-1])
    assert depths == pytest.approx([6 * theory.correlation_depth("tanh", s, 0.05) for s in grid])


@pytest.mark.parametrize("sigma_w2", [1.0, 3.0])
def test_a_wide_random_tanh_network_settles_where_the_theory_says(sigma_w2) -> None:
    """32 pairs of inputs (correlation 0.9) through an 80-layer tanh network of width 1000 with
    the variance_scaling init: layers 30-80 average the theory's q* and c*, ordered (c* = 1) and
    chaotic (the pairs decorrelate to c* = 0.3). Over seeds 0-5, q was within 3% and c at most
    0.047 above c* (finite width)."""
    rng = np.random.default_rng(0)
    width, sigma_b2 = 1000, 0.05
    z = rng.standard_normal((2, 32, width))
    h = np.stack([z[0], 0.9 * z[0] + math.sqrt(1 - 0.9**2) * z[1]])
    qs, cs = [], []
    for _ in range(80):
        weight = rng.standard_normal((width, width)) * math.sqrt(sigma_w2 / width)
        h = np.tanh(h) @ weight.T + rng.standard_normal(width) * math.sqrt(sigma_b2)
        q = (h**2).mean(-1)
        qs.append(q.mean())
        cs.append(((h[0] * h[1]).mean(-1) / np.sqrt(q[0] * q[1])).mean())
    assert np.mean(qs[30:]) == pytest.approx(
        theory.fixed_point_q("tanh", sigma_w2, sigma_b2), rel=0.05
    )
    assert np.mean(cs[30:]) == pytest.approx(
        theory.fixed_point_c("tanh", sigma_w2, sigma_b2), abs=0.05
    )


def test_bad_inputs_name_the_value_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"activation='gelu' .* Fix: use one of tanh, relu"):
        theory.chi_1("gelu", 1.0, 0.0)
    with pytest.raises(ValueError, match=r"sigma_w2=-1.0, sigma_b2=0.05 .* Fix:"):
        theory.fixed_point_q("tanh", -1.0, 0.05)
