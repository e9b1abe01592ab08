"""K same-shape networks as one batched model: one forward and one backward for a stack's jobs.

`FusedNetworks` holds the K networks' parameters and buffers stacked along a leading job
dimension, in a copy of the first network whose every tensor is (K, ...) (`stacked`), and runs
them with `torch.func.vmap` over `torch.func.functional_call`: each kernel runs once for the K
jobs where the jobs alone would launch it K times. Each job keeps its own parameters, its own
batch (x is (K, B, ...)) and its own BatchNorm running statistics (the buffers are mapped over
the jobs, so training-mode BatchNorm updates each job's slice in place). The gradient of the
K jobs' summed loss is each job's own, as in `stack.py`: their parameters are disjoint slices.

Taps: the backward signal dL/dh at each probe (`diagnostics.py`) is read from a zero tensor
added to the probe's output h. A tap made inside `vmap` gets no `.grad`, so the taps are made
outside, one (K, *h.shape) tensor per probe (`taps`), passed into the vmapped function mapped
over the jobs, and added to the measured tensor by a forward hook on the probe's output module,
which inside `vmap` sees job k's slice of h and of its tap. After backward job k's dL/dh is
`tap.grad[k]`, its activation `activations[name][k]`.

Dropout draws each job's own mask (vmap's `randomness="different"`): independent, as separate
jobs would draw, but not the stream a job alone would draw from its seed.

Some of PyTorch's kernels have no vmap batching rule: the recurrent cells (`nn.RNNCell`,
`nn.LSTMCell`, `nn.GRUCell`: vmap runs the first and third once per job, and refuses the LSTM
cell) and CPU flash attention (`nn.MultiheadAttention` on the CPU: once per job). `BATCHED`
registers a decomposition for each into ops vmap batches (the cells' formulas as ATen's
RNN.cpp writes them, attention's from `torch._decomp`), as `torch._functorch` registers its own;
a PyTorch that brings its own rule keeps it.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._decomp import decomposition_table
from torch.func import functional_call, stack_module_state, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from vanishlab import ConfigError
from vanishlab.nets import Probe, buffers_kept


def rnn_tanh_cell(x, hx, w_ih, w_hh, b_ih=None, b_hh=None) -> Tensor:
    return torch.tanh(F.linear(x, w_ih, b_ih) + F.linear(hx, w_hh, b_hh))


def rnn_relu_cell(x, hx, w_ih, w_hh, b_ih=None, b_hh=None) -> Tensor:
    return torch.relu(F.linear(x, w_ih, b_ih) + F.linear(hx, w_hh, b_hh))


def lstm_cell(x, hx, w_ih, w_hh, b_ih=None, b_hh=None) -> tuple[Tensor, Tensor]:
    h, c = hx
    i, f, g, o = (F.linear(h, w_hh, b_hh) + F.linear(x, w_ih, b_ih)).chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_cell(x, hx, w_ih, w_hh, b_ih=None, b_hh=None) -> Tensor:
    i_r, i_z, i_n = F.linear(x, w_ih, b_ih).chunk(3, 1)
    h_r, h_z, h_n = F.linear(hx, w_hh, b_hh).chunk(3, 1)
    reset, update = torch.sigmoid(h_r + i_r), torch.sigmoid(h_z + i_z)
    new = torch.tanh(i_n + h_n * reset)
    return (hx - new) * update + new


aten = torch.ops.aten
flash_cpu = aten._scaled_dot_product_flash_attention_for_cpu.default
BATCHED: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    aten.rnn_tanh_cell.default: rnn_tanh_cell,
    aten.rnn_relu_cell.default: rnn_relu_cell,
    aten.lstm_cell.default: lstm_cell,
    aten.gru_cell.default: gru_cell,
    flash_cpu: decomposition_table[flash_cpu],
}
_library = torch.library.Library("aten", "IMPL", "FuncTorchBatched")
for _op, _decomposition in BATCHED.items():
    if not torch._C._dispatch_has_kernel_for_dispatch_key(_op.name(), "FuncTorchBatched"):
        _library.impl(_op, _decomposition)


def fusion_error(nets: list[nn.Module]) -> str | None:
    """Why `nets` cannot run as one batched model, or None: each must have the first's module
    types and settings (`extra_repr`) at the same names, its parameter and buffer names, shapes
    and dtypes, and its probes at the same output modules. A setting a module keeps outside
    `extra_repr` (a `Residual`'s scale) is the stack key's to match (`stack.stack_key`)."""
    if not nets:
        return "there are no networks"
    first = layout(nets[0])
    for k, net in enumerate(nets[1:], 1):
        other = layout(net)
        for part, ours in first.items():
            theirs = other[part]
            if theirs != ours:
                name = next(n for n in {**ours, **theirs} if ours.get(n) != theirs.get(n))
                return (
                    f"network {k}'s {part} {name!r} is {theirs.get(name, 'missing')} where "
                    f"network 0's is {ours.get(name, 'missing')}"
                )
    return None


def layout(net: nn.Module) -> dict[str, dict[str, str]]:
    """What must be equal for networks to fuse, by part and name, as the refusal says it."""
    qualified = {id(m): name for name, m in net.named_modules()}
    tensors = {"parameter": net.named_parameters(), "buffer": net.named_buffers()}
    return {
        "module": {n: f"a {type(m).__name__}({m.extra_repr()})" for n, m in net.named_modules()},
        **{
            part: {n: f"of shape {tuple(t.shape)}, {t.dtype}" for n, t in named}
            for part, named in tensors.items()
        },
        "probe": {
            p.name: f"at element {p.element} of module {qualified.get(id(p.output))!r}"
            for p in net.probes()
        },
    }


class Outputs(NamedTuple):
    """A fused forward's results, the jobs along dim 0 of each tensor."""

    logits: Tensor
    activations: dict[str, Tensor]  # by probe name, with taps (else none)
    losses: Tensor | None = None  # (K,), where the caller takes them (`stack.FusedStack`)


class FusedNetworks(nn.Module):
    """`nets` (same structure, `fusion_error`) as one model: `forward(x)` with x (K, B, ...)
    gives each job's logits (K, B, C) on its own batch. Each parameter is one `nn.Parameter`
    of shape (K, ...), so an optimizer owns the K jobs' values at once; `unstack(k)` and
    `load(k, state)` give and take job k's state in its network's own layout (its checkpoint).
    """

    def __init__(self, nets: list[nn.Module]) -> None:
        super().__init__()
        why = fusion_error(nets)
        if why:
            raise ConfigError(
                f"{len(nets)} networks cannot be fused into one batched model: {why}. Fix: "
                f"fuse only networks built from the same model config (a stack's jobs, whose "
                f"stack key is equal), or train them one by one."
            )
        params, buffers = stack_module_state(nets)
        self.num_jobs = len(nets)
        # The first network's structure holding the stacked tensors: its modules run each job's
        # slice under functional_call, and its state_dict has the single network's keys.
        self.stacked = copy.deepcopy(nets[0])
        for name, value in params.items():
            replace(self.stacked, name, nn.Parameter(value))
        for name, value in buffers.items():
            replace(self.stacked, name, value)
        self._taps: dict[str, Tensor] | None = None  # job k's slices, inside vmap
        self._activations: dict[str, Tensor] = {}
        # Each probe's measured shape and dtype, by input shape and dtype (`taps`).
        self._tap_shapes: dict[tuple, dict[str, tuple[torch.Size, torch.dtype]]] = {}
        for probe in self.stacked.probes():
            probe.output.register_forward_hook(partial(self._tap, probe))

    def state(self) -> dict[str, Tensor]:
        """The stacked parameters and buffers by their name in the single network."""
        return {**dict(self.stacked.named_parameters()), **dict(self.stacked.named_buffers())}

    def forward(self, x: Tensor, taps: dict[str, Tensor] | None = None) -> Outputs:
        """Each job's logits (K, B, C) on its batch x[k]. With `taps` (`taps(x)`): each probe's
        tap is added to its measured tensor, and the probes' activations (K, ...) come too,
        detached, by probe name. The losses are left to the caller: a loss is taken over the K
        jobs' samples in one call outside the vmap (`losses.mean_loss`), where a vmapped loss
        would pay vmap's dispatch of its every op, forward and backward."""
        job = vmap(self._job, in_dims=(0, 0, None if taps is None else 0), randomness="different")
        return Outputs(*job(self.state(), x, taps))

    def _job(
        self, state: dict[str, Tensor], x: Tensor, taps: dict[str, Tensor] | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One job's forward, as vmap runs it: its slices of the state, batch and taps; its
        logits and activations."""
        self._taps, self._activations = taps, {}
        try:
            # The stacked copy holds a tensor of its own under each name (`__init__`): there
            # are no tied weights to look for on every call.
            logits = functional_call(self.stacked, state, (x,), tie_weights=False)
            return logits, self._activations
        finally:
            self._taps, self._activations = None, {}

    def _tap(self, probe: Probe, module: nn.Module, inputs: Any, output: Any) -> Any:
        """Keep the probe's activation and add its tap (none in `taps`' own shape pass)."""
        if self._taps is None:
            return None
        self._activations[probe.name] = probe.measured(output).detach()
        tap = self._taps.get(probe.name)
        return None if tap is None else probe.tapped(output, tap)

    def taps(self, x: Tensor) -> dict[str, Tensor]:
        """A zero tap per probe for a forward of x, (K, *h.shape) in h's dtype, requiring a
        gradient: after backward, `tap.grad[k]` is job k's dL/dh. The shapes come from one
        job's forward on the meta device, which computes nothing, once per input shape."""
        key = (tuple(x.shape[1:]), x.dtype)
        if key not in self._tap_shapes:
            meta = {name: value[0].to("meta") for name, value in self.state().items()}
            self._taps, self._activations = {}, {}
            try:
                functional_call(self.stacked, meta, (x[0].to("meta"),))
                measured = self._activations
            finally:
                self._taps, self._activations = None, {}
            self._tap_shapes[key] = {name: (h.shape, h.dtype) for name, h in measured.items()}
        return {
            name: torch.zeros(
                self.num_jobs, *shape, dtype=dtype, device=x.device, requires_grad=True
            )
            for name, (shape, dtype) in self._tap_shapes[key].items()
        }

    def lay_out_as_gradients(self, x: Tensor) -> None:
        """Store each stacked parameter in the memory layout its gradient comes in, found by a
        training step's forward and backward of `x` with the probes' taps: autograd keeps a
        gradient laid out as its parameter, and copies any other into that layout every step
        (a batched linear's weight gradient comes transposed). The step leaves no trace: the
        buffers (running statistics) are put back, and the random stream too. Raises whatever
        the forward or backward raises."""
        params = list(self.parameters())
        with buffers_kept(self), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            taps = self.taps(x)
            logits = self(x, taps).logits
            grads = torch.autograd.grad(logits.sum(), [*params, *taps.values()], allow_unused=True)
        with torch.no_grad():
            for param, grad in zip(params, grads[: len(params)], strict=True):
                # empty_like keeps a dense gradient's strides (any other: contiguous)
                laid_out = torch.empty_like(param if grad is None else grad).copy_(param)
                if laid_out.stride() != param.stride():
                    param.data = laid_out

    def unstack(self, k: int) -> dict[str, Tensor]:
        """Job k's state_dict, in its own network's layout (keys and shapes)."""
        return {name: value[k] for name, value in self.stacked.state_dict().items()}

    @torch.no_grad()
    def load(self, k: int, state_dict: dict[str, Tensor]) -> None:
        """Set job k's parameters and buffers from a state_dict of its network."""
        own = self.stacked.state_dict()
        if own.keys() != state_dict.keys():
            missing, unexpected = own.keys() - state_dict.keys(), state_dict.keys() - own.keys()
            raise ConfigError(
                f"the state given for job {k} is not its network's: it lacks "
                f"{sorted(missing) or 'nothing'} and has {sorted(unexpected) or 'nothing'} "
                f"more. Fix: load a state_dict of the same model config (`unstack` gives one)."
            )
        for name, value in state_dict.items():
            own[name][k].copy_(value)


def replace(module: nn.Module, name: str, value: Tensor) -> None:
    """Set `module`'s parameter or buffer `name` (dotted into submodules) to `value`."""
    path, _, attribute = name.rpartition(".")
    setattr(module.get_submodule(path), attribute, value)


class LaunchCount(TorchDispatchMode):
    """Counts the backend ops run under it (`ops`, by name), views and other metadata-only ops
    left out: on a GPU each is a kernel launch, what a fused stack saves (`make bench`, line 9)."""

    METADATA_OPS = (aten._unsafe_view, aten._reshape_alias)

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.overloadpacket in self.METADATA_OPS):
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
