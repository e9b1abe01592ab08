"""Where the configs live, and the checks that turn a bad setting into one clear paragraph.

Hydra rejects unknown group options itself; `check_config` catches bad values of known keys
before anything is built, so no run starts (or writes checkpoints) on a setting that cannot work.
Each checked key is one `Domain` row below; a key a config does not have (`init.std` exists for
`init=normal` only, `callbacks.gradient_flow` not under `callbacks=none`) is not checked.
A model checks its own keys (`nets.BlockNet` with `Domain` rows too) as it is built, on PyTorch's
`meta` device before anything else, so no row here knows which model a config names.
"""

from __future__ import annotations

import importlib.util
import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vanishlab import ConfigError
from vanishlab.checkpoints import UnreadableCheckpoint
from vanishlab.data import DATASETS, TEST_SIZE, TRAIN_SIZE
from vanishlab.schedulers import AFTER_WARMUP, INTERVALS


def config_dir() -> Path:
    """The repository's `conf/`, installed as the package `vanishlab.conf` (pyproject.toml): the
    import system finds it alike in an editable install (the checkout's conf/) and a wheel."""
    spec = importlib.util.find_spec("vanishlab.conf")
    if spec is None:  # src/ on the path by hand, or an editable install made before conf/ moved in
        raise ImportError("vanishlab's configs are not installed. Fix: pip install -e <checkout>")
    return Path(spec.submodule_search_locations[0])


CONFIG_DIR = config_dir()


@dataclass(frozen=True)
class Between:
    """A number (an integer where `integral`) from `low` up to, not including, `high`; or null,
    where `nullable`."""

    low: float
    high: float = math.inf
    integral: bool = False
    low_open: bool = False
    nullable: bool = False

    def is_kind(self, v: Any) -> bool:
        kinds = int if self.integral else int | float
        return (v is None and self.nullable) or (isinstance(v, kinds) and not isinstance(v, bool))

    def __call__(self, v: Any) -> bool:
        if v is None:
            return self.nullable
        low, high = self.low, self.high
        return self.is_kind(v) and (low < v if self.low_open else low <= v) and v < high


def integer(low: int, high: float = math.inf, *, nullable: bool = False) -> Between:
    return Between(low, high, integral=True, nullable=nullable)


def number(low: float, high: float = math.inf, *, low_open: bool = False) -> Between:
    return Between(low, high, low_open=low_open)


@dataclass(frozen=True)
class Domain:
    """The values `key` may take: `ok(value)` says; `why` and `fix` finish the paragraph.
    A value of the wrong kind for a `Between` (`lr=abc`) is named as such, not by `why`."""

    key: str
    ok: Callable[[Any], bool]
    why: str
    fix: str

    def check(self, value: Any) -> None:
        if self.ok(value):
            return
        why = self.why
        if isinstance(self.ok, Between) and not self.ok.is_kind(value):
            kind = "an integer" if self.ok.integral else "a number"
            why = f"it is {type(value).__name__} {value!r}, not {kind}"
        raise ConfigError(
            f"{self.key}={value!r} is not allowed: {why}. Fix: set {self.key} to {self.fix}."
        )


DOMAINS = (
    Domain(
        "seed",
        integer(0, 2**32, nullable=True),
        "a seed is an integer that torch, numpy and Python's random all take",
        "an integer in [0, 2**32), e.g. 0, or null to draw one",
    ),
    Domain(
        "threads",
        integer(1, nullable=True),
        "it is the number of torch threads a job uses",
        "an integer >= 1, or null for the cores this job was given (shared among parallel jobs)",
    ),
    Domain(
        "init.std", number(0), "a standard deviation cannot be negative", "a number >= 0, e.g. 1.0"
    ),
    Domain(
        "init.gain",
        number(0, low_open=True),
        "the gain scales the weights",
        "a number > 0, e.g. 1.0",
    ),
    Domain(
        "init.nonlinearity",
        lambda v: v in ("linear", "relu", "leaky_relu", "tanh", "sigmoid", "selu"),
        "torch.nn.init.calculate_gain has no gain for it",
        "relu, leaky_relu, tanh, sigmoid, linear or selu",
    ),
    Domain(
        "init.sigma_w2",
        number(0, low_open=True),
        "it is the weights' variance times fan_in (0 would be init=zeros)",
        "a number > 0, e.g. 1.76",
    ),
    Domain("init.sigma_b2", number(0), "it is the biases' variance", "a number >= 0, e.g. 0.05"),
    Domain(
        "optimizer.lr",
        number(0, low_open=True),
        "the learning rate must be positive",
        "a number > 0, e.g. 0.01",
    ),
    Domain(
        "optimizer.momentum",
        number(0, 1),
        "momentum is a decay factor in [0, 1)",
        "a number in [0, 1), e.g. 0.9",
    ),
    Domain(
        "optimizer.weight_decay",
        number(0),
        "weight decay cannot be negative",
        "a number >= 0, e.g. 0.0",
    ),
    Domain(
        "scheduler.interval",
        lambda v: v in INTERVALS,
        "Lightning steps a scheduler after every epoch or after every optimizer step",
        " or ".join(INTERVALS),
    ),
    Domain(
        "scheduler.total_steps",
        integer(1, nullable=True),
        "it counts the optimizer steps the schedule spans",
        "an integer >= 1, or null for the run's optimizer steps",
    ),
    Domain(
        "scheduler.warmup_steps",
        integer(0),
        "it counts the optimizer steps of the warm-up",
        "an integer >= 0, e.g. 100 (0: no warm-up)",
    ),
    Domain(
        "scheduler.after",
        lambda v: v in AFTER_WARMUP,
        "it is not a known schedule after the warm-up",
        " or ".join(AFTER_WARMUP),
    ),
    Domain(
        "scheduler.eta_min",
        number(0),
        "it is the learning rate the cosine falls to",
        "a number >= 0, e.g. 0.0",
    ),
    Domain(
        "data.batch_size",
        integer(1),
        "a batch needs at least one example",
        "an integer >= 1, e.g. 200",
    ),
    Domain(
        "data.val_size",
        lambda v: integer(0)(v) and v < TRAIN_SIZE,
        f"the validation split is taken from the {TRAIN_SIZE} training images",
        f"an integer in [0, {TRAIN_SIZE}), e.g. 5000 (0 = validate on test)",
    ),
    Domain(
        "data.train_subset",
        integer(1, nullable=True),
        "it counts the training images to train on",
        "an integer >= 1, e.g. 2000 (at most the training split), or null for all of them",
    ),
    Domain(
        "data.dataset", lambda v: v in DATASETS, "it is not a known dataset", " or ".join(DATASETS)
    ),
    Domain(
        "trainer.max_epochs",
        lambda v: v is None or integer(0)(v),
        "it counts epochs",
        "an integer >= 0, e.g. 10 (or null, to stop at trainer.max_steps)",
    ),
    Domain(
        "trainer.accelerator",
        lambda v: v != "gpu" or torch.cuda.is_available(),
        "torch sees no CUDA GPU on this machine",
        "auto (trainer=default picks the GPU when there is one) or cpu",
    ),
    Domain(
        "callbacks.gradient_flow.every_n_steps",
        integer(1),
        "GradientFlow measures every n-th optimizer step",
        "an integer >= 1, e.g. 25",
    ),
    Domain(
        "callbacks.gradient_flow.histograms_every_n_epochs",
        integer(1),
        "GradientFlow writes histograms every n-th epoch",
        "an integer >= 1, e.g. 1",
    ),
    Domain(
        "callbacks.sharpness.every_n_steps",
        integer(1),
        "Sharpness measures every n-th optimizer step",
        "an integer >= 1, e.g. 10",
    ),
    Domain(
        "callbacks.sharpness.batch_size",
        integer(1),
        "Sharpness measures the loss on that many examples",
        "an integer >= 1, e.g. 1000",
    ),
    Domain(
        "callbacks.sharpness.max_iterations",
        integer(1),
        "power iteration needs at least one Hessian-vector product",
        "an integer >= 1, e.g. 20",
    ),
    Domain(
        "callbacks.jacobian.inputs",
        integer(1),
        "the Jacobian is measured at that many examples of the first training batch",
        "an integer >= 1, e.g. 16",
    ),
    Domain(
        "callbacks.jacobian.max_width",
        integer(1),
        "it is the widest hidden state whose Jacobian is computed",
        "an integer >= 1, e.g. 1024",
    ),
    Domain(
        "callbacks.gradient_flow.figure_log10_range",
        lambda v: (
            OmegaConf.is_list(v) and len(v) == 2 and all(map(number(-math.inf), v)) and v[0] < v[1]
        ),
        "it is the gradient-flow figure's y-range, log10 low and high",
        "two numbers, low < high, e.g. [-16,4]",
    ),
)
ABSENT = object()


def check_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` for the first value outside its `Domain`, and for a `ckpt_path` that
    is not a file."""
    for domain in DOMAINS:
        value = OmegaConf.select(cfg, domain.key, default=ABSENT)
        if value is not ABSENT:
            domain.check(value)
    check_strategy(str(OmegaConf.select(cfg, "trainer.strategy", default="auto")))
    if cfg.get("ckpt_path") is not None:
        check_ckpt_path(cfg.ckpt_path)


def check_ckpt_path(ckpt_path: str) -> None:
    """Refuse a `ckpt_path` that is not a file, or not one in torch's checkpoint format (a zip
    archive, whole: its directory is at its end, so a truncated file fails too)."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} is not a file. Fix: point it at a run's checkpoint, e.g. "
            f"ckpt_path=outputs/runs/<date>/<time>/checkpoints/last.ckpt (or best.ckpt)."
        )
    if not zipfile.is_zipfile(path):
        raise UnreadableCheckpoint(path, ValueError("not a whole checkpoint (zip) archive"))


def check_strategy(strategy: str) -> None:
    """Refuse the DDP strategies whose processes would not run exactly once per job with their
    evidence reaching the record."""
    if strategy.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")):
        raise ConfigError(
            f"trainer.strategy={strategy!r} is not allowed: its processes train copies of the "
            f"callbacks, so the gradient-flow evidence and the divergence stop never reach the "
            f"run's record. Fix: use trainer=ddp_sim (or trainer.strategy=ddp), whose processes "
            f"start from the command line and keep their own callbacks."
        )


def check_sweepable(cfg: DictConfig) -> None:
    """Refuse what cannot run as one job of a sweep. `train.prepare` calls it for every job of a
    sweep, in the job's own Hydra context, whichever launcher runs it."""
    strategy = str(OmegaConf.select(cfg, "trainer.strategy", default="auto"))
    if strategy.startswith("ddp"):
        raise ConfigError(
            f"trainer.strategy={strategy!r} is not allowed in a sweep: Lightning starts each "
            f"extra DDP process by running the command line again, which would run the whole "
            f"sweep again. Fix: give each job one device and run jobs side by side "
            f"(hydra/launcher=joblib, or slurm), or run this job on its own, without -m."
        )


def check_memory(meta_net: torch.nn.Module, batch_shape: tuple[int, ...], on_gpu: bool) -> None:
    """Raise `ConfigError` if the run would need more memory than the device has free.

    `meta_net` is the network built on PyTorch's `meta` device: it has shapes but no storage, so
    even a network far too large for the machine costs nothing to measure, whatever its layers.
    The estimate counts each parameter five times (the weight, its gradient, two optimizer
    slots as Adam keeps, and GradientFlow's copy before the step) and each activation of a
    forward pass on one batch three times (the output, what backward keeps, its gradient), plus
    the data splits held as float32 tensors.
    """
    activations = 0

    def count(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        nonlocal activations
        if isinstance(output, torch.Tensor) and not list(module.children()):
            activations += output.numel()

    hooks = [m.register_forward_hook(count) for m in meta_net.modules()]
    meta_net(torch.empty(batch_shape, device="meta"))
    for hook in hooks:
        hook.remove()
    parameters = sum(p.numel() for p in meta_net.parameters())
    data = (TRAIN_SIZE + TEST_SIZE) * math.prod(batch_shape[1:])
    needed = 4 * (5 * parameters + 3 * activations + data)
    free = free_memory(on_gpu)
    if needed > free:
        raise ConfigError(
            f"this config needs about {needed / 2**30:.1f} GiB ({parameters:,} parameters, "
            f"{activations:,} activation values per batch of {batch_shape[0]}), but the "
            f"{'GPU' if on_gpu else 'machine'} has {free / 2**30:.1f} GiB free. Fix: make the "
            f"network smaller (its model.* size keys) or the batch (data.batch_size), or run "
            f"on a machine with more memory."
        )


def free_memory(on_gpu: bool) -> int:
    """Bytes the run can still allocate: the GPU's free memory, else Linux's MemAvailable, else
    (elsewhere) the machine's physical memory."""
    if on_gpu:
        return torch.cuda.mem_get_info()[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
