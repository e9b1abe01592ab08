import pytest
import torch
import torch.nn.functional as F

from tests.conftest import compose_config
from vanishlab import ConfigError, losses
from vanishlab.losses import mean_loss
from vanishlab.train import build

OUTPUTS = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3
TARGETS = torch.arange(64) % 10
LOSSES = (
    losses.cross_entropy,
    losses.nll,
    losses.mse,
    losses.sigmoid_mse,
    losses.bce,
    losses.squared_error,
)


def test_nll_of_log_softmax_equals_cross_entropy() -> None:
    ce = losses.cross_entropy(OUTPUTS, TARGETS)
    torch.testing.assert_close(losses.nll(OUTPUTS, TARGETS), ce, rtol=0, atol=1e-6)
    expected = F.cross_entropy(OUTPUTS, TARGETS)
    assert abs(mean_loss(losses.cross_entropy, OUTPUTS, TARGETS) - expected) < 1e-6


def test_mse_compares_softmax_probabilities_with_one_hot() -> None:
    probs = OUTPUTS.softmax(1)
    expected = ((probs - torch.eye(10)[TARGETS]) ** 2).mean(1)
    assert torch.allclose(losses.mse(OUTPUTS, TARGETS), expected)


def test_sigmoid_mse_compares_sigmoids_with_one_hot() -> None:
    expected = ((OUTPUTS.sigmoid() - torch.eye(10)[TARGETS]) ** 2).mean(1)
    assert torch.allclose(losses.sigmoid_mse(OUTPUTS, TARGETS), expected)


def test_bce_is_one_vs_rest_binary_cross_entropy() -> None:
    # -t log(sigmoid(z)) - (1 - t) log(1 - sigmoid(z)), written as softplus(z) - t z
    onehot = torch.eye(10)[TARGETS]
    expected = (F.softplus(OUTPUTS) - onehot * OUTPUTS).mean(1)
    assert torch.allclose(losses.bce(OUTPUTS, TARGETS), expected, atol=1e-6)


@pytest.mark.parametrize("fn", LOSSES, ids=lambda fn: fn.__name__)
def test_perfect_predictions_have_lower_loss_than_wrong_ones(fn) -> None:
    right = torch.eye(10)[TARGETS] * 20 - 10
    wrong = torch.eye(10)[(TARGETS + 1) % 10] * 20 - 10
    assert (fn(right, TARGETS) < fn(wrong, TARGETS)).all()


def test_squared_error_is_half_the_summed_squared_error_of_raw_outputs_averaged_over_the_batch():
    per_example = [
        0.5 * sum((OUTPUTS[i, c].item() - float(c == TARGETS[i])) ** 2 for c in range(10))
        for i in range(len(TARGETS))
    ]
    expected = sum(per_example) / len(per_example)
    mean = mean_loss(losses.squared_error, OUTPUTS, TARGETS)
    assert mean.item() == pytest.approx(expected, rel=1e-6)
    # Ten times F.mse_loss's mean over every entry, halved: not the same scale as `mse`'s.
    onehot = torch.eye(10)[TARGETS]
    assert torch.allclose(mean, 5 * F.mse_loss(OUTPUTS, onehot))


@pytest.mark.parametrize("fn", LOSSES, ids=lambda fn: fn.__name__)
def test_each_jobs_mean_loss_from_one_call_is_its_mean_loss_alone(fn) -> None:
    """A stack's (K, B, classes) outputs in one call: job k's loss is its batch's mean alone."""
    outputs, targets = OUTPUTS.view(4, 16, 10), TARGETS.view(4, 16)
    jobs = mean_loss(fn, outputs, targets)
    alone = torch.stack([mean_loss(fn, outputs[k], targets[k]) for k in range(4)])
    assert jobs.shape == (4,)
    torch.testing.assert_close(jobs, alone, rtol=1e-6, atol=0)
    torch.testing.assert_close(alone, fn(OUTPUTS, TARGETS).view(4, 16).mean(1))


def test_a_loss_that_averages_the_batch_itself_is_refused_before_training(tiny_data, tmp_path):
    """The old contract, a scalar per batch: the paragraph names the loss and the fix."""
    with pytest.raises(ConfigError, match=r"'cross_entropy' returned a tensor of shape \(\)"):
        mean_loss(F.cross_entropy, OUTPUTS, TARGETS)
    cfg = compose_config(["loss._target_=torch.nn.functional.nll_loss"], tiny_data, tmp_path)
    with pytest.raises(ConfigError, match=r"'nll_loss' returned .* reduction='none'") as refused:
        build(cfg)
    assert "Fix:" in str(refused.value)
    assert not any(tmp_path.iterdir())  # nothing written: no training started
