"""Batched SGD and Adam over a job dimension equal K separate torch.optim runs: weights, state,
clipping and schedules, a stopped job left as it is, and launches per step that do not grow
with K."""

import copy
import functools

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.func import functional_call, stack_module_state
from torch.optim.lr_scheduler import CosineAnnealingLR, StepLR
from torch.utils._python_dispatch import TorchDispatchMode

from vanishlab import ConfigError
from vanishlab.batched_optim import BatchedAdam, BatchedSGD, clip_grad_norm_per_job_
from vanishlab.schedulers import lr_scheduler, warmup

SGD_JOBS = [
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
    {"lr": 0.05},
    {"lr": 0.02, "momentum": 0.8, "nesterov": True, "weight_decay": 1e-4},
    {"lr": 0.07, "momentum": 0.5, "dampening": 0.3},
]
ADAM_JOBS = [
    {"lr": 1e-2},
    {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 1e-2},
    {"lr": 5e-3, "betas": (0.95, 0.9), "amsgrad": True},
]
CASES = [(torch.optim.SGD, BatchedSGD, SGD_JOBS), (torch.optim.Adam, BatchedAdam, ADAM_JOBS)]
# float32 on CPU: after 50 steps the stacked jobs' weights were bit-equal to theirs alone, on
# x86 at each of torch's CPU capabilities (default, AVX2, AVX512), for layers of 6 to 257 units;
# the tolerance allows for CPUs whose kernels fuse a multiply and add that the batched step does
# as two operations (or the reverse)
ATOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread spares each operation the thread pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def loss_of(model: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)


class Runs:
    """K jobs trained alone (`models`, each with its torch optimizer) and as one stack (`params`,
    stacked along dim 0, with a batched optimizer). Each job's gradient in the stack is its own
    loss's, computed on its slice by the same float ops as alone, so only the optimizers differ.
    """

    def __init__(self, alone: type, batched: type, jobs: list[dict]) -> None:
        self.models = [mlp(seed) for seed in range(len(jobs))]
        self.optimizers = [
            alone(m.parameters(), **job) for m, job in zip(self.models, jobs, strict=True)
        ]
        self.params, _ = stack_module_state(copy.deepcopy(self.models))
        self.optimizer = batched.for_jobs(self.params.values(), jobs)
        self.skeleton = mlp(0)
        self.data = torch.Generator().manual_seed(1)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(len(self.models), 8, 6, generator=self.data)
        return x, torch.randint(0, 3, (len(self.models), 8), generator=self.data)

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for model, optimizer, xk, yk in zip(self.models, self.optimizers, x, y, strict=True):
            optimizer.zero_grad()
            loss_of(model, dict(model.named_parameters()), xk, yk).backward()
        self.optimizer.zero_grad()
        losses = [
            loss_of(self.skeleton, {n: p[k] for n, p in self.params.items()}, x[k], y[k])
            for k in range(len(self.models))
        ]
        torch.stack(losses).sum().backward()

    def step(self, jobs: range | list[int] | None = None) -> None:
        """One step of every job alone (of `jobs` only, if given) and of the stack."""
        self.backward(*self.batch())
        for k, optimizer in enumerate(self.optimizers):
            if jobs is None or k in jobs:
                optimizer.step()
        self.optimizer.step()

    def job_params(self, k: int) -> list[torch.Tensor]:
        return [p[k] for p in self.params.values()]

    def difference(self) -> float:
        """The largest difference between a stacked job's weights and its weights alone."""
        return max(
            (p[k] - q).abs().max().item()
            for k, model in enumerate(self.models)
            for p, q in zip(self.params.values(), model.parameters(), strict=True)
        )


def assert_state_equal(ours: dict, theirs: dict) -> None:
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in theirs["state"].items():
        assert ours["state"][index].keys() == state.keys()
        for key, value in state.items():
            assert ours["state"][index][key].dtype == value.dtype
            torch.testing.assert_close(ours["state"][index][key], value, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("alone", "batched", "jobs"), CASES)
def test_each_job_trains_as_it_does_alone(alone, batched, jobs):
    runs = Runs(alone, batched, jobs)
    for _ in range(50):
        runs.step()
    print(f"{batched.__name__}: largest weight difference after 50 steps {runs.difference():.3g}")
    assert runs.difference() <= ATOL
    first = mlp(0)
    assert not torch.equal(runs.params["0.weight"][0], first[0].weight)  # it trained
    for k, optimizer in enumerate(runs.optimizers):
        assert_state_equal(runs.optimizer.job_state_dict(k), optimizer.state_dict())


@pytest.mark.parametrize(("alone", "batched", "jobs"), CASES)
def test_a_stopped_job_keeps_its_weights_and_state_and_its_nans(alone, batched, jobs):
    runs = Runs(alone, batched, jobs)
    for _ in range(3):
        runs.step()
    runs.optimizer.active[1] = False
    weights = [p.clone() for p in runs.job_params(1)]
    state = runs.optimizer.job_state_dict(1)
    others = [k for k in range(len(jobs)) if k != 1]
    for _ in range(5):
        runs.backward(*runs.batch())
        for p in runs.params.values():
            p.grad[1] = float("nan")  # it diverged
        for k in others:
            runs.optimizers[k].step()
        runs.optimizer.step()
    assert all(torch.equal(p, w) for p, w in zip(runs.job_params(1), weights, strict=True))
    assert_state_equal(runs.optimizer.job_state_dict(1), state)
    for k in others:
        for p, q in zip(runs.job_params(k), runs.models[k].parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=ATOL, rtol=0)
        assert all(torch.isfinite(p).all() for p in runs.job_params(k))


def test_a_job_stopped_before_its_first_step_has_no_state_and_then_starts_as_alone():
    runs = Runs(torch.optim.Adam, BatchedAdam, ADAM_JOBS)
    runs.optimizer.active[2] = False
    for _ in range(2):
        runs.step(jobs=[0, 1])
    assert_state_equal(runs.optimizer.job_state_dict(2), runs.optimizers[2].state_dict())
    runs.optimizer.active[2] = True  # its first step is Adam's first (bias corrections)
    for _ in range(3):
        runs.step()
    assert runs.difference() <= ATOL
    assert_state_equal(runs.optimizer.job_state_dict(2), runs.optimizers[2].state_dict())


@pytest.mark.parametrize(("alone", "batched", "jobs"), CASES)
def test_a_job_resumes_from_its_state_dict(alone, batched, jobs):
    runs = Runs(alone, batched, jobs)
    for _ in range(5):
        runs.step()
    saved = [optimizer.state_dict() for optimizer in runs.optimizers]
    resumed = batched.for_jobs(runs.params.values(), [{"lr": 1.0}] * len(jobs))
    for k, state in enumerate(saved):
        resumed.load_job_state_dict(k, copy.deepcopy(state))
        assert_state_equal(resumed.job_state_dict(k), state)
    runs.optimizer = resumed  # trains on from the loaded state and hyperparameters
    for _ in range(10):
        runs.step()
    assert runs.difference() <= ATOL


def test_a_state_dict_of_another_model_is_refused():
    runs = Runs(torch.optim.SGD, BatchedSGD, SGD_JOBS)
    runs.step()
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1).state_dict()
    with pytest.raises(ConfigError, match="job 0 .*same model"):
        runs.optimizer.load_job_state_dict(0, other)


def test_clipping_equals_clip_grad_norm_of_each_job_alone():
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 5, 6), (4, 5), (4,)]
    scales = torch.tensor([1e-3, 1.0, 30.0, float("nan")])  # the last job diverged
    grads = [
        torch.randn(shape, generator=generator) * scales.view(-1, *[1] * (len(shape) - 1))
        for shape in shapes
    ]
    params = [torch.zeros(shape, requires_grad=True) for shape in shapes]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    norms = clip_grad_norm_per_job_(params, max_norm=1.0)
    for k in range(4):
        alone = [torch.zeros(g[k].shape, requires_grad=True) for g in grads]
        for p, g in zip(alone, grads, strict=True):
            p.grad = g[k].clone()
        norm = nn.utils.clip_grad_norm_(alone, max_norm=1.0)
        torch.testing.assert_close(norms[k], norm, equal_nan=True)
        for p, q in zip(params, alone, strict=True):
            torch.testing.assert_close(p.grad[k], q.grad, equal_nan=True)
    assert all(torch.isfinite(p.grad[:3]).all() for p in params)


SCHEDULERS = {
    "warmup then cosine": functools.partial(
        warmup, total_steps=12, warmup_steps=4, after="cosine", eta_min=1e-4
    ),
    "warmup": functools.partial(warmup, total_steps=12, warmup_steps=4),
    "cosine": functools.partial(CosineAnnealingLR, T_max=7, eta_min=1e-4),
    "step": functools.partial(StepLR, step_size=3, gamma=0.1),
}


@pytest.mark.parametrize("make", SCHEDULERS.values(), ids=SCHEDULERS)
def test_schedulers_give_each_job_its_lr_alone(make):
    runs = Runs(torch.optim.SGD, BatchedSGD, SGD_JOBS)
    schedulers = [make(optimizer) for optimizer in runs.optimizers]
    scheduler = make(runs.optimizer)
    for _ in range(15):
        runs.step()
        for s in [*schedulers, scheduler]:
            s.step()
        lrs = [optimizer.param_groups[0]["lr"] for optimizer in runs.optimizers]
        assert runs.optimizer.param_groups[0]["lr"].tolist() == lrs
    assert runs.difference() <= ATOL
    for k, optimizer in enumerate(runs.optimizers):  # `initial_lr` included
        assert_state_equal(runs.optimizer.job_state_dict(k), optimizer.state_dict())


def test_bad_settings_are_refused_before_training():
    params = [torch.zeros(3, 4, requires_grad=True)]
    with pytest.raises(ConfigError, match="Job 1 .*Invalid learning rate: -0.1"):
        BatchedSGD(params, lr=[0.1, -0.1, 0.1])
    with pytest.raises(ConfigError, match="Job 0 .*Nesterov"):
        BatchedSGD(params, lr=0.1, nesterov=[True, False, False])
    with pytest.raises(ConfigError, match="Job 2 .*beta"):
        BatchedAdam(params, betas=(0.9, [0.99, 0.99, 1.5]))
    with pytest.raises(ConfigError, match="optimizer.lr has 2 values for a stack of 3 jobs"):
        BatchedAdam(params, lr=[0.1, 0.2])
    with pytest.raises(ConfigError, match="optimizer.maximize=True .*default False"):
        BatchedAdam(params, maximize=True)
    with pytest.raises(ConfigError, match="optimizer.betas is not a setting of torch.optim.SGD"):
        BatchedSGD(params, betas=(0.9, 0.99))
    with pytest.raises(ConfigError, match="dim 0"):
        BatchedSGD([*params, torch.zeros(2, requires_grad=True)], lr=0.1)


class OpCount(TorchDispatchMode):
    """The operations run, but views (metadata only: view, t, detach, select, ...) and the
    profiler's marks (`Optimizer.step` records itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not (func.is_view or func.namespace == "profiler")
        return func(*args, **(kwargs or {}))


def ops_per_step(batched: type, jobs: list[dict], k: int) -> tuple[int, int]:
    """The operations of the second optimizer step, and of clipping, for a stack of k jobs."""
    params = [torch.randn(k, 5, 6, requires_grad=True), torch.randn(k, 5, requires_grad=True)]
    optimizer = batched.for_jobs(params, [jobs[0]] * k)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        with OpCount() as step:
            optimizer.step()
    with OpCount() as clip:
        clip_grad_norm_per_job_(params, 1.0)
    return step.ops, clip.ops


@pytest.mark.parametrize(("alone", "batched", "jobs"), CASES)
def test_operations_per_step_do_not_grow_with_the_jobs(alone, batched, jobs):
    counts = {k: ops_per_step(batched, jobs, k) for k in (1, 8, 32)}
    print(f"{batched.__name__} (step, clip) operations by K: {counts}")
    assert len(set(counts.values())) == 1
    assert np.all(np.array(list(counts.values())) > 0)


class StackOfLinears(pl.LightningModule):
    """Three jobs' linear classifiers as one (3, 4, 2) weight, trained by Lightning with a
    batched Adam, the `warmup` scheduler and per-job clipping, as a fused stack would be."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4, 2))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        logits = torch.einsum("bi,kio->kbo", x, self.weight)
        return nn.functional.cross_entropy(logits.reshape(-1, 2), y.repeat(3))

    def configure_optimizers(self) -> dict:
        optimizer = BatchedAdam.for_jobs([self.weight], ADAM_JOBS)
        make = functools.partial(warmup, interval="step", total_steps=None, warmup_steps=3)
        return {"optimizer": optimizer, "lr_scheduler": lr_scheduler(make, optimizer, self.trainer)}

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        clip_grad_norm_per_job_(self.parameters(), gradient_clip_val)


def test_lightning_trains_with_a_batched_optimizer_and_its_scheduler():
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    module = StackOfLinears()
    start = module.weight.detach().clone()
    trainer = pl.Trainer(
        max_epochs=2,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    optimizer = trainer.optimizers[0]
    assert optimizer.param_groups[0]["lr"].tolist() == [job["lr"] for job in ADAM_JOBS]
    assert optimizer.job_state_dict(0)["state"][0]["step"] == trainer.global_step == 8
    assert (module.weight != start).all()
