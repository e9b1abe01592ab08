"""The sharpness callback: the right eigenvalue, at the right steps, and no trace on training."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from conftest import FAST, Recorder, bare_trainer, compose_config
from vanishlab.data import TensorBatches
from vanishlab.losses import squared_error
from vanishlab.module import Classifier
from vanishlab.results import SHARPNESS, SHARPNESS_TIMES_LR
from vanishlab.sharpness import Sharpness
from vanishlab.train import build_seeded


def test_a_linear_models_sharpness_is_the_top_eigenvalue_of_its_inputs_second_moment() -> None:
    """With outputs W x + b and `squared_error`, the Hessian is the same at every weight: for
    each class, the second moment of [x, 1] over the batch. Its top eigenvalue is measured at
    steps 0, 2, 4 and the last, 5, on the first 64 examples of the first batch."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.ones(12)
    scales[3] = 3.0  # one direction stands out: a clear top eigenvalue
    x = torch.randn(256, 12, generator=generator) * scales
    y = torch.randint(0, 10, (256,), generator=generator)
    lr = 0.05
    module = Classifier(nn.Linear(12, 10), squared_error, partial(torch.optim.SGD, lr=lr))
    sharpness = Sharpness(every_n_steps=2, batch_size=64, tolerance=1e-7, max_iterations=200)
    recorder = Recorder()
    trainer = bare_trainer(max_steps=6, callbacks=[sharpness], logger=recorder)
    trainer.fit(module, train_dataloaders=TensorBatches(x, y, 128))

    inputs = torch.cat([x[:64], torch.ones(64, 1)], dim=1).double()
    expected = torch.linalg.eigvalsh(inputs.T @ inputs / 64)[-1].item()
    measured = [(step, m) for step, m in recorder.logged if SHARPNESS in m]
    assert [step for step, _ in measured] == [0, 2, 4, 5]
    for _, metrics in measured:
        assert metrics[SHARPNESS] == pytest.approx(expected, rel=1e-4)
        assert metrics[SHARPNESS_TIMES_LR] == pytest.approx(expected * lr / 2, rel=1e-4)
    assert sharpness.evidence() == measured[-1][1]


@pytest.mark.parametrize("remedy", ["none", "batchnorm"])
def test_measuring_sharpness_leaves_training_as_it_was(remedy, tiny_data, tmp_path) -> None:
    """Weights, BatchNorm's running statistics, the gradients left for the step and the global
    RNG end as in a run without the callback, which measures at every step."""
    cfg = compose_config([*FAST, f"remedy={remedy}"], tiny_data, tmp_path)
    ends = []
    for callbacks in ([], [Sharpness(every_n_steps=1, batch_size=30)]):
        datamodule, module = build_seeded(cfg)
        bare_trainer(max_steps=8, callbacks=callbacks).fit(module, datamodule=datamodule)
        grads = [p.grad for p in module.parameters()]
        ends.append((module.net.state_dict(), grads, torch.get_rng_state(), module.training))
    (weights, grads, rng, training), (measured_weights, measured_grads, measured_rng, _) = ends
    assert weights.keys() == measured_weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, measured_weights[name]), name
    assert all(torch.equal(a, b) for a, b in zip(grads, measured_grads, strict=True))
    assert torch.equal(rng, measured_rng) and training
