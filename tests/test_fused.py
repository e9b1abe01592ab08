"""Fused networks: K same-shape networks run as one vmapped model compute what each computes
alone (logits, gradients, the probes' dL/dh, BatchNorm's running statistics), in as many kernel
launches for K jobs as for one."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vanishlab import ConfigError
from vanishlab.diagnostics import GradientFlow
from vanishlab.fused import FusedNetworks, LaunchCount
from vanishlab.losses import cross_entropy, mean_loss
from vanishlab.nets import CNN, MLP, RNN, Probe, ViT

K, BATCH, SHAPE = 3, 4, (1, 28, 28)
MODELS = {
    "mlp": (MLP, {"depth": 3, "width": 16}),
    "mlp_layernorm": (MLP, {"depth": 3, "width": 16, "norm": "layer"}),
    "mlp_batchnorm": (MLP, {"depth": 3, "width": 16, "norm": "batch"}),
    "cnn_batchnorm": (CNN, {"depth": 3, "width": 4, "norm": "batch", "residual": True}),
    "rnn_tanh": (RNN, {"cell": "tanh", "width": 8}),
    "rnn_lstm": (RNN, {"cell": "lstm", "width": 8, "depth": 2}),
    "vit": (ViT, {"width": 16, "depth": 2, "heads": 2}),
}


def close(actual: Tensor, expected: Tensor, name: str = "") -> None:
    """Equal up to float32 rounding, to the tensor's own scale: measured here, the fused and
    single figures differ by at most 2.5e-6 of the tensor's largest entry, and by 1.4e-7 where
    the true value is 0 (the gradient of a bias that BatchNorm cancels)."""
    atol = 1e-5 * expected.abs().max().item() + 1e-6
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=name)


def seeded(cls: type[nn.Module], seed: int, **keys) -> nn.Module:
    torch.manual_seed(seed)
    return cls(SHAPE, 10, **keys)


def alone(net: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor], dict]:
    """The network's logits, and its taps and activations measured as GradientFlow measures
    them (a forward hook per probe), after the backward of its loss."""
    flow = GradientFlow()
    flow._taps, flow._activations = {}, {}
    hooks = [p.output.register_forward_hook(partial(flow._capture, p)) for p in net.probes()]
    logits = net(x)
    F.cross_entropy(logits, y).backward()
    for hook in hooks:
        hook.remove()
    return logits, flow._taps, flow._activations


@pytest.mark.parametrize("model", MODELS)
def test_each_job_computes_what_its_network_computes_alone(model: str) -> None:
    cls, keys = MODELS[model]
    nets = [seeded(cls, seed, **keys) for seed in range(K)]
    fused = FusedNetworks(nets)
    x, y = torch.randn(K, BATCH, *SHAPE), torch.randint(0, 10, (K, BATCH))
    taps = fused.taps(x)
    logits, activations, _ = fused(x, taps)
    losses = mean_loss(cross_entropy, logits, y)
    losses.sum().backward()
    assert set(taps) == set(activations) == {p.name for p in nets[0].probes()}
    stacked = dict(fused.stacked.named_parameters())
    for k, net in enumerate(nets):
        own_logits, own_taps, own_activations = alone(net, x[k], y[k])
        close(logits[k], own_logits)
        close(losses[k], F.cross_entropy(own_logits, y[k]))
        for name, p in net.named_parameters():
            close(stacked[name].grad[k], p.grad, name)
        for name, tap in own_taps.items():
            close(taps[name].grad[k], tap.grad, name)
            close(activations[name][k], own_activations[name], name)
        # BatchNorm's running statistics (and its batch count) are each job's own.
        for name, value in fused.unstack(k).items():
            close(value, net.state_dict()[name], name)


@pytest.mark.parametrize("model", ["mlp", "rnn_tanh", "vit"])
def test_taps_fit_each_input_shape_they_are_asked_for(model: str) -> None:
    """The probes' shapes are found once per input shape: a batch of another size (an epoch's
    last, smaller batch) gets taps of its own shape, and one of the first size the first's."""
    cls, keys = MODELS[model]
    fused = FusedNetworks([seeded(cls, seed, **keys) for seed in range(K)])
    for batch in (BATCH, BATCH + 3, BATCH):
        x = torch.randn(K, batch, *SHAPE)
        taps = fused.taps(x)
        _, activations, _ = fused(x, taps)
        assert {n: t.shape for n, t in taps.items()} == {n: a.shape for n, a in activations.items()}


def test_fused_batchnorm_running_statistics_follow_each_job_over_steps() -> None:
    nets = [seeded(MLP, seed, depth=2, width=8, norm="batch") for seed in range(K)]
    fused = FusedNetworks(nets)
    for _ in range(3):
        x = torch.randn(K, BATCH, *SHAPE) * torch.tensor([1.0, 2.0, 3.0]).view(K, 1, 1, 1, 1)
        fused(x)
        for net, batch in zip(nets, x, strict=True):
            net(batch)
    stats = [name for name, _ in nets[0].named_buffers()]
    assert stats, "the network has running statistics"
    for k, net in enumerate(nets):
        for name in stats:
            close(fused.unstack(k)[name], net.state_dict()[name], name)
    assert not torch.allclose(fused.unstack(0)[stats[1]], fused.unstack(2)[stats[1]])


@pytest.mark.parametrize(
    ("other", "dtype", "named"),
    [
        ({"width": 12}, torch.float32, "module 'hidden.0.0' is a Linear(in_features=784, out"),
        ({"activation": "tanh"}, torch.float32, "module 'hidden.0.1' is a Tanh() where network"),
        ({"depth": 3}, torch.float32, "module 'hidden.2' is a Block() where network 0's is"),
        ({}, torch.float64, "parameter 'hidden.0.0.weight' is of shape (16, 784), torch.float64"),
    ],
    ids=["width", "activation", "depth", "dtype"],
)
def test_networks_of_different_structure_are_refused(
    other: dict, dtype: torch.dtype, named: str
) -> None:
    keys = {"depth": 2, "width": 16}
    nets = [seeded(MLP, 0, **keys), seeded(MLP, 1, **{**keys, **other}).to(dtype)]
    with pytest.raises(ConfigError) as refused:
        FusedNetworks(nets)
    message = str(refused.value)
    assert f"network 1's {named}" in message
    assert "Fix: fuse only networks built from the same model config" in message
    assert "\n" not in message


def test_a_job_state_round_trips_in_its_network_layout() -> None:
    nets = [seeded(MLP, seed, depth=2, width=8, norm="batch") for seed in range(K)]
    fused = FusedNetworks(nets)
    state = fused.unstack(1)
    assert {n: v.shape for n, v in state.items()} == {
        n: v.shape for n, v in nets[1].state_dict().items()
    }
    fresh = seeded(MLP, 9, depth=2, width=8, norm="batch")
    fresh.load_state_dict(state)  # a checkpoint of job 1 loads into its own network
    fused.load(0, nets[2].state_dict())
    for name, value in nets[2].state_dict().items():
        assert torch.equal(fused.unstack(0)[name], value), name
        assert torch.equal(fused.unstack(1)[name], nets[1].state_dict()[name]), name
    with pytest.raises(ConfigError, match=r"is not its network's: it lacks \['hidden.0.1.bias'"):
        fused.load(0, {n: v for n, v in state.items() if n != "hidden.0.1.bias"})


class Dropped(nn.Module):
    """A layer whose output goes through dropout: the jobs' masks are random draws."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.dropout = nn.Linear(4, 256), nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.layer(x))

    def probes(self) -> list[Probe]:
        return [Probe("layer_00", self.layer, self.dropout)]


def test_dropout_draws_each_job_its_own_mask() -> None:
    torch.manual_seed(0)
    same = Dropped()
    fused = FusedNetworks([copy.deepcopy(same) for _ in range(K)])  # equal weights
    dropped = fused(torch.ones(K, 2, 4)).logits == 0
    assert not torch.equal(dropped[0], dropped[1])
    assert 0.3 < dropped.float().mean() < 0.7
    fused.eval()
    kept = fused(torch.ones(K, 2, 4)).logits
    assert torch.equal(kept[0], kept[1])


# Ops that only reinterpret a tensor's metadata (a view's shape, strides or aliasing): no kernel.
aten = torch.ops.aten


def launches(jobs: int) -> int:
    """Ops in a forward and backward of `jobs` seed MLPs (784-200-200-10) fused, each with its
    own mean cross-entropy, summed (one op over every job's logits)."""
    fused = FusedNetworks([seeded(MLP, seed) for seed in range(jobs)])
    x, y = torch.randn(jobs, 2, *SHAPE), torch.randint(0, 10, (jobs, 2))
    with LaunchCount() as count:
        mean_loss(cross_entropy, fused(x).logits, y).sum().backward()
    return sum(count.ops.values())


def test_a_fused_step_launches_as_many_kernels_for_many_jobs_as_for_one() -> None:
    one, many = launches(1), launches(32)
    assert one > 10  # the counter sees the step's kernels
    assert many <= one + 2


@pytest.mark.parametrize("model", MODELS)
def test_a_fused_backward_keeps_every_gradient_as_it_comes(model: str) -> None:
    """Laid out as their gradients come (`lay_out_as_gradients`), the stacked parameters take
    their gradients with no copy (autograd copies a gradient of another layout into its
    parameter's, every step), and still compute what each network computes alone."""
    cls, keys = MODELS[model]
    nets = [seeded(cls, seed, **keys) for seed in range(K)]
    fused = FusedNetworks(nets)
    x, y = torch.randn(K, BATCH, *SHAPE), torch.randint(0, 10, (K, BATCH))
    fused.lay_out_as_gradients(x)
    with LaunchCount() as count:
        logits = fused(x).logits
        torch.stack([F.cross_entropy(logits[k], y[k]) for k in range(K)]).sum().backward()
    assert count.ops["copy_"] == 0
    stacked = dict(fused.stacked.named_parameters())
    for k, net in enumerate(nets):
        alone(net, x[k], y[k])
        for name, p in net.named_parameters():
            close(stacked[name].grad[k], p.grad, name)
        for name, value in fused.unstack(k).items():
            close(value, net.state_dict()[name], name)
