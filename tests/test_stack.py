"""Stacked training: K jobs trained by one Lightning loop train exactly as each would alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import (
    FAST,
    FUSED_REL,
    REAL_DATA_DIR,
    bare_trainer,
    compose_config,
    kill_cli_when,
    run_cli,
    same,
    same_record,
    worst,
)
from vanishlab import ConfigError, stack
from vanishlab.checkpoints import logging_step, read_checkpoint
from vanishlab.data import TensorBatches
from vanishlab.diagnostics import GradientFlow
from vanishlab.divergence import StopOnDivergence
from vanishlab.fused import LaunchCount
from vanishlab.nets import MLP
from vanishlab.results import (
    CLASSES,
    CLASSES_PREDICTED,
    DEAD_CLASSES,
    JOB_ID,
    RESUMED_FROM,
    SHARPNESS,
    SHARPNESS_TIMES_LR,
    STATUS,
    TEST_ACC,
    VERDICT,
    job_identity,
    read_record,
)
from vanishlab.sharpness import Sharpness, top_eigenpairs
from vanishlab.stack import (
    STACKED_WITH,
    ExceptionsToJobs,
    FusedBatches,
    FusedStack,
    JobLoggers,
    StackedClassifier,
    StackedData,
    fit_and_test_stack,
    stack_key,
    stacked_module,
)
from vanishlab.train import build, fit_and_test

STEPS = 50
HAS_MNIST = bool(REAL_DATA_DIR) and (Path(REAL_DATA_DIR) / "MNIST" / "raw").is_dir()


# Three jobs that differ in seed, init and optimizer hyperparameters (one optimizer class).
JOBS = [
    ["seed=0", "init=kaiming_normal", "optimizer.lr=0.05"],
    ["seed=1", "init=xavier_normal", "optimizer.lr=0.1", "optimizer.weight_decay=0.01"],
    ["seed=2", "init=normal", "init.std=0.05", "optimizer.lr=0.01"],
]


def trainer(**overrides) -> pl.Trainer:
    return bare_trainer(max_steps=STEPS, **overrides)


def built(cfg):
    pl.seed_everything(cfg.seed)  # as train.fit_and_test does before it builds
    return build(cfg)


# Each kind of stack and its tolerance against the jobs alone: exact, or FUSED_REL.
KINDS = pytest.mark.parametrize(
    ("kind", "rel"), [(StackedClassifier, 0.0), (FusedStack, FUSED_REL)]
)


def stacked(kind: type[StackedClassifier], jobs: list, *args) -> tuple:
    """The stack of `jobs` (built) as `kind`, and its data."""
    fused = kind is FusedStack
    return kind([m for _, m in jobs], *args), StackedData([dm for dm, _ in jobs], fused=fused)


@KINDS
@pytest.mark.parametrize(
    ("extras", "trainer_args"),
    [
        ([[], ["optimizer.momentum=0.9"], []], {}),  # one job with momentum, two without
        # Adam at its default lr: at the jobs' SGD rates (0.01-0.1) it turns the rounding noise
        # of near-zero gradients into whole steps, and a fused job drifts from its run alone.
        ([["optimizer=adam", "optimizer.lr=0.001"]] * 3, {}),
        ([[]] * 3, {"gradient_clip_val": 0.05}),  # clipped per job, not over the stack
        ([["remedy=batchnorm"]] * 3, {}),  # each job's running statistics are its own
        ([["loss=mse"], [], ["loss=nll"]], {}),  # a loss call per distinct loss
    ],
    ids=["sgd", "adam", "clipped", "batchnorm", "losses"],
)
def test_a_stacked_job_trains_as_alone(
    tiny_data, tmp_path, extras, trainer_args, kind, rel
) -> None:
    """Weights after 50 steps: exactly a run's alone in a per-job stack, to FUSED_REL in a
    fused one."""
    configs = [
        compose_config([*FAST, *job, *extra], tiny_data, tmp_path)
        for extra, job in zip(extras, JOBS, strict=True)
    ]
    alone = []
    for cfg in configs:
        datamodule, module = built(cfg)
        trainer(**trainer_args).fit(module, datamodule=datamodule)
        alone.append(module.net.state_dict())

    stack, data = stacked(kind, [built(cfg) for cfg in configs])
    trainer(**trainer_args).fit(stack, datamodule=data)
    for job, weights in zip(stack.jobs, alone, strict=True):
        assert same(job.net.state_dict(), weights, rel=rel)


def test_jobs_stack_when_they_differ_only_in_init_loss_optimizer_values_and_seed(
    tiny_data, tmp_path
) -> None:
    def key(*overrides: str) -> str:
        return stack_key(job_identity(compose_config([*FAST, *overrides], tiny_data, tmp_path)))

    base = key()
    assert key(*JOBS[1]) == base
    assert key("loss=mse", "seed=7") == base
    assert key("model.depth=3") != base
    assert key("optimizer=adam") != base  # another optimizer class
    assert key("data.batch_size=20") != base
    # A network's INIT_KEYS decide only initial values: an RNN's recurrent scale stacks, its
    # cell does not.
    rnn = key("model=rnn")
    assert key("model=rnn", "model.recurrent_scale=3.0", "model.forget_bias=0") == rnn != base
    assert key("model=rnn", "model.cell=gru") != rnn


def instruments() -> list[pl.Callback]:
    return [GradientFlow(every_n_steps=4), StopOnDivergence()]


def findings(callbacks: list[pl.Callback]) -> dict:
    """What the callbacks found: their evidence, and GradientFlow's per-epoch profiles."""
    flow, stop = callbacks
    return {**flow.evidence(), **stop.evidence(), "epoch_profiles": flow.epoch_profiles}


@KINDS
def test_each_job_keeps_its_own_callbacks_and_a_diverging_job_stops_alone(
    tiny_data, tmp_path, kind, rel
) -> None:
    """The second job diverges (lr=1e4): it stops at its first non-finite step, as it would
    alone, with the same weights and evidence; the other two train on to the end."""
    lrs = ["optimizer.lr=0.05", "optimizer.lr=1e4", "optimizer.lr=0.1"]
    configs = [
        compose_config([*FAST, f"seed={i}", lr], tiny_data, tmp_path) for i, lr in enumerate(lrs)
    ]
    alone = []
    for cfg in configs:
        datamodule, module = built(cfg)
        callbacks = instruments()
        trainer(callbacks=callbacks).fit(module, datamodule=datamodule)
        alone.append((module.net.state_dict(), findings(callbacks)))
    assert "diverged_at_step" in alone[1][1] and "diverged_at_step" not in alone[0][1]

    callbacks = [instruments() for _ in configs]
    stack, data = stacked(kind, [built(cfg) for cfg in configs], callbacks)
    trainer().fit(stack, datamodule=data)
    for job, own, (weights, evidence) in zip(stack.jobs, callbacks, alone, strict=True):
        assert same(job.net.state_dict(), weights, rel=rel)
        assert same(findings(own), evidence, rel=rel)


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: sorted((e.step, e.value) for e in events.Scalars(tag))
        for tag in events.Tags()["scalars"]
    }


def histograms(log_dir) -> tuple[dict, dict]:
    """Each tag's histograms: their figures, each over the steps (compared as tensors: a sum
    near zero is close in units of the largest), and their bucket counts."""
    events = EventAccumulator(str(log_dir), size_guidance={"histograms": 0})
    events.Reload()
    figures, buckets = {}, {}
    for tag in events.Tags()["histograms"]:
        kept = [(e.step, e.histogram_value) for e in events.Histograms(tag)]
        figures[tag] = {
            name: torch.tensor([getattr(h, name) for _, h in kept], dtype=torch.float64)
            for name in ("min", "max", "num", "sum", "sum_squares")
        } | {"step": [step for step, _ in kept]}
        buckets[tag] = [list(h.bucket) for _, h in kept]
    return figures, buckets


@KINDS
def test_each_job_writes_the_scalars_it_writes_alone(tiny_data, tmp_path, kind, rel) -> None:
    """Train, validation and test metrics, the gradient-flow figures and the learning rate (its
    own, scheduled) reach each job's own TensorBoard, at the steps and with the values a single
    run writes; so do its histograms (a fused stack bins its jobs at once)."""
    schedule = ["scheduler=step", "scheduler.step_size=1", "trainer.max_epochs=2"]
    configs = [compose_config([*FAST, *job, *schedule], tiny_data, tmp_path) for job in JOBS]

    def callbacks() -> list[pl.Callback]:
        return [*instruments(), LearningRateMonitor(logging_interval="epoch")]

    def loggers(where) -> list:
        return [TensorBoardLogger(where, name="", version="", default_hp_metric=False)]

    alone = []
    for i, cfg in enumerate(configs):
        datamodule, module = built(cfg)
        run = pl.Trainer(
            max_epochs=2,
            logger=loggers(tmp_path / "alone" / str(i)),
            callbacks=callbacks(),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
        )
        run.fit(module, datamodule=datamodule)
        run.test(module, datamodule=datamodule, verbose=False)
        where = tmp_path / "alone" / str(i)
        alone.append((scalars(where), histograms(where)))

    jobs = [built(cfg) for cfg in configs]
    job_loggers = [loggers(tmp_path / "stacked" / str(i)) for i in range(len(jobs))]
    stack, data = stacked(kind, jobs, [callbacks() for _ in jobs], job_loggers)
    run = pl.Trainer(
        max_epochs=2,
        logger=JobLoggers(job_loggers),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    run.fit(stack, datamodule=data)
    run.test(stack, datamodule=data, verbose=False)
    for i, (cfg, (expected, (figures, buckets))) in enumerate(zip(configs, alone, strict=True)):
        lr = cfg.optimizer.lr
        assert [rate for _, rate in expected["lr-SGD"]] == pytest.approx([lr, lr * 0.1])
        assert same(scalars(tmp_path / "stacked" / str(i)), expected, rel=rel)
        own_figures, own_buckets = histograms(tmp_path / "stacked" / str(i))
        assert len(figures) == 9 and same(own_figures, figures, rel=rel)
        assert own_buckets.keys() == buckets.keys()
        for tag, counts in buckets.items():
            # A value within the tolerance of a bucket's edge may round across it (each such
            # value moves a count out of one bucket into the next): at most the share of the
            # range that the tolerance spans beside the edges, rel * bins of the values (two at
            # least, the 4 counts allowed before). How many do depends on the CPU's kernels.
            counts = np.array(counts)
            crossed = np.abs(np.subtract(own_buckets[tag], counts)).sum(axis=1) / 2
            allowed = np.maximum(2, np.ceil(rel * counts.shape[1] * counts.sum(axis=1)))
            assert (crossed <= (0 if rel == 0 else allowed)).all(), (tag, crossed, allowed)


def test_a_stacked_jobs_record_is_the_one_it_gets_alone(tiny_data, tmp_path) -> None:
    """Records from `fit_and_test_stack` equal `fit_and_test`'s, job by job, the diverging
    job's included, but for the seconds and `stacked_with`."""
    runs = [*JOBS, ["seed=3", "optimizer.lr=1e4"]]

    def configs(where: str) -> list:
        return [
            compose_config(
                [*FAST, *job, "trainer.max_epochs=2"], tiny_data, tmp_path / where / str(i)
            )
            for i, job in enumerate(runs)
        ]

    alone = [fit_and_test(cfg) for cfg in configs("alone")]
    assert alone[-1][STATUS] == "diverged" and alone[0][STATUS] == "completed"
    stacked = fit_and_test_stack(configs("stacked"))
    for i, (own, record) in enumerate(zip(alone, stacked, strict=True)):
        assert same_record(record, own), worst(record, own)
        # Its checkpoints are the ones it writes alone (the loops' state of a job that stopped
        # early is the stack's, which trained on).
        for name in ("last.ckpt", "best.ckpt"):
            single, job = (
                torch.load(tmp_path / where / str(i) / "checkpoints" / name, weights_only=False)
                for where in ("alone", "stacked")
            )
            skipped = {"callbacks", "hyper_parameters"}  # they name the job's own directory
            skipped |= {"loops"} if own[STATUS] == "diverged" else set()
            assert same(job, single, skipped, rel=FUSED_REL), (i, name)
            flows = (job["callbacks"]["GradientFlow"], single["callbacks"]["GradientFlow"])
            assert same(*flows, rel=FUSED_REL)


def test_a_stacked_jobs_test_split_evidence_is_the_whole_splits_under_limited_testing(
    tiny_data, tmp_path
) -> None:
    """A stack takes each job's test-split evidence from its test loop; where that loop ran
    only some batches (`limit_test_batches`), from the whole split, as a single run does."""
    limited = [*FAST, "data.batch_size=2", "trainer.limit_test_batches=1"]
    cfgs = [
        compose_config([*limited, *job], tiny_data, tmp_path / str(i)) for i, job in enumerate(JOBS)
    ]
    alone = [fit_and_test(cfg) for cfg in cfgs[:1]]
    stacked = fit_and_test_stack(cfgs)
    assert alone[0][CLASSES_PREDICTED] > 2  # more than the 2 images of the one test batch show
    for key in (CLASSES, CLASSES_PREDICTED, DEAD_CLASSES):
        assert stacked[0][key] == alone[0][key]


@pytest.mark.slow
def test_the_stacked_launcher_writes_the_records_the_basic_launcher_writes(
    tiny_data, tmp_path
) -> None:
    """A 12-job sweep (depth x lr x seed, a third of it diverging): two stacks of six, and
    every job's record as the basic launcher leaves it, but for the seconds and
    `stacked_with`."""
    sweep = [*FAST, "trainer.max_epochs=2", "model.depth=2,3", "optimizer.lr=0.05,0.1,1e4"]
    sweep += ["seed=0,1"]
    records = {}
    for launcher in ("basic", "stacked"):
        where = tmp_path / launcher
        args = ["-m", *sweep, f"hydra/launcher={launcher}", f"hydra.sweep.dir={where}"]
        result = run_cli("vanishlab.train", *args, data_dir=tiny_data)
        assert result.returncode == 0, result.stderr[-3000:]
        records[launcher] = {p.parent.name: read_record(p) for p in where.glob("*/metrics.json")}
    assert "12 jobs to train -> 2 stacks (6, 6)" in result.stdout + result.stderr
    assert len(records["basic"]) == 12 and records["basic"].keys() == records["stacked"].keys()
    ids = {record[JOB_ID] for record in records["basic"].values()}
    for name, alone in records["basic"].items():
        stacked = records["stacked"][name]
        others = stacked.pop(STACKED_WITH)  # the other jobs of its stack, by their job_id
        assert len(others) == 5 and set(others) <= ids - {alone[JOB_ID]}, name
        assert same_record(stacked, alone), (name, worst(stacked, alone))


@pytest.mark.slow
def test_a_killed_stack_trains_on_as_one_stack_from_its_jobs_checkpoints(
    tiny_data, tmp_path
) -> None:
    """Killed while its three jobs train as one stack, the sweep run again trains them on as
    one stack from their own last checkpoints, and ends with the records of an uninterrupted
    sweep."""
    sweep = [*FAST, "seed=0,1,2", "trainer.max_epochs=6"]
    whole = tmp_path / "whole"
    result = run_cli(
        "vanishlab.train", "-m", *sweep, f"hydra.sweep.dir={whole}", data_dir=tiny_data
    )
    assert result.returncode == 0, result.stderr[-2000:]

    killed = tmp_path / "killed"
    args = ["-m", *sweep, "hydra/launcher=stacked", f"hydra.sweep.dir={killed}"]

    def every_job_checkpointed() -> bool:
        return len(list(killed.glob("*/checkpoints/last.ckpt"))) == 3

    kill_cli_when(every_job_checkpointed, "vanishlab.train", *args, data_dir=tiny_data)
    assert {read_record(p)[STATUS] for p in killed.glob("*/metrics.json")} == {"started"}
    steps = {read_checkpoint(p)["global_step"] for p in killed.glob("*/checkpoints/last.ckpt")}

    result = run_cli("vanishlab.train", *args, data_dir=tiny_data)
    assert result.returncode == 0, result.stderr[-2000:]
    log = result.stdout + result.stderr
    if len(steps) == 1:  # killed between two validations: every job's checkpoint of one step
        assert "3 jobs to train -> 1 stack (3)" in log, log[-3000:]
        assert "3 jobs train on as one stack from their checkpoints of step" in log
    for path in whole.glob("*/metrics.json"):
        resumed = read_record(killed / path.parent.name / "metrics.json")
        assert resumed.pop(RESUMED_FROM).endswith("last.ckpt")
        whole_record = read_record(path)
        # Six epochs, fused, stopped and fused again: rounding noise grows with training.
        assert same_record(resumed, whole_record, rel=1e-3), (
            path.parent.name,
            worst(resumed, whole_record),
        )


@KINDS
def test_a_stopped_stack_trains_on_from_its_jobs_checkpoints_as_if_never_stopped(
    tiny_data, tmp_path, kind, rel, monkeypatch
) -> None:
    """A stack stopped after an epoch and trained on from its jobs' last checkpoints (Adam,
    a learning rate stepped each epoch) ends as the stack that was never stopped: each job's
    record and checkpoint (weights, optimizer and scheduler state, callbacks' state)."""
    if kind is StackedClassifier:  # no batched optimizer: the stack trains job by job
        monkeypatch.setattr(stack, "BATCHED_OPTIMIZERS", {})
    extras = ["optimizer=adam", "optimizer.lr=0.001", "scheduler=step", "scheduler.step_size=1"]

    def configs(where: str, epochs: int) -> list:
        return [
            compose_config(
                [*FAST, *extras, f"seed={seed}", f"trainer.max_epochs={epochs}"],
                tiny_data,
                tmp_path / where / str(seed),
            )
            for seed in range(2)
        ]

    whole = fit_and_test_stack(configs("whole", 3))
    fit_and_test_stack(configs("stopped", 1))
    paths = [tmp_path / "stopped" / str(seed) / "checkpoints" / "last.ckpt" for seed in range(2)]
    step = logging_step(read_checkpoint(paths[0]))
    resumed = fit_and_test_stack(configs("stopped", 3), resume_from=paths, resume_step=step)
    for seed, (record, own) in enumerate(zip(resumed, whole, strict=True)):
        assert record.pop(RESUMED_FROM) == str(paths[seed])
        assert same_record(record, own, rel=rel), worst(record, own)
        after, uninterrupted = (
            torch.load(tmp_path / where / str(seed) / "checkpoints" / "last.ckpt")
            for where in ("stopped", "whole")
        )
        skipped = {"callbacks", "hyper_parameters"}  # they name the job's own directory
        assert same(after, uninterrupted, skipped, rel=rel), seed
        assert after["lr_schedulers"][0]["last_epoch"] == 3
        # The verdict's evidence. (The stopped run's per-epoch profile of its one epoch also
        # holds its last step, which GradientFlow measures in any run: a 1-epoch run's end.)
        flows = (after["callbacks"]["GradientFlow"], uninterrupted["callbacks"]["GradientFlow"])
        for key in ("at_first_step", "at_last_step"):
            assert same(*(flow[key] for flow in flows), rel=rel), key


def test_a_stacked_jobs_sharpness_is_the_one_it_measures_alone(tiny_data, tmp_path) -> None:
    """Each job of a stack measures its own network on its own batch at its own lr: the
    evidence and the logged sharpness equal the job's alone, and differ between the jobs."""
    sharpness = ["callbacks=sharpness", "callbacks.sharpness.every_n_steps=3"]
    sharpness += ["callbacks.sharpness.batch_size=20", "trainer.max_epochs=2"]

    def configs(where: str) -> list:
        return [
            compose_config([*FAST, *sharpness, *job], tiny_data, tmp_path / where / str(i))
            for i, job in enumerate(JOBS)
        ]

    alone_configs = configs("alone")
    alone = [fit_and_test(cfg) for cfg in alone_configs]
    stacked = fit_and_test_stack(configs("stacked"))
    tags = (SHARPNESS, SHARPNESS_TIMES_LR)
    for i, (own, record) in enumerate(zip(alone, stacked, strict=True)):
        figures = [{tag: r[tag] for tag in tags} for r in (record, own)]
        assert same(*figures, rel=FUSED_REL)
        logged = [
            {tag: scalars(tmp_path / where / str(i))[tag] for tag in tags}
            for where in ("alone", "stacked")
        ]
        assert same(logged[1], logged[0], rel=FUSED_REL)
        assert [step for step, _ in logged[0][SHARPNESS]] == [0, 3, 6, 9, 12, 15, 18, 19]
    assert len({record[SHARPNESS] for record in alone}) == len(JOBS)
    for record, cfg in zip(alone, alone_configs, strict=True):
        assert record[SHARPNESS_TIMES_LR] == pytest.approx(record[SHARPNESS] * cfg.optimizer.lr / 2)


def test_a_fused_stack_measures_its_jobs_sharpness_at_once(tiny_data, tmp_path, monkeypatch):
    """One power iteration for the stack's jobs on each measured step, not one per job; and a
    stack whose jobs' Sharpness settings differ is refused before it trains."""
    calls = []

    def counted(module, losses, params, measures):
        calls.append(len(measures))
        return top_eigenpairs(module, losses, params, measures)

    monkeypatch.setattr(stack, "top_eigenpairs", counted)
    jobs = [built(compose_config([*FAST, *job], tiny_data, tmp_path)) for job in JOBS]
    callbacks = [[Sharpness(every_n_steps=10, batch_size=20)] for _ in jobs]
    fused, data = stacked(FusedStack, jobs, callbacks)
    trainer().fit(fused, datamodule=data)
    assert calls == [len(JOBS)] * 6  # steps 0, 10, ..., 40 and the last, 49
    assert len({own.last[SHARPNESS] for (own,) in callbacks}) == len(JOBS)

    callbacks[1] = [Sharpness(every_n_steps=5, batch_size=20)]
    jobs = [built(compose_config([*FAST, *job], tiny_data, tmp_path)) for job in JOBS]
    fused, data = stacked(FusedStack, jobs, callbacks)
    with pytest.raises(ConfigError, match=r"each of its 3 jobs needs one Sharpness callback, of"):
        trainer().fit(fused, datamodule=data)


class Unbatchable(MLP):
    """An MLP whose forward branches on a value of its input, which `vmap` cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e30:
            x = x / 2
        return super().forward(x)


def test_a_stack_that_cannot_fuse_trains_job_by_job_and_says_why(tiny_data, tmp_path) -> None:
    jobs = [built(compose_config([*FAST, *job], tiny_data, tmp_path)) for job in JOBS[:2]]
    modules = [module for _, module in jobs]
    empty = [[] for _ in jobs]
    stack, why = stacked_module(modules, empty, empty, jobs[0][0].sample_shape)
    assert isinstance(stack, FusedStack) and why is None
    for module in modules:
        module.net.__class__ = Unbatchable
    stack, why = stacked_module(modules, empty, empty, jobs[0][0].sample_shape)
    assert type(stack) is StackedClassifier and why.startswith("RuntimeError")
    # It trains, job by job, as each would alone.
    trainer().fit(stack, datamodule=StackedData([dm for dm, _ in jobs]))


def test_fused_jobs_get_their_own_batches_and_share_one_where_they_draw_the_same() -> None:
    x, y = torch.randn(10, 3), torch.arange(10)

    def streams(*seeds: int) -> list[TensorBatches]:
        return [TensorBatches(x, y, 4, torch.Generator().manual_seed(s)) for s in seeds]

    for seeds in [(0, 0, 0), (0, 1, 0)]:
        fused = list(FusedBatches(streams(*seeds)))
        own = [list(stream) for stream in streams(*seeds)]
        assert len(fused) == len(own[0]) == 3
        for step, (xs, ys) in enumerate(fused):
            for k in range(len(seeds)):
                assert torch.equal(xs[k], own[k][step][0])
                assert torch.equal(ys[k], own[k][step][1])
            shared = len(set(seeds)) == 1
            assert (xs.stride(0) == 0) is shared  # gathered once, expanded over the jobs


@pytest.mark.parametrize("model", ["mlp", "cnn", "rnn", "vit"])
def test_every_model_familys_jobs_fuse(tiny_data, tmp_path, model: str) -> None:
    """Each family's networks run under `vmap`, in training mode (in eval mode attention takes
    a kernel with no derivative: its stacks had fallen back to job by job)."""
    jobs = [
        built(compose_config([*FAST, f"model={model}", *job], tiny_data, tmp_path))
        for job in JOBS[:2]
    ]
    empty = [[] for _ in jobs]
    stack, why = stacked_module([m for _, m in jobs], empty, empty, jobs[0][0].sample_shape)
    assert why is None
    assert isinstance(stack, FusedStack)


class EveryValidation(pl.Callback):
    """A callback with a hook (on_validation_epoch_end) a stack does not call for each job."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pass


@pytest.mark.parametrize("kind", [StackedClassifier, FusedStack])
def test_a_job_callback_whose_hook_a_stack_does_not_drive_is_refused(
    tiny_data, tmp_path, kind
) -> None:
    jobs = [built(compose_config([*FAST, *job], tiny_data, tmp_path)) for job in JOBS[:2]]
    stack, data = stacked(kind, jobs, [[GradientFlow()], [EveryValidation()]])
    with pytest.raises(ConfigError, match="EveryValidation implements on_validation_epoch_end"):
        trainer().fit(stack, datamodule=data)


def ops_per_job_step(module: pl.LightningModule, data: pl.LightningDataModule, jobs: int) -> float:
    """Backend ops (views left out) per job and training step, with the default callbacks'
    measuring ones on, over 20 steps of `module`."""
    steps = 20
    callbacks = [[GradientFlow(), StopOnDivergence()] for _ in range(jobs)]
    if isinstance(module, StackedClassifier):
        module.job_callbacks = callbacks
        run = bare_trainer(max_steps=steps)
    else:
        run = bare_trainer(max_steps=steps, callbacks=callbacks[0])
    with LaunchCount() as count:
        run.fit(module, datamodule=data)
    return count.ops.total() / (steps * jobs)


def test_a_fused_stacks_kernel_launches_per_job_fall_with_its_size(tiny_data, tmp_path) -> None:
    """The seed MLP's ops per job-step, alone and fused: a fused stack of 8 launches at most a
    quarter of a single run's per job (the kernels do not multiply with the jobs)."""
    configs = [compose_config([*FAST, f"seed={i}"], tiny_data, tmp_path) for i in range(8)]
    datamodule, module = built(configs[0])
    alone = ops_per_job_step(module, datamodule, 1)
    stack, data = stacked(FusedStack, [built(cfg) for cfg in configs])
    fused = ops_per_job_step(stack, data, len(configs))
    assert fused <= alone / 4, (fused, alone)


@pytest.mark.mnist
@pytest.mark.skipif(not HAS_MNIST, reason="set DATA_DIR to a folder holding MNIST/raw/")
def test_a_fused_job_tests_as_alone_after_an_epoch_on_real_mnist(tmp_path) -> None:
    """The seed experiment, one epoch on the real MNIST, three jobs (seeds, inits, lrs): each
    fused job's test accuracy within 0.003 of its run alone, and its verdict the same."""
    one_epoch = ["experiment=seed", "trainer.max_epochs=1", "++callbacks.progress_bar=null"]

    def configs(where: str) -> list:
        return [
            compose_config([*one_epoch, *job], Path(REAL_DATA_DIR), tmp_path / where / str(i))
            for i, job in enumerate(JOBS)
        ]

    alone = [fit_and_test(cfg) for cfg in configs("alone")]
    fused = fit_and_test_stack(configs("fused"))
    for own, record in zip(alone, fused, strict=True):
        assert abs(record[TEST_ACC] - own[TEST_ACC]) <= 0.003, (record[TEST_ACC], own[TEST_ACC])
        assert record[VERDICT] == own[VERDICT] == "trained"


class Watcher(pl.Callback):
    """A job's callback that keeps what the stack hands it at the end of fitting."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.seen.append(f"exception: {exception}")

    def on_fit_end(self, trainer, pl_module) -> None:
        self.seen.append("fit end")


class Failing(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == 2:
            raise RuntimeError("batch 2 went wrong")


@pytest.mark.parametrize("kind", [StackedClassifier, FusedStack])
def test_each_jobs_callbacks_see_the_fits_end_or_its_exception(tiny_data, tmp_path, kind) -> None:
    """on_fit_end and on_exception, which a module has no hook to pass on, reach every job's
    callbacks (a checkpoint saved on an exception is one)."""
    configs = [compose_config([*FAST, *job], tiny_data, tmp_path) for job in JOBS[:2]]
    watchers = [Watcher(), Watcher()]
    stack, data = stacked(kind, [built(cfg) for cfg in configs], [[w] for w in watchers])
    trainer().fit(stack, datamodule=data)
    assert [w.seen for w in watchers] == [["fit end"], ["fit end"]]

    watchers = [Watcher(), Watcher()]
    callbacks = [[watchers[0], Failing()], [watchers[1]]]
    stack, data = stacked(kind, [built(cfg) for cfg in configs], callbacks)
    run = trainer(callbacks=[ExceptionsToJobs()])
    with pytest.raises(RuntimeError, match="batch 2 went wrong"):
        run.fit(stack, datamodule=data)
    assert [w.seen for w in watchers] == [["exception: batch 2 went wrong"]] * 2
