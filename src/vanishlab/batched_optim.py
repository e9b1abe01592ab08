"""SGD and Adam over a job dimension: the optimizers of a fused stack, whose parameters are
tensors with the stack's K jobs along dim 0 (`torch.func.stack_module_state`).

`torch.optim` takes one scalar of each hyperparameter per parameter group, so it cannot update K
jobs with K learning rates in one kernel. `BatchedSGD` and `BatchedAdam` hold each of them per
job, and run torch's own update rule (`torch.optim.SGD`, `torch.optim.Adam`, float for float, in
the same order) with the K jobs' values broadcast along dim 0: the kernels a step launches depend
on the number of parameter tensors, not on K. Every hyperparameter torch lets a run choose may
differ between jobs (nesterov and amsgrad too, as masks); the options that change how torch
runs rather than what it computes (`maximize`, `foreach`, `fused`, `capturable`,
`differentiable`, `decoupled_weight_decay`) keep their defaults.

Per-job values live on the host, as numpy arrays of shape (K,) in each parameter group (`lr`,
`momentum`, `betas` a pair of them, ...), as torch keeps Python floats there: a scheduler's
arithmetic then runs elementwise on them, so torch's own schedulers (`LambdaLR` and so
`schedulers.warmup`, `CosineAnnealingLR`, `StepLR`) give each job the lr they give it alone. A
(K,) torch tensor would not do: torch's schedulers `fill_` a tensor lr with one scalar. Each step
turns them into the per-job factors torch computes in double precision (Adam's bias corrections
from the job's step count), which reach the device in one copy.

`active` (a numpy bool array, one per job) stops jobs: a stopped (diverged) job's parameters and
state are left as they are, by `torch.where`, so its NaNs reach no other job, while the others
train on. `job_state_dict` and `load_job_state_dict` give and take one job's state in
`torch.optim`'s layout, so a stacked job's checkpoint is the one it writes alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vanishlab import ConfigError


class BatchedOptimizer(torch.optim.Optimizer):
    """What `BatchedSGD` and `BatchedAdam` share: per-job hyperparameters (`PER_JOB`, the keys
    of `TORCH` that may differ between jobs), the `active` mask, and each job's state as `TORCH`
    holds it alone."""

    TORCH: type[torch.optim.Optimizer]
    PER_JOB: tuple[str, ...]

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]], **hyperparameters: Any
    ) -> None:
        defaults = torch_defaults(self.TORCH)
        unknown = sorted(hyperparameters.keys() - defaults.keys())
        if unknown:
            raise ConfigError(
                f"optimizer.{unknown[0]} is not a setting of torch.optim.{self.TORCH.__name__}. "
                f"Fix: remove it, or use one of {', '.join(defaults)}."
            )
        super().__init__(params, {**defaults, **hyperparameters})

    @classmethod
    def for_jobs(
        cls, params: Iterable[Tensor] | Iterable[dict[str, Any]], jobs: Sequence[dict[str, Any]]
    ) -> BatchedOptimizer:
        """The optimizer over `params` with job k's settings `jobs[k]`: the keywords `TORCH`
        takes for it alone (a `make_optimizer`'s), torch's default where a job has none."""
        defaults = torch_defaults(cls.TORCH)
        values = {}
        for key in set().union(*jobs):
            values[key] = [job.get(key, defaults.get(key)) for job in jobs]
            if isinstance(defaults.get(key), tuple):  # a pair per job: a pair of per-job values
                values[key] = tuple(zip(*values[key], strict=True))
        return cls(params, **values)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Torch's, after each per-job hyperparameter is made an array over the jobs and each
        job's values are checked by `TORCH` itself."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        jobs = leading_dims(params)
        if not hasattr(self, "jobs"):
            self.jobs = jobs
            self.active = np.ones(jobs, dtype=bool)
        elif jobs != self.jobs:
            raise ConfigError(
                f"A parameter group has {jobs} jobs along dim 0, the optimizer's others "
                f"{self.jobs}. Fix: stack the same jobs' parameters in every group."
            )
        group = {**self.defaults, **param_group, "params": params}
        defaults = torch_defaults(self.TORCH)
        for key in self.PER_JOB:
            group[key] = per_job(key, group[key], defaults[key], jobs)
        for key, default in defaults.items():
            if key not in self.PER_JOB and group[key] != default:
                raise ConfigError(
                    f"optimizer.{key}={group[key]!r} is not implemented by "
                    f"{type(self).__name__}, which trains a fused stack. Fix: leave "
                    f"optimizer.{key} at its default {default!r}, or train these jobs alone."
                )
        for job in range(jobs):
            try:
                own = job_values(group, job)
                self.TORCH([torch.empty(0)], **{key: own[key] for key in defaults})
            except (ValueError, TypeError) as err:
                raise ConfigError(
                    f"Job {job} of the stack has an optimizer setting that "
                    f"torch.optim.{self.TORCH.__name__} refuses: {err}. Fix: set that optimizer "
                    f"key of job {job} to a value {self.TORCH.__name__} accepts."
                ) from err
        super().add_param_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update of every active job's parameters that have a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self.update(group, params)
        return loss

    def update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """One step of `group`'s `params` (those with a gradient), for the active jobs."""
        raise NotImplementedError

    def job_state(self, group: dict[str, Any], state: dict[str, Any], job: int) -> dict:
        """Job `job`'s entry in `TORCH`'s state for one parameter, from its batched `state`."""
        raise NotImplementedError

    def load_job_state(
        self, group: dict[str, Any], param: Tensor, job: int, own: dict[str, Tensor]
    ) -> None:
        """Put `own` (`TORCH`'s state for one parameter of job `job`) into `param`'s state."""
        raise NotImplementedError

    def job_optimizer(self, job: int) -> torch.optim.Optimizer:
        """Job `job` alone: a `TORCH` over its slices of the parameters (views, no state) with
        its hyperparameters as they are now (a scheduler's `initial_lr` included)."""
        groups = [
            {**job_values(group, job), "params": [p.detach()[job] for p in group["params"]]}
            for group in self.param_groups
        ]
        return self.TORCH(groups)

    def job_state_dict(self, job: int) -> dict[str, Any]:
        """The `state_dict()` of `TORCH` over job `job`'s parameters alone after the same steps:
        its state per parameter (copies) and its hyperparameters as scalars."""
        alone = self.job_optimizer(job)
        for group, own in zip(self.param_groups, alone.param_groups, strict=True):
            for param, view in zip(group["params"], own["params"], strict=True):
                state = self.job_state(group, self.state[param], job) if param in self.state else {}
                if state:
                    alone.state[view] = state
        return alone.state_dict()

    def load_job_state_dict(self, job: int, state_dict: dict[str, Any]) -> None:
        """Resume job `job` from `state_dict`, a `TORCH`'s over its parameters alone (what
        `job_state_dict` gives): its state and hyperparameters; the other jobs' stay."""
        alone = self.job_optimizer(job)
        try:
            alone.load_state_dict(state_dict)
        except (ValueError, KeyError) as err:
            raise ConfigError(
                f"The optimizer state given for job {job} does not fit the stack's parameters: "
                f"{err}. Fix: resume job {job} from a checkpoint of the same model and optimizer."
            ) from err
        for group, own in zip(self.param_groups, alone.param_groups, strict=True):
            for key, value in own.items():
                if key in self.PER_JOB or (key in group and isinstance(group[key], np.ndarray)):
                    group[key] = with_job(group[key], job, value)
            for param, view in zip(group["params"], own["params"], strict=True):
                self.load_job_state(group, param, job, alone.state.get(view, {}))


class BatchedSGD(BatchedOptimizer):
    """`torch.optim.SGD` for each job, with its own lr, momentum, dampening, weight_decay and
    nesterov (each a float or bool, or K of them)."""

    TORCH = torch.optim.SGD
    PER_JOB = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        momentum, nesterov = group["momentum"], group["nesterov"]
        with_momentum = bool(momentum.any())
        with_decay = bool(group["weight_decay"].any())
        like = params[0]
        neg_lr, weight_decay, job_momentum = on_device(
            [-group["lr"], group["weight_decay"], momentum], like, like.dtype
        )
        # With momentum, each parameter's (keep, take), by the state of its buffers.
        momentum_factors = [None] * len(params)
        if with_momentum:
            rows = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                    # torch's momentum_buffer is None until the job's first step, which sets
                    # it to the gradient itself: new buffer = keep * buffer + take * gradient
                    state["has_momentum_buffer"] = np.zeros(self.jobs, dtype=bool)
                started = (momentum != 0) & state["has_momentum_buffer"]
                keep = np.where(started, momentum, 0.0)
                take = np.where(started, 1 - group["dampening"], 1.0)
                rows.append([keep, take])
            momentum_factors = on_device(rows, like, like.dtype)
        every_job = bool(self.active.all())  # no job stopped: nothing to mask
        if not every_job or nesterov.any():
            active, use_nesterov = on_device([self.active, nesterov], like)
        for p, factors in zip(params, momentum_factors, strict=True):
            grad = p.grad
            if with_decay:
                grad = torch.addcmul(grad, along_jobs(weight_decay, p), p)
            if with_momentum:
                keep, take = factors
                buf = self.state[p]["momentum_buffer"]
                if every_job:  # in place: the same float operations, no copies
                    new_buf = buf.mul_(along_jobs(keep, p)).addcmul_(grad, along_jobs(take, p))
                else:
                    new_buf = torch.addcmul(buf * along_jobs(keep, p), grad, along_jobs(take, p))
                if nesterov.any():
                    ahead = torch.addcmul(grad, along_jobs(job_momentum, p), new_buf)
                    grad = torch.where(along_jobs(use_nesterov, p), ahead, new_buf)
                else:
                    grad = new_buf
                if not every_job:
                    torch.where(along_jobs(active, p), new_buf, buf, out=buf)
                self.state[p]["has_momentum_buffer"] |= self.active
            if every_job:
                p.addcmul_(along_jobs(neg_lr, p), grad)
            else:
                new_p = torch.addcmul(p, along_jobs(neg_lr, p), grad)
                torch.where(along_jobs(active, p), new_p, p, out=p)

    def job_state(self, group: dict[str, Any], state: dict[str, Any], job: int) -> dict:
        if group["momentum"][job] == 0 or not state["has_momentum_buffer"][job]:
            return {}
        return {"momentum_buffer": own_copy(state["momentum_buffer"], job)}

    def load_job_state(
        self, group: dict[str, Any], param: Tensor, job: int, own: dict[str, Tensor]
    ) -> None:
        state = self.state[param]
        if "momentum_buffer" in own and not state:
            state["momentum_buffer"] = torch.zeros_like(param)
            state["has_momentum_buffer"] = np.zeros(self.jobs, dtype=bool)
        if state:
            state["has_momentum_buffer"][job] = "momentum_buffer" in own
        if "momentum_buffer" in own:
            state["momentum_buffer"][job] = own["momentum_buffer"]


class BatchedAdam(BatchedOptimizer):
    """`torch.optim.Adam` for each job, with its own lr, betas, eps, weight_decay and amsgrad
    (each a float or bool, or K of them; `betas` a pair of such)."""

    TORCH = torch.optim.Adam
    PER_JOB = ("lr", "betas", "eps", "weight_decay", "amsgrad")

    def update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        (beta1, beta2), amsgrad = group["betas"], group["amsgrad"]
        rows = []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = np.zeros(self.jobs, dtype=np.int64)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            if amsgrad.any() and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p)
            # torch's bias corrections, in double precision on the host, at the job's next step
            # (a stopped job's do not matter; 1 spares them a division by 0)
            step = np.maximum(state["step"] + self.active, 1)
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            neg_step_size = -(group["lr"] / bias_correction1)
            rows.append(
                [group["weight_decay"], 1 - beta1, beta2, 1 - beta2, bias_correction2_sqrt]
                + [group["eps"], neg_step_size]
            )
        factors = on_device(rows, params[0], params[0].dtype)
        every_job = bool(self.active.all())
        if not every_job or amsgrad.any():
            active, use_amsgrad = on_device([self.active, amsgrad], params[0])
        for p, row in zip(params, factors, strict=True):
            weight_decay, weight1, decay2, weight2, correction2, eps, neg_step_size = (
                along_jobs(factor, p) for factor in row
            )
            state, grad = self.state[p], p.grad
            keep = None if every_job and not amsgrad.any() else along_jobs(active, p)
            if group["weight_decay"].any():
                grad = torch.addcmul(grad, weight_decay, p)
            exp_avg = torch.lerp(state["exp_avg"], grad, weight1)
            exp_avg_sq = torch.addcmul(state["exp_avg_sq"] * decay2, grad * weight2, grad)
            second = exp_avg_sq
            if amsgrad.any():
                max_sq = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
                second = torch.where(along_jobs(use_amsgrad, p), max_sq, exp_avg_sq)
                torch.where(keep, max_sq, state["max_exp_avg_sq"], out=state["max_exp_avg_sq"])
            denom = second.sqrt().div_(correction2).add_(eps)
            if every_job:  # nothing to mask: the new values in place
                state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq
                p.addcdiv_(exp_avg * neg_step_size, denom)
            else:
                new_p = torch.addcdiv(p, exp_avg * neg_step_size, denom)
                torch.where(keep, exp_avg, state["exp_avg"], out=state["exp_avg"])
                torch.where(keep, exp_avg_sq, state["exp_avg_sq"], out=state["exp_avg_sq"])
                torch.where(keep, new_p, p, out=p)
            state["step"] += self.active

    def job_state(self, group: dict[str, Any], state: dict[str, Any], job: int) -> dict:
        if state["step"][job] == 0:
            return {}
        own = {
            "step": torch.tensor(float(state["step"][job])),
            "exp_avg": own_copy(state["exp_avg"], job),
            "exp_avg_sq": own_copy(state["exp_avg_sq"], job),
        }
        if group["amsgrad"][job]:
            own["max_exp_avg_sq"] = own_copy(state["max_exp_avg_sq"], job)
        return own

    def load_job_state(
        self, group: dict[str, Any], param: Tensor, job: int, own: dict[str, Tensor]
    ) -> None:
        state = self.state[param]
        if not state:
            state["step"] = np.zeros(self.jobs, dtype=np.int64)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        if "max_exp_avg_sq" in own and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(param)
        state["step"][job] = int(own["step"].item()) if own else 0
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state:
                state[key][job] = own.get(key, 0)


@torch.no_grad()
def clip_grad_norm_per_job_(
    parameters: Tensor | Iterable[Tensor], max_norm: float, norm_type: float = 2.0
) -> Tensor:
    """Clip each job's gradient as `torch.nn.utils.clip_grad_norm_` clips it alone: by its norm
    over all its parameters' slices. Returns the K norms before clipping. (Clipping by value
    needs no such thing: `clip_grad_value_` on the stacked gradients is elementwise.)"""
    parameters = [parameters] if isinstance(parameters, Tensor) else parameters
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = [norms_per_job(g, norm_type) for g in grads]
    total_norm = torch.linalg.vector_norm(torch.stack(norms, dim=1), norm_type, dim=1)
    clip_coef = max_norm / (total_norm + 1e-6)
    clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
    for g in grads:
        g.mul_(along_jobs(clip_coef_clamped, g))
    return total_norm


def on_device(rows: list, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Per-job values computed on the host (`rows`, nested lists of (K,) arrays; torch's
    factors in double precision, or masks) on `like`'s device, in `dtype`, in one copy."""
    return torch.from_numpy(np.asarray(rows)).to(device=like.device, dtype=dtype)


def own_copy(stacked: Tensor, job: int) -> Tensor:
    """Job `job`'s slice of a stacked tensor as a tensor of its own, laid out as torch.optim
    lays out a parameter's state (a stacked parameter may be laid out as its gradient)."""
    return stacked[job].clone(memory_format=torch.contiguous_format)


def norms_per_job(tensor: Tensor, ord: float = 2.0) -> Tensor:
    """The norm of each job's slice (dim 0) of `tensor`, in whatever memory layout it has (a
    reshape would copy a stacked parameter laid out as its gradient, `fused.FusedNetworks`)."""
    flat = tensor if tensor.ndim > 1 else tensor[:, None]
    return torch.linalg.vector_norm(flat, ord, dim=tuple(range(1, flat.ndim)))


def along_jobs(values: Tensor, like: Tensor) -> Tensor:
    """The K per-job `values` shaped to broadcast over `like` (a view)."""
    return values.view(-1, *[1] * (like.ndim - 1))


def torch_defaults(optimizer: type[torch.optim.Optimizer]) -> dict[str, Any]:
    """`optimizer`'s defaults as the installed torch has them."""
    return optimizer([torch.empty(0)]).defaults


def leading_dims(params: list[Tensor]) -> int:
    """The number of jobs K: the dim 0 that `params` must share."""
    sizes = {p.shape[0] if p.ndim else None for p in params}
    layouts = {(p.device, p.dtype) for p in params}
    if len(sizes) != 1 or None in sizes or len(layouts) != 1:
        raise ConfigError(
            f"A batched optimizer's parameters must share dim 0, the jobs, and one device and "
            f"dtype; these have dim 0 {sorted(map(str, sizes))} on {sorted(map(str, layouts))}. "
            "Fix: pass the stacked parameters of one stack (torch.func.stack_module_state)."
        )
    return sizes.pop()


def per_job(key: str, value: Any, default: Any, jobs: int) -> Any:
    """Hyperparameter `key` as numpy arrays of `jobs` values (a pair of them for a pair such as
    Adam's `betas`): `value` is one value for every job or one per job."""
    if isinstance(default, tuple):
        if not (isinstance(value, tuple | list) and len(value) == len(default)):
            raise ConfigError(
                f"optimizer.{key}={value!r} is not a pair. Fix: give {key} as two values "
                f"(each a number or {jobs} numbers), e.g. {default}."
            )
        return tuple(per_job(key, v, d, jobs) for v, d in zip(value, default, strict=True))
    dtype = bool if isinstance(default, bool) else np.float64
    try:
        values = np.array(value, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"optimizer.{key}={value!r} is not a number: {err}. Fix: set {key} to a number, "
            f"or to {jobs} of them (one per job)."
        ) from err
    if values.ndim == 0:
        return np.full(jobs, values)
    if values.shape != (jobs,):
        raise ConfigError(
            f"optimizer.{key} has {values.size} values for a stack of {jobs} jobs. Fix: give "
            f"{key} one value, or one per job ({jobs})."
        )
    return values


def job_values(group: dict[str, Any], job: int) -> dict[str, Any]:
    """Group `group`'s hyperparameters for job `job` alone, as Python scalars."""
    return {key: job_value(v, job) for key, v in group.items() if key != "params"}


def job_value(value: Any, job: int) -> Any:
    """`value` with each per-job array (numpy, one value per job) in it, however nested (a pair
    of them, a scheduler's state), replaced by job `job`'s as a Python scalar."""
    if isinstance(value, np.ndarray):
        return value[job].item()
    if isinstance(value, dict):
        return {key: job_value(v, job) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(job_value(v, job) for v in value)
    return value


def with_job(values: Any, job: int, value: Any) -> Any:
    """The inverse of `job_value`: a copy of `values` with job `job`'s value of each per-job
    array in it, however nested, set from `value` (what `job_value` gives for that job); what
    is not per job is `value`'s. Copies: a scheduler may hold the arrays it was given, as its
    `initial_lr`."""
    if isinstance(values, np.ndarray):
        values = values.copy()
        values[job] = value
        return values
    if isinstance(values, dict):
        return {key: with_job(v, job, value[key]) for key, v in values.items()}
    if isinstance(values, list | tuple):
        return type(values)(with_job(v, job, x) for v, x in zip(values, value, strict=True))
    return value
