import pytest
import torch
import torch.nn.functional as F

from vanishlab import losses

OUTPUTS = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3
TARGETS = torch.arange(64) % 10


def test_nll_of_log_softmax_equals_cross_entropy() -> None:
    ce = losses.cross_entropy(OUTPUTS, TARGETS)
    assert abs(losses.nll(OUTPUTS, TARGETS) - ce) < 1e-6
    assert abs(ce - F.cross_entropy(OUTPUTS, TARGETS)) < 1e-6


def test_mse_compares_softmax_probabilities_with_one_hot() -> None:
    probs = OUTPUTS.softmax(1)
    expected = ((probs - torch.eye(10)[TARGETS]) ** 2).mean()
    assert torch.allclose(losses.mse(OUTPUTS, TARGETS), expected)


def test_sigmoid_mse_compares_sigmoids_with_one_hot() -> None:
    expected = ((OUTPUTS.sigmoid() - torch.eye(10)[TARGETS]) ** 2).mean()
    assert torch.allclose(losses.sigmoid_mse(OUTPUTS, TARGETS), expected)


def test_bce_is_one_vs_rest_binary_cross_entropy() -> None:
    p = OUTPUTS.sigmoid()
    onehot = torch.eye(10)[TARGETS]
    expected = -(onehot * p.log() + (1 - onehot) * (1 - p).log()).mean()
    assert torch.allclose(losses.bce(OUTPUTS, TARGETS), expected, atol=1e-6)


def test_perfect_predictions_have_lower_loss_than_wrong_ones() -> None:
    right = torch.eye(10)[TARGETS] * 20 - 10
    wrong = torch.eye(10)[(TARGETS + 1) % 10] * 20 - 10
    for fn in (
        losses.cross_entropy,
        losses.nll,
        losses.mse,
        losses.sigmoid_mse,
        losses.bce,
        losses.squared_error,
    ):
        assert fn(right, TARGETS) < fn(wrong, TARGETS), fn.__name__


def test_squared_error_is_half_the_summed_squared_error_of_raw_outputs_averaged_over_the_batch():
    per_example = [
        0.5 * sum((OUTPUTS[i, c].item() - float(c == TARGETS[i])) ** 2 for c in range(10))
        for i in range(len(TARGETS))
    ]
    expected = sum(per_example) / len(per_example)
    assert losses.squared_error(OUTPUTS, TARGETS).item() == pytest.approx(expected, rel=1e-6)
    # Ten times F.mse_loss's mean over every entry, halved: not the same scale as `mse`'s.
    onehot = torch.eye(10)[TARGETS]
    assert torch.allclose(losses.squared_error(OUTPUTS, TARGETS), 5 * F.mse_loss(OUTPUTS, onehot))
