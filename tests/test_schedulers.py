"""scheduler=warmup: a linear warm-up to optimizer.lr, then constant or a cosine to eta_min,
stepped and logged every optimizer step; a stacked job gets the lr sequence it gets alone."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from conftest import FAST, compose_config
from vanishlab import ConfigError
from vanishlab.schedulers import warmup
from vanishlab.stack import fit_and_test_stack
from vanishlab.train import build, fit_and_test

STEPS = 20  # two epochs of the tiny data's 500 training images in batches of 50
WARMUP = ["scheduler=warmup", "scheduler.warmup_steps=5", "trainer.max_epochs=2"]


def torch_lrs(lr: float, steps: int, warmup_steps: int, after: str, eta_min: float) -> list[float]:
    """The lr of each optimizer step under torch's own LinearLR, then its CosineAnnealingLR."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    rise = LinearLR(optimizer, 1 / (warmup_steps + 1), total_iters=warmup_steps)
    fall = CosineAnnealingLR(optimizer, steps - warmup_steps, eta_min)
    scheduler = (
        rise if after == "constant" else SequentialLR(optimizer, [rise, fall], [warmup_steps])
    )
    return [stepped(optimizer, scheduler) for _ in range(steps)]


def stepped(optimizer: torch.optim.Optimizer, scheduler) -> float:
    """The lr this step uses; then the step and the scheduler's step after it."""
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return lr


@pytest.mark.parametrize("after", ["constant", "cosine"])
@pytest.mark.parametrize("warmup_steps", [0, 1, 5])
def test_warmup_rises_linearly_to_each_groups_lr_then_stays_or_follows_the_cosine(
    after, warmup_steps
) -> None:
    lrs = [0.1, 0.02]
    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lrs]
    optimizer = torch.optim.SGD(groups)
    scheduler = warmup(optimizer, STEPS, warmup_steps, after, eta_min=0.001)
    steps = []
    for _ in range(STEPS):
        steps.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for lr, seen in zip(lrs, zip(*steps, strict=True), strict=True):
        rise = [lr * (k + 1) / (warmup_steps + 1) for k in range(warmup_steps)]
        assert list(seen[:warmup_steps]) == pytest.approx(rise)
        assert seen[warmup_steps] == pytest.approx(lr)
        assert list(seen) == pytest.approx(torch_lrs(lr, STEPS, warmup_steps, after, 0.001))


def logged_lrs(run_dir) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("lr-SGD")]


@pytest.mark.parametrize("after", ["constant", "cosine"])
def test_warmup_is_stepped_and_logged_every_optimizer_step(after, tiny_data, tmp_path) -> None:
    """The default callbacks' LearningRateMonitor logs as often as the scheduler is stepped; the
    cosine spans the run's optimizer steps (`total_steps: null`)."""
    schedule = [*WARMUP, f"scheduler.after={after}", "scheduler.eta_min=0.001"]
    fit_and_test(compose_config([*FAST, *schedule], tiny_data, tmp_path))
    expected = torch_lrs(0.01, STEPS, 5, after, 0.001)
    assert logged_lrs(tmp_path) == [(step, pytest.approx(lr)) for step, lr in enumerate(expected)]


def test_a_stacked_job_gets_the_warmup_it_gets_alone(tiny_data, tmp_path) -> None:
    """Each job's lr sequence, and its scheduler's state in its checkpoint (which a job that
    trains on from it alone loads), are the ones it has alone."""
    jobs = [["seed=0", "optimizer.lr=0.05"], ["seed=1", "optimizer.lr=0.1"]]
    schedule = [*WARMUP, "scheduler.after=cosine", "scheduler.eta_min=0.001"]

    def configs(where: str) -> list:
        return [
            compose_config([*FAST, *schedule, *job], tiny_data, tmp_path / where / str(i))
            for i, job in enumerate(jobs)
        ]

    for cfg in configs("alone"):
        fit_and_test(cfg)
    fit_and_test_stack(configs("stacked"))
    for i, job in enumerate(jobs):
        alone, stacked = (tmp_path / where / str(i) for where in ("alone", "stacked"))
        lr = float(job[1].partition("=")[2])
        expected = torch_lrs(lr, STEPS, 5, "cosine", 0.001)
        assert [rate for _, rate in logged_lrs(stacked)] == pytest.approx(expected)
        assert logged_lrs(stacked) == logged_lrs(alone)
        own, single = (
            torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["lr_schedulers"]
            for run in (stacked, alone)
        )
        assert own == single


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("scheduler.warmup_steps=-1", "scheduler.warmup_steps=-1 is not allowed"),
        ("scheduler.after=linear", "scheduler.after='linear' is not allowed"),
        ("scheduler.interval=batch", "scheduler.interval='batch' is not allowed"),
        ("scheduler.total_steps=0", "scheduler.total_steps=0 is not allowed"),
    ],
)
def test_bad_warmup_keys_end_in_one_paragraph(override, message, tiny_data, tmp_path) -> None:
    cfg = compose_config([*FAST, "scheduler=warmup", override], tiny_data, tmp_path)
    with pytest.raises(ConfigError, match=message):
        build(cfg)
