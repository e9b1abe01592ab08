"""Gradient-flow diagnostics: the per-probe figures that show why a network does or does not learn.

`GradientFlow` measures each probe the network declares (`nets.Probe`; `layer_00` = input side,
`norm_XX` a norm layer's scale) every `every_n_steps` optimizer steps and writes the figures to
every logger. Between those steps it does nothing: no hooks, no copies, no host-device syncs, so
training runs at full speed.

- `grad_norm/<probe>`      L2 norm of the weight gradient, after backward and before the step
                           (and before any `trainer.gradient_clip_val` clipping)
- `weight_norm/<probe>`    L2 norm of the weight
- `update_ratio/<probe>`   norm of the applied update / weight norm (any optimizer)
- `act_mean/`, `act_std/`  the probe's output activation over the batch
- `dead_frac/<probe>`      ReLU hidden layers: units that are 0 for every example (output 0 and
                           gradient 0: dead). Leaky ReLU and GELU units never are.
- `saturated_frac/<probe>` sigmoid/tanh hidden layers: outputs within 2% of their bounds.
                           Both are read from the probe alone, by its output module's kind, so
                           activation probes (an RNN's h_t, an LSTM's c_t, a residual stream)
                           have neither: their output module is an `nn.Identity` after the cell
                           or block, and which nonlinearity made h_t (a tanh cell's, an LSTM's
                           o * tanh(c), a ReLU cell's unbounded one) is not the probe's to say;
                           bounds guessed from the values would call any small state saturated.
- `grad_norm/first_over_last`  first layer's gradient norm over the last layer's (layer probes)
- `backward/<probe>`       L2 norm of dL/dh, the loss's gradient at the probe's output
                           activation h: the backward signal that reaches that layer
- `backward/first_over_last`  that norm at the first hidden layer probe over the last hidden
                           one (the output's is the loss's own gradient; norm probes left out),
                           or along the first axis the network has (`nets.SIGNAL_AXES`): step
                           0 over the last step (role `time`: an RNN's h_t), the residual
                           stream after the first block over after the last (role `stream`).
                           Such activation probes are measured by activation and dL/dh only
- `dead_outputs`           with an output ReLU: classes whose output is 0 for every example
- `Log10/grad_norm/...`, `Log10/update_ratio/...`, `Log10/backward/...`  the same figures as
                           log10, for the eye

Each family is defined once, in `dashboard.FAMILIES`: its tag, whether it is also shown as
log10, and its dashboard charts. A new family is an entry there and its line in `measure`.

The record keeps the backward profile (`results.BACKWARD_NORMS_START`, `BACKWARD_NORMS`): the
norms `backward/first_over_last` divides, every probe along its axis (time steps, the residual
stream's blocks, or the hidden layers), at the first and the last measured step, and the axis's
name, from the probes' role alone (`nets.SIGNAL_AXES`).

The last optimizer step of training is always measured. Each `histograms_every_n_epochs` epochs,
and at that last step, it also draws histograms and the gradient-flow figure (`dashboard.py`).
`evidence_on_test_split` measures the trained network on the test split (`Predictions`).

The backward signal is read from taps: on a measured step each probe's output h becomes
`h + tap`, where `tap` is a zero tensor that requires a gradient (not a parameter), so after
backward `tap.grad` is exactly dL/dh, with no hook on the backward pass. A plain network gets its
taps from a forward hook on each probe's `output` module (`GradientFlow._capture`); hooks that
make tensors, or `Tensor.register_hook`, do not work inside `torch.func.vmap` (a tap made there
gets no `.grad`). A vmapped model (a stack's jobs as one batched network,
`fused.FusedNetworks`) makes each probe's tap outside `vmap`, one for all K jobs
(`FusedNetworks.taps`), passes them in mapped over the jobs and returns the activations
(`forward(x, taps)`). So GradientFlow measures over a leading job dimension: `gradients` takes
a measured step's weights, their gradients and dL/dh with the jobs along dim 0, `measure` turns
them into every job's figures with one host sync, and `keep` writes one job's to its loggers and
record. A single run is one job (its hooks' tensors with a new dim 0); a fused stack
(`stack.FusedStack`) hands in its K jobs' at once.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from tensorboard.compat.proto.summary_pb2 import HistogramProto
from torch import Tensor, nn

from vanishlab.batched_optim import norms_per_job
from vanishlab.dashboard import (
    ACT_MEAN,
    ACT_STD,
    BACKWARD,
    DEAD_FRAC,
    GRAD_NORM,
    LOG10,
    LOG10_FAMILIES,
    SATURATED_FRAC,
    UPDATE_RATIO,
    WEIGHT_NORM,
    Family,
    gradient_flow_figure,
    job_histograms,
    log10_display,
    probe_histograms,
    shows_histograms,
    write_histograms,
    write_layout,
    write_scalars,
)
from vanishlab.data import MNISTDataModule
from vanishlab.nets import SIGNAL_AXES, Probe
from vanishlab.results import (
    BACKWARD_FIRST_OVER_LAST,
    BACKWARD_NORMS,
    BACKWARD_NORMS_START,
    BACKWARD_START,
    CLASSES,
    CLASSES_PREDICTED,
    DEAD_CLASSES,
    FIRST_OVER_LAST,
    GRAD_NORMS_AT_START,
    MAX_DEAD,
    MAX_SATURATED,
    SIGNAL_AXIS,
    START,
    axis_position,
)

BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}
SATURATION_MARGIN = 0.02  # of the output range


# Keys in GradientFlow's state: the backward ratio, and the profile along its axis.
BACKWARD_RATIO, PROFILE, AXIS = "backward_first_over_last", "backward_norms", "signal_axis"


class GradientFlow(pl.Callback):
    """Logs per-probe gradient flow; keeps the figures the run's verdict needs (`evidence`).

    `at_first_step` holds the layer probes' gradient norms, their first-over-last ratio and the
    backward signal's and its profile at the first measured step (the network as initialised),
    and `at_last_step` the two ratios, the profile and its axis, and the largest dead and
    saturated fractions at the last measured step. `epoch_profiles` and
    `epoch_backward_profiles` hold each epoch's mean weight-gradient norm per layer and mean
    backward signal along its axis, for the figure.
    """

    def __init__(
        self,
        every_n_steps: int = 25,
        histograms_every_n_epochs: int = 1,
        figure_log10_range: tuple[float, float] = (-16.0, 4.0),
    ) -> None:
        self.every_n_steps = every_n_steps
        self.histograms_every_n_epochs = histograms_every_n_epochs
        self.figure_log10_range = tuple(figure_log10_range)
        self.at_first_step: dict[str, Any] = {}
        self.at_last_step: dict[str, Any] = {}
        self.epoch_profiles: dict[int, list[float]] = {}  # mean grad norm per layer, per epoch
        self.epoch_backward_profiles: dict[int, list[float]] = {}  # mean ||dL/dh||, per epoch
        self._logging = False

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints, so a resumed run keeps the figures of its first steps (and of
        its last, when it has no step left to train)."""
        return {
            "at_first_step": self.at_first_step,
            "at_last_step": self.at_last_step,
            "epoch_profiles": self.epoch_profiles,
            "epoch_backward_profiles": self.epoch_backward_profiles,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.at_first_step = state_dict["at_first_step"]
        self.at_last_step = state_dict["at_last_step"]
        self.epoch_profiles = state_dict["epoch_profiles"]
        # A checkpoint from before the backward profile was kept has none.
        self.epoch_backward_profiles = state_dict.get("epoch_backward_profiles", {})

    def evidence(self) -> dict[str, Any]:
        """What the verdict and the sweep report need; nothing before a measured step."""
        first, last = self.at_first_step, self.at_last_step
        if not first:
            return {}
        return {
            FIRST_OVER_LAST: last["first_over_last"],
            START: first["first_over_last"],
            MAX_DEAD: last["max_dead_frac"],
            MAX_SATURATED: last["max_saturated_frac"],
            GRAD_NORMS_AT_START: first["grad_norms"],
            # A checkpoint from before the backward signal (or its profile) was measured has
            # none to resume.
            **({BACKWARD_START: first[BACKWARD_RATIO]} if BACKWARD_RATIO in first else {}),
            **({BACKWARD_FIRST_OVER_LAST: last[BACKWARD_RATIO]} if BACKWARD_RATIO in last else {}),
            **({BACKWARD_NORMS_START: first[PROFILE]} if PROFILE in first else {}),
            **({BACKWARD_NORMS: last[PROFILE], SIGNAL_AXIS: last[AXIS]} if PROFILE in last else {}),
        }

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.probes: list[Probe] = pl_module.net.probes()
        # Time probes (an RNN's h_t) have no weight: only their activation and dL/dh are read.
        self.weighted = [probe for probe in self.probes if not probe.is_time]
        layers = [index for index, probe in enumerate(self.weighted) if not probe.is_norm]
        self.first, self.last = layers[0], layers[-1]  # the last layer probe is the output
        self.layer_tags = [GRAD_NORM.tag(self.weighted[i].name) for i in layers]
        *hidden_layers, _ = layers
        # The backward signal's ratio spans the first axis the network has (`SIGNAL_AXES`: its
        # time steps, its residual stream), else its hidden layers (a network whose only layer
        # probe is its output reads 1).
        axes = ([i for i, p in enumerate(self.probes) if p.role == axis] for axis in SIGNAL_AXES)
        signal = next((a for a in axes if a), None) or [
            self.probes.index(self.weighted[i]) for i in hidden_layers or layers
        ]
        self.first_hidden, self.last_hidden = signal[0], signal[-1]
        self.signal = [self.probes[i] for i in signal]
        self.axis = SIGNAL_AXES.get(self.signal[0].role, "layer")
        hidden = [self.weighted[i] for i in hidden_layers]
        self.dead = [p for p in hidden if p.kind == "relu"]
        self.saturating = [p for p in hidden if p.kind in BOUNDS]
        self.output_relu = self.weighted[self.last].kind == "relu"
        self._profiles_this_epoch: list[list[float]] = []
        self._backward_this_epoch: list[list[float]] = []
        self._weights_before: list[Tensor] = []
        positions = [axis_position(p.name) for p in self.signal]
        self._figure = gradient_flow_figure(
            len(layers), tuple(positions), self.axis, self.figure_log10_range
        )
        write_layout(trainer.loggers)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The step that ends training (at max_epochs or max_steps), measured whatever
        # every_n_steps says; a run StopOnDivergence ends has no last step to foresee.
        self._last_step = trainer.estimated_stepping_batches - 1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        # With gradient accumulation several batches lead to one optimizer step: the hooks stay
        # on until that step, so the activations and taps are those of its last batch.
        if not self.due(trainer.global_step):
            return
        self.begin(trainer)
        self._activations: dict[str, Tensor] = {}
        self._taps: dict[str, Tensor] = {}
        self._hooks = [
            probe.output.register_forward_hook(partial(self._capture, probe))
            for probe in self.probes
        ]

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` is measured (and is not being measured already)."""
        return not self._logging and (step % self.every_n_steps == 0 or step == self._last_step)

    def begin(self, trainer: pl.Trainer) -> None:
        """Measure this step: its figures are written after its optimizer step."""
        step = trainer.global_step
        self._logging = True
        self._step = step
        self._histograms = step == self._last_step or (
            trainer.current_epoch % self.histograms_every_n_epochs == 0
            and not self._profiles_this_epoch
        )

    def _capture(self, probe: Probe, module: nn.Module, inputs: Any, output: Any) -> Any:
        """Keep the probe's activation and put its tap on it: the measured tensor h becomes
        `h + tap` (the same values), so backward leaves dL/dh in `tap.grad`."""
        h = probe.measured(output)
        self._activations[probe.name] = h.detach()
        self._taps[probe.name] = tap = torch.zeros_like(h, requires_grad=True)
        return probe.tapped(output, tap)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module, optimizer) -> None:
        """The gradient as the optimizer will apply it: accumulated over its batches."""
        if not self._logging:
            return
        for hook in self._hooks:
            hook.remove()
        weights = [p.weight for p in self.weighted]
        taps = [self._taps[p.name] for p in self.probes]
        self.gradients(
            [w[None] for w in weights],
            [None if w.grad is None else w.grad[None] for w in weights],
            [None if tap.grad is None else tap.grad[None] for tap in taps],
        )
        self._taps = {}  # their gradients are as large as the activations

    def gradients(
        self, weights: list[Tensor], grads: list[Tensor | None], tap_grads: list[Tensor | None]
    ) -> None:
        """Take a measured step's gradients before its update, every tensor with the jobs along
        dim 0 (one job for a single run, a fused stack's K): the probes' weights and their
        gradients (`weighted` order), and dL/dh at each probe (`probes` order)."""
        self._grad_norms = torch.stack(
            [job_norms(g, w) for g, w in zip(grads, weights, strict=True)], dim=1
        )
        self._backward_norms = torch.stack([job_norms(g, weights[0]) for g in tap_grads], dim=1)
        # Copied into the same buffers at every measured step: a fresh copy of a large weight
        # would take new pages from the allocator each time (page faults that cost more than
        # the copy itself). `measure` takes the update in place in them.
        if [b.shape for b in self._weights_before] != [w.shape for w in weights]:
            self._weights_before = [torch.empty_like(w) for w in weights]
        for before, w in zip(self._weights_before, weights, strict=True):
            before.copy_(w)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._logging or trainer.global_step == self._step:  # no optimizer step yet
            return
        weights = [p.weight.detach()[None] for p in self.weighted]
        activations = {name: a[None] for name, a in self._activations.items()}
        (metrics,) = self.measure(weights, activations)
        grads = [None if p.weight.grad is None else p.weight.grad[None] for p in self.weighted]
        (histograms,) = self.histograms(trainer, weights, grads, activations)
        self.keep(trainer, metrics, histograms)

    def keep(
        self,
        trainer: pl.Trainer,
        metrics: dict[str, float],
        histograms: dict[str, HistogramProto],
    ) -> None:
        """Write one job's figures and histograms of the measured step (`measure`,
        `histograms`) to its loggers and keep what its record needs."""
        self._logging = False
        write_scalars(trainer.loggers, metrics, self._step)
        profile = [metrics[t] for t in self.layer_tags]
        backward = {p.name: metrics[BACKWARD.tag(p.name)] for p in self.signal}
        self._profiles_this_epoch.append(profile)
        self._backward_this_epoch.append(list(backward.values()))
        if not self.at_first_step:
            self.at_first_step = {
                "grad_norms": profile,
                "first_over_last": metrics[FIRST_OVER_LAST],
                BACKWARD_RATIO: metrics[BACKWARD_FIRST_OVER_LAST],
                PROFILE: backward,
            }
        self.at_last_step = {
            "first_over_last": metrics[FIRST_OVER_LAST],
            BACKWARD_RATIO: metrics[BACKWARD_FIRST_OVER_LAST],
            PROFILE: backward,
            AXIS: self.axis,
            "max_dead_frac": max_of_family(metrics, DEAD_FRAC),
            "max_saturated_frac": max_of_family(metrics, SATURATED_FRAC),
        }
        if histograms:
            write_histograms(trainer.loggers, histograms, self._step)

    def histograms(
        self,
        trainer: pl.Trainer,
        weights: list[Tensor],
        grads: list[Tensor | None],
        activations: dict[str, Tensor],
    ) -> list[dict[str, HistogramProto]]:
        """Each job's histograms of the measured step by tag, every tensor with the jobs along
        dim 0 as in `measure` (the weight gradients in `weighted` order); none where this step
        draws none (`begin`) or no TensorBoard would show them (none, or another rank's)."""
        if not (self._histograms and shows_histograms(trainer)):
            return [{} for _ in weights[0]]
        return job_histograms(probe_histograms(self.weighted, weights, grads, activations))

    def measure(
        self, weights: list[Tensor], activations: dict[str, Tensor]
    ) -> list[dict[str, float]]:
        """All figures of one measured step for each job along dim 0 of `weights` (after the
        update) and `activations`, from the gradients `gradients` took: per-job reductions
        over the job dimension, computed on the device and synced once."""
        jobs = len(weights[0])
        acts = [activations[p.name].reshape(jobs, -1) for p in self.probes]
        weight_norms = torch.stack([job_norms(w, w) for w in weights], dim=1)
        update_norms = torch.stack(
            [job_norms(b.sub_(w), w) for w, b in zip(weights, self._weights_before, strict=True)],
            dim=1,
        )
        families: dict[Family, tuple[list[Probe], Tensor]] = {
            GRAD_NORM: (self.weighted, self._grad_norms),
            WEIGHT_NORM: (self.weighted, weight_norms),
            UPDATE_RATIO: (self.weighted, update_norms / weight_norms),
            ACT_MEAN: (self.probes, torch.stack([a.mean(1) for a in acts], dim=1)),
            ACT_STD: (self.probes, torch.stack([row_std(a) for a in acts], dim=1)),
            BACKWARD: (self.probes, self._backward_norms),
        }
        if self.dead:
            fractions = [
                silent(activations[p.name], 1).reshape(jobs, -1).float().mean(1) for p in self.dead
            ]
            families[DEAD_FRAC] = (self.dead, torch.stack(fractions, dim=1))
        if self.saturating:
            fractions = [saturated(activations[p.name], p.kind) for p in self.saturating]
            families[SATURATED_FRAC] = (self.saturating, torch.stack(fractions, dim=1))
        grads, backward = self._grad_norms, self._backward_norms
        single = {
            FIRST_OVER_LAST: grads[:, self.first] / grads[:, self.last],
            BACKWARD_FIRST_OVER_LAST: backward[:, self.first_hidden]
            / backward[:, self.last_hidden],
        }
        if self.output_relu:
            output = activations[self.weighted[self.last].name]
            single["dead_outputs"] = silent(output, 1).reshape(jobs, -1).sum(1).float()
        values = torch.cat(
            [*(v for _, v in families.values()), torch.stack([*single.values()], dim=1)], dim=1
        )
        names = [family.tag(p.name) for family, (probes, _) in families.items() for p in probes]
        names += [*single]
        shown = [i for i, name in enumerate(names) if name.split("/")[0] in LOG10_FAMILIES]
        values = torch.cat([values, log10_display(values[:, shown])], dim=1)
        names += [LOG10 + names[i] for i in shown]
        return [
            {
                k: v
                for k, v in zip(names, row, strict=True)
                if not (k.startswith(LOG10) and math.isnan(v))
            }
            for row in values.tolist()
        ]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._profiles_this_epoch:
            return
        epoch = trainer.current_epoch
        self.epoch_profiles[epoch] = mean_profile(self._profiles_this_epoch)
        self.epoch_backward_profiles[epoch] = mean_profile(self._backward_this_epoch)
        self._profiles_this_epoch, self._backward_this_epoch = [], []
        last = epoch + 1 == trainer.max_epochs or trainer.should_stop
        if last or epoch % self.histograms_every_n_epochs == 0:
            self._figure.draw(
                trainer.loggers,
                self.epoch_profiles,
                self.epoch_backward_profiles,
                trainer.global_step,
            )


def mean_profile(profiles: list[list[float]]) -> list[float]:
    """Each place's mean over an epoch's measured steps."""
    return [sum(values) / len(values) for values in zip(*profiles, strict=True)]


def row_std(rows: Tensor) -> Tensor:
    """Each row's standard deviation, Bessel-corrected as `Tensor.std`'s, in two passes (the
    mean, then the summed squares of the deviations from it): `rows.std(1)` to float rounding,
    but the CPU's row-wise `std` kernel is many times slower on rows as long as a layer's
    activations. (`vector_norm` along a dimension would be as fast but sums less exactly.)"""
    deviations = rows - rows.mean(1, keepdim=True)
    return deviations.square().sum(1).sqrt() / math.sqrt(rows.shape[1] - 1)


def silent(activation: Tensor, batch_dim: int = 0) -> Tensor:
    """Per unit: 0 for every example of the batch (`batch_dim`; 1 in jobs-first activations):
    a dead ReLU, a dead output. The same as `(activation == 0).all(batch_dim)` (a NaN is not 0
    in both), but a float max is cheaper than a boolean `all`."""
    return activation.abs().amax(batch_dim) == 0


def saturated(activation: Tensor, kind: str) -> Tensor:
    """Per job (dim 0): the fraction of outputs within `SATURATION_MARGIN` of the bounds."""
    low, high = BOUNDS[kind]
    margin = SATURATION_MARGIN * (high - low)
    near = (activation < low + margin) | (activation > high - margin)
    return near.reshape(len(activation), -1).float().mean(1)


def job_norms(tensor: Tensor | None, like: Tensor) -> Tensor:
    """The L2 norm of each job's slice (dim 0) of `tensor`, which is shaped as `like`; nan
    where there is none (a weight whose update StopOnDivergence dropped), so the figures do not
    depend on which callback runs first."""
    if tensor is None:
        return like.new_full((len(like),), math.nan)
    return norms_per_job(tensor)


def max_of_family(metrics: dict[str, float], family: Family) -> float:
    return max((v for k, v in metrics.items() if k.startswith(f"{family.name}/")), default=0.0)


class Predictions:
    """Which classes a network's outputs predict, and which outputs are 0 for every image (an
    output ReLU that died), gathered batch by batch."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.predicted: Tensor | None = None  # per class: predicted at least once
        self.nonzero: Tensor | None = None  # per output: not 0 for at least one image

    def update(self, outputs: Tensor) -> None:
        predicted = torch.zeros(outputs.shape[1], dtype=torch.bool, device=outputs.device)
        predicted[outputs.argmax(dim=1)] = True
        nonzero = ~silent(outputs)
        if self.predicted is not None:
            predicted, nonzero = predicted | self.predicted, nonzero | self.nonzero
        self.predicted, self.nonzero = predicted, nonzero

    def evidence(self) -> dict[str, int]:
        return {
            CLASSES: self.num_classes,
            CLASSES_PREDICTED: int(self.predicted.sum()),
            DEAD_CLASSES: int((~self.nonzero).sum()),
        }


@torch.no_grad()
def evidence_on_test_split(
    module: pl.LightningModule, datamodule: MNISTDataModule
) -> dict[str, int]:
    """How many classes the trained network predicts on the whole test split (whichever DDP rank
    this is), and how many it cannot predict at all (`Predictions`). The network is in eval
    mode, as in testing (BatchNorm uses its running statistics). It is one more forward pass over
    the 10,000 test images, after the test loop's own, so the figure is the whole split's on any
    DDP rank without a gather (a stack, which never runs DDP, gathers it in its test loop)."""
    images, _ = datamodule.splits["test"]
    was_training = module.training
    module.eval()
    predictions = Predictions(datamodule.num_classes)
    for x in images.split(datamodule.batch_size):
        predictions.update(module(x))
    module.train(was_training)
    return predictions.evidence()
