"""`make bench`: vanishlab's speed as ratios against baselines measured in the same run.

Needs the real MNIST files (DATA_DIR, default ./data). Ratios, with the targets in force:
1. vanishlab training epoch / a plain PyTorch loop over the same in-memory tensors   (<= 1.7)
   a regression check: Lightning's own loop alone is 1.2-1.55x here (line 1a)
2. the course's DataLoader + ToTensor/Normalize epoch / vanishlab epoch       (for reference)
   its floor depends on the machine: 4.7 on 2026-11-25, when the DataLoader epoch took 2.5 s
3. epoch with the GradientFlow callback at its defaults / without it                (<= 1.10)
   measured inside each epoch: its whole time over that time less the time spent in
   GradientFlow's hooks, so host noise hits both sides alike (3a, two separate runs, is
   printed as a cross-check; only Lightning's dispatch of the hooks, a few us each, is left out)
4. per-job overhead of the basic launcher: wall time beyond fit + test, per job      (<= 1.5 s)
5. joblib (2 jobs x 1 thread) / basic launcher wall time, 8-job 1-epoch sweep (for reference)
   its floor depends on the machine too: each joblib worker first imports torch and Lightning
6. stacked / basic launcher wall time, 8-job 1-epoch `optimizer.lr` sweep, start-up included
                                                                                    (<= 0.7)
6a. a job's training epoch inside a stack of 8 (the stack's fastest epoch's batches, default
   callbacks and diagnostics on, over 8) / the plain loop's epoch: the mean of its fastest 8
   consecutive epochs, the work of one stack epoch                                    (<= 1.0)
   Each side's fastest window of the same work: a single epoch is an eighth of a stack
   epoch's length, and a short window misses the host's bursts of load more often than a long
   one, so a single epoch would favour the plain loop. The bench prints both.
6b. the same without the diagnostics the plain loop does not do (GradientFlow, StopOnDivergence):
   what stacking itself costs over the plain loop                           (for reference)
7. peak memory of a stack of 16 (1 epoch) / 16 x a single run's peak: peak RSS of a process
   that does only that on the CPU, `torch.cuda.max_memory_allocated` on a GPU        (<= 1)
8. the sharpness callback's cost at the `edge_of_stability` preset's settings (for reference)
9. backend ops (kernel launches on a GPU) per job and training step of the seed MLP, default
   callbacks on, for a single run (K = 1) and fused stacks of K = 8 and 32: K = 8 / K = 1 (<= 1/4)
   and K = 32 / K = 1 (<= 1/12). Counted by `fused.LaunchCount` over a 60-step run less a 20-step
   one, so setup and testing cancel out
10. seconds per job beyond training in a 128-job stacked sweep of 2-step jobs        (<= 0.15 s)
   the wall time beyond the records' fit+test seconds of a 128-job and a 16-job lr x seed sweep,
   their difference over the 112 extra jobs: start-up cancels out, what each job costs to
   compose, prepare, build and record stays

`bench/run.py --stacks` runs lines 6, 6a, 6b, 7, 9 and 10 only (what a change to stacks moves).
`bench/run.py --gpu [jobs] [steps] [overrides]` (64, 200) prints instead the job-steps per
second of a fused stack of `jobs` seed MLPs against a single run's (aim 20x on a GPU) and the
stack's peak GPU memory; without a CUDA device it runs on the CPU and says the GPU figure is
unmeasured.

Two more lines are the floors of ratios 1 and 5 on this machine, printed for reference:
1a. Lightning's own loop with nothing added (no callbacks, logger, checkpoint or progress bar)
    / the plain loop: the least ratio 1 can be while training stays Lightning's.
5a. joblib's fit+test seconds over two workers / basic's fit+test seconds: ratio 5 if the
    workers started for free.

Timings drift on a shared machine (here, epochs of one run vary by up to 50% with the host's
load), so compared runs alternate (ROUNDS), the first (warm-up) epoch of each run is dropped,
and each side of ratios 1 and 2 is its fastest epoch: interference only ever adds time, so the
minimum is the best estimate of what the code itself costs (the reasoning of `timeit`).
Medians are printed beside them. Check `uptime` first: other work on the cores makes every
ratio meaningless.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from vanishlab import losses
from vanishlab.config import CONFIG_DIR
from vanishlab.diagnostics import GradientFlow
from vanishlab.fused import LaunchCount
from vanishlab.stack import fit_and_test_stack
from vanishlab.train import build, build_seeded, build_trainer

DATA_DIR = os.environ.get("DATA_DIR", str(Path.cwd() / "data"))  # conf/paths' default
EPOCHS = 4  # per run; the first is a warm-up and is not counted
ROUNDS = 5
BASIC = "hydra/launcher=basic"  # the jobs one by one (multiruns stack by default)
LRS = [0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15]  # the 8-job sweep of ratios 6 and 6a
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
# Every GradientFlow method called during training: the Lightning hooks it overrides, and the
# forward hook it registers on logging steps.
GRADIENT_FLOW_HOOKS = [name for name in vars(GradientFlow) if name.startswith("on_")] + ["_capture"]
WITHOUT_DIAGNOSTICS = ("~callbacks.gradient_flow", "~callbacks.stop_on_divergence")
BARE_LIGHTNING = (
    "~callbacks",
    "~logger",
    "+trainer.enable_checkpointing=false",
    "+trainer.enable_progress_bar=false",
)


class EpochTimer(pl.Callback):
    """Times each training epoch after the first (a warm-up): its batches alone, and whole
    (with validation and the epoch-end hooks, where GradientFlow draws its figure). Given the
    run's GradientFlow, it also sums the time spent inside that callback's hooks each epoch."""

    def __init__(self, flow: GradientFlow | None = None) -> None:
        self.batches: list[float] = []
        self.whole: list[float] = []
        self.in_flow: list[float] = []
        self._in_flow = 0.0
        if flow is not None:
            for name in GRADIENT_FLOW_HOOKS:
                setattr(flow, name, self._timed(getattr(flow, name)))

    def _timed(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = hook(*args, **kwargs)  # `_capture` returns the tapped output
            self._in_flow += time.perf_counter() - start
            return result

        return timed

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._in_flow = 0.0
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        if trainer.current_epoch and batch_idx == trainer.num_training_batches - 1:
            self.batches.append(time.perf_counter() - self.start)

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.current_epoch:
            return  # the warm-up epoch
        self.whole.append(time.perf_counter() - self.start)
        self.in_flow.append(self._in_flow)


def config(out: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(
            "train", [f"paths.output_dir={out}", f"paths.data_dir={DATA_DIR}", *overrides]
        )


def vanishlab_epochs(*overrides: str) -> EpochTimer:
    with tempfile.TemporaryDirectory() as out:
        cfg = config(out, "experiment=seed", f"trainer.max_epochs={EPOCHS}", *overrides)
        pl.seed_everything(0, verbose=False)
        datamodule, module = build(cfg)
        trainer = build_trainer(cfg)
        flow = next((c for c in trainer.callbacks if isinstance(c, GradientFlow)), None)
        timer = EpochTimer(flow)
        trainer.callbacks.append(timer)  # last, so an epoch's time includes GradientFlow's end
        trainer.fit(module, datamodule=datamodule)
    return timer


def stacked_epochs(*overrides: str) -> list[float]:
    """The 8-job lr sweep as one stack, with the default callbacks (less those `overrides`
    remove): each timed epoch's batches, per job."""
    with tempfile.TemporaryDirectory() as out:
        cfgs = [
            config(
                f"{out}/{lr}",
                "experiment=seed",
                f"trainer.max_epochs={EPOCHS}",
                f"optimizer.lr={lr}",
                *overrides,
            )
            for lr in LRS
        ]
        pl.seed_everything(0, verbose=False)
        timer = EpochTimer()
        fit_and_test_stack(cfgs, stack_callbacks=[timer])
    return [seconds / len(LRS) for seconds in timer.batches]


def peak_memory(jobs: int) -> float:
    """GiB at the peak of a fresh process that trains and tests `jobs` seeds for one epoch, as a
    stack (one job: a single run)."""
    child = [sys.executable, __file__, "--peak-memory", str(jobs)]
    return float(
        subprocess.run(child, check=True, capture_output=True, text=True).stdout.split()[-1]
    )


def train_for_peak_memory(jobs: int) -> None:
    """`peak_memory`'s child: trains, then prints its peak."""
    with tempfile.TemporaryDirectory() as out:
        cfgs = [
            config(
                f"{out}/{seed}", "trainer.max_epochs=1", "~callbacks.progress_bar", f"seed={seed}"
            )
            for seed in range(jobs)
        ]
        fit(cfgs)
    if torch.cuda.is_available():
        print(torch.cuda.max_memory_allocated() / 2**30)
    else:  # ru_maxrss is in KiB on Linux
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def plain_epochs(batches: Batches, epochs: int = EPOCHS) -> list[float]:
    """The same model, init, loss and optimizer in a hand-written loop: the baseline. The
    seconds of each of its `epochs` after the first. Its loss is spelt as such a loop spells
    it, torch's cross-entropy with its own batch mean: vanishlab's per-sample losses and their
    mean (`losses.mean_loss`) cost two kernels a step more, the mean and its backward."""
    with tempfile.TemporaryDirectory() as out:
        pl.seed_everything(0, verbose=False)
        _, module = build(config(out))
    assert module.loss_fn.func is losses.cross_entropy, "the config's loss is the loop's"
    net, optimizer = module.net, module.make_optimizer(module.parameters())
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x, y in batches():
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def tensor_batches() -> Batches:
    """Batches sliced from in-memory tensors, exactly as vanishlab's data module serves them."""
    with tempfile.TemporaryDirectory() as out:
        datamodule, _ = build(config(out))
    datamodule.prepare_data()
    datamodule.setup("fit")
    return lambda: iter(datamodule.train_dataloader())


def dataloader_batches() -> Batches:
    """The original course pipeline: PIL images through ToTensor + Normalize, one at a time."""
    normalise = transforms.Normalize((0.1307,), (0.3081,))
    dataset = datasets.MNIST(
        DATA_DIR, train=True, transform=transforms.Compose([transforms.ToTensor(), normalise])
    )
    loader = DataLoader(dataset, batch_size=200, shuffle=True)
    return lambda: ((x.flatten(1), y) for x, y in loader)


def sweep(sweep_dir: Path, *overrides: str) -> tuple[float, float]:
    """Run a 1-epoch sweep as a user would; return its wall time and its jobs' fit+test time."""
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "vanishlab.train",
            "-m",
            "trainer.max_epochs=1",
            "~callbacks.progress_bar",
            f"paths.data_dir={DATA_DIR}",
            f"hydra.sweep.dir={sweep_dir}",
            *overrides,
        ],
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - start
    records = [json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")]
    return wall, sum(r["train_seconds"] + r["test_seconds"] for r in records)


def report(name: str, value: float, limit: float, unit: str = "x") -> None:
    """A ratio (or time) against its target, `value <= limit`."""
    target = f"<= {limit:g}{'' if unit == 'x' else unit}"
    verdict = "OK" if value <= limit else "MISSED"
    print(f"{name:<66} {value:6.2f}{unit}  (target {target}) {verdict}", flush=True)


def reference(name: str, value: float) -> None:
    print(f"{name:<66} {value:6.2f}x  (for reference)", flush=True)


def main() -> None:
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    batches = tensor_batches()
    plain, vanishlab, bare, with_flow, without_flow, flow_shares = [], [], [], [], [], []
    for _ in range(ROUNDS):
        plain += plain_epochs(batches)
        timer = vanishlab_epochs()
        vanishlab += timer.batches
        with_flow += timer.whole
        flow_shares += [w / (w - f) for w, f in zip(timer.whole, timer.in_flow, strict=True)]
        without_flow += vanishlab_epochs("~callbacks.gradient_flow").whole
        bare += vanishlab_epochs(*BARE_LIGHTNING).batches
    course = min(plain_epochs(dataloader_batches()))
    plain_s, vanishlab_s, bare_s = min(plain), min(vanishlab), min(bare)
    flow_ratio = statistics.median(flow_shares)
    print(
        "median epoch seconds: "
        + ", ".join(
            f"{name} {statistics.median(times):.3f}"
            for name, times in (
                ("plain loop", plain),
                ("vanishlab", vanishlab),
                ("bare Lightning", bare),
                ("with GradientFlow", with_flow),
                ("without", without_flow),
            )
        ),
        flush=True,
    )
    print(
        f"fastest epoch seconds: plain loop {plain_s:.3f}, vanishlab {vanishlab_s:.3f}, "
        f"bare Lightning {bare_s:.3f}, DataLoader+transforms {course:.3f}",
        flush=True,
    )
    report("1. vanishlab epoch / plain loop on in-memory tensors", vanishlab_s / plain_s, 1.7)
    reference("1a. floor of 1: bare Lightning epoch / plain loop", bare_s / plain_s)
    reference("2. DataLoader+transforms epoch / vanishlab epoch", course / vanishlab_s)
    report("3. epoch with GradientFlow / the same epoch less GradientFlow's time", flow_ratio, 1.1)
    reference(
        "3a. cross-check: epoch with GradientFlow / without (other runs)",
        statistics.median(with_flow) / statistics.median(without_flow),
    )

    with tempfile.TemporaryDirectory() as tmp:
        one_wall, one_work = sweep(Path(tmp, "one"), "seed=0", BASIC)
        seeds = "seed=" + ",".join(map(str, range(8)))
        basic_wall, basic_work = sweep(Path(tmp, "basic"), seeds, BASIC)
        joblib_wall, joblib_work = sweep(
            Path(tmp, "joblib"), seeds, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"
        )
    # The 7 extra jobs' wall time beyond their own fit+test: start-up costs cancel out.
    overhead = ((basic_wall - basic_work) - (one_wall - one_work)) / 7
    print(
        f"sweep seconds: 1 job {one_wall:.1f}, 8 jobs basic {basic_wall:.1f} "
        f"(fit+test {basic_work:.1f}), 8 jobs joblib 2x1 {joblib_wall:.1f}",
        flush=True,
    )
    report("4. basic launcher: per-job overhead beyond fit+test", overhead, 1.5, unit=" s")
    reference("5. joblib 2 jobs x 1 thread / basic launcher, 8-job sweep", joblib_wall / basic_wall)
    floor = joblib_work / 2 / basic_work
    reference("5a. floor of 5: joblib fit+test / 2 workers / basic fit+test", floor)

    stacked_sweeps(batches)
    stack_memory()
    sharpness_cost()
    kernel_launches()
    sweep_overhead()


def stacked_sweeps(batches: Batches) -> None:
    """6, 6a, 6b: the 8-job lr sweep stacked against the basic launcher, and a job's epoch in
    its stack against the plain loop's, each pair alternated (the host's load hits both alike)."""
    jobs = len(LRS)
    plain, single, stacked_job, stacked_undiagnosed = [], [], [], []
    for _ in range(ROUNDS):
        # As many windows of a stack epoch's work (`jobs` epochs) as a stack times epochs.
        epochs = plain_epochs(batches, 1 + (EPOCHS - 1) * jobs)
        plain += [sum(epochs[i : i + jobs]) / jobs for i in range(0, len(epochs), jobs)]
        single += epochs
        stacked_job += stacked_epochs()
        stacked_undiagnosed += stacked_epochs(*WITHOUT_DIAGNOSTICS)
    plain_s = min(plain)
    print(
        f"a job's epoch seconds: in a stack of {jobs} {min(stacked_job):.3f}, plain loop "
        f"{plain_s:.3f} (its fastest {jobs} consecutive epochs' mean; its fastest single epoch "
        f"{min(single):.3f})",
        flush=True,
    )
    lrs = "optimizer.lr=" + ",".join(map(str, LRS))
    basic_walls, stacked_walls = [], []
    for _ in range(ROUNDS):
        with tempfile.TemporaryDirectory() as tmp:
            basic_walls.append(sweep(Path(tmp, "basic"), lrs, BASIC)[0])
            stacked_walls.append(sweep(Path(tmp, "stacked"), lrs, "hydra/launcher=stacked")[0])
    basic_wall, stacked_wall = min(basic_walls), min(stacked_walls)
    print(f"lr sweep seconds: basic {basic_wall:.1f}, stacked {stacked_wall:.1f}", flush=True)
    report("6. stacked / basic launcher wall time, 8-job lr sweep", stacked_wall / basic_wall, 0.7)
    report("6a. a job's epoch in a stack of 8 / plain loop epoch", min(stacked_job) / plain_s, 1.0)
    reference(
        "6b. the same without GradientFlow, StopOnDivergence", min(stacked_undiagnosed) / plain_s
    )


def stack_memory() -> None:
    """7. A stack's peak memory against its jobs' run one by one."""
    single, stack = peak_memory(1), peak_memory(16)
    print(f"peak memory GiB: a single run {single:.2f}, a stack of 16 {stack:.2f}", flush=True)
    report("7. peak memory: a stack of 16 / 16 single runs", stack / (16 * single), 1.0)


def seed_configs(out: str, jobs: int, *overrides: str) -> list[DictConfig]:
    """The seed experiment's jobs, seeds 0 .. jobs - 1, each in its own directory."""
    return [
        config(f"{out}/{seed}", "experiment=seed", f"seed={seed}", *overrides)
        for seed in range(jobs)
    ]


def fit(cfgs: list[DictConfig], callbacks: list[pl.Callback] = ()) -> None:
    """Train and test `cfgs`: one job as a single run, more as a stack (fused where it can)."""
    if len(cfgs) > 1:
        fit_and_test_stack(cfgs, stack_callbacks=callbacks)
        return
    datamodule, module = build_seeded(cfgs[0])
    trainer = build_trainer(cfgs[0])
    trainer.callbacks.extend(callbacks)
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, verbose=False)


def launches_per_job_step(jobs: int) -> float:
    """Line 9's count for `jobs` seed MLPs (1: a single run)."""
    counts = []
    for steps in (20, 60):
        with tempfile.TemporaryDirectory() as out:
            overrides = (f"+trainer.max_steps={steps}", "~callbacks.progress_bar")
            cfgs = seed_configs(out, jobs, *overrides, "trainer.limit_val_batches=1")
            with LaunchCount() as count:
                fit(cfgs)
        counts.append(count.ops.total())
    return (counts[1] - counts[0]) / (40 * jobs)


def kernel_launches() -> None:
    """9. What fusing saves on a launch-bound GPU, counted on any device."""
    alone, eight, many = (launches_per_job_step(jobs) for jobs in (1, 8, 32))
    print(
        f"ops per job-step: a single run {alone:.1f}, fused 8 {eight:.2f}, fused 32 {many:.2f}",
        flush=True,
    )
    report("9. ops per job-step: fused stack of 8 / a single run", eight / alone, 1 / 4)
    report("9. ops per job-step: fused stack of 32 / a single run", many / alone, 1 / 12)


class StepTimer(pl.Callback):
    """Seconds from the start of training step `warm` to the end of training, and the steps."""

    def __init__(self, warm: int = 5) -> None:
        self.warm = warm

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warm:
            synchronize()
            self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        synchronize()
        self.seconds = time.perf_counter() - self.start
        self.steps = trainer.global_step - self.warm


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu(jobs: int = 64, steps: int = 200, *overrides: str) -> None:
    """`--gpu`: jobs x steps per second of a fused stack of `jobs` seed MLPs against single runs
    one after another (a single run's rate), and the stack's peak GPU memory. Without a CUDA
    device it runs as is on the CPU and says so: the figures are then the CPU's."""
    device = "cuda" if torch.cuda.is_available() else "cpu (no CUDA device: GPU figure unmeasured)"
    print(f"--gpu on {device}", flush=True)
    rates = {}
    fast = (f"+trainer.max_steps={steps}", "~callbacks.progress_bar")
    for k in (1, jobs):
        with tempfile.TemporaryDirectory() as out:
            cfgs = seed_configs(out, k, *fast, "trainer.limit_val_batches=1", *overrides)
            timer = StepTimer()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            fit(cfgs, [timer])
            rates[k] = k * timer.steps / timer.seconds
    print(
        f"job-steps per second: single runs {rates[1]:.0f}, a fused stack of {jobs} "
        f"{rates[jobs]:.0f}: {rates[jobs] / rates[1]:.1f}x (aim 20x on a GPU)",
        flush=True,
    )
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak GPU memory of the stack of {jobs}: {peak:.2f} GiB", flush=True)


def sweep_overhead() -> None:
    """10. What a sweep costs per job beyond its training and testing: at 2 steps a job, the
    128-job sweep is that cost and little else. Both sweeps stack, 16 jobs a stack (1 and 8
    stacks), so a stack's own cost counts too, shared by its jobs. Each sweep runs twice,
    alternated, and each keeps its least time beyond fit+test (the host's load only adds)."""
    lrs = "optimizer.lr=" + ",".join(map(str, LRS))
    fast = ("+trainer.max_steps=2", "trainer.limit_val_batches=2", "hydra/launcher=stacked")
    small, large = [], []
    for _ in range(2):
        with tempfile.TemporaryDirectory() as tmp:
            small.append(sweep(Path(tmp, "small"), lrs, "seed=0,1", *fast))
            large.append(sweep(Path(tmp, "large"), lrs, "seed=range(16)", *fast))
    (small_wall, small_work), (large_wall, large_work) = (
        min(runs, key=lambda run: run[0] - run[1]) for runs in (small, large)
    )
    per_job = ((large_wall - large_work) - (small_wall - small_work)) / (128 - 16)
    print(
        f"2-step sweep seconds (each the run of least time beyond fit+test): 16 jobs "
        f"{small_wall:.1f} (fit+test {small_work:.1f}), 128 jobs {large_wall:.1f} "
        f"(fit+test {large_work:.1f})",
        flush=True,
    )
    report("10. seconds per job beyond training, 128-job 2-step sweep", per_job, 0.15, unit=" s")


def sharpness_cost() -> None:
    """8. The sharpness callback at the `edge_of_stability` preset's settings: the full-batch
    epochs (one step each) of a run with it over those of a run without it, the runs
    alternating. Totals, not medians: it measures one epoch in `every_n_steps`, and a median
    epoch would leave its cost out."""
    preset = ("experiment=edge_of_stability", "optimizer.lr=0.02", "trainer.max_epochs=201")
    with_it, without = [], []
    for _ in range(ROUNDS):
        with_it.append(sum(vanishlab_epochs(*preset).whole))
        without.append(sum(vanishlab_epochs(*preset, "~callbacks.sharpness").whole))
    ratio = statistics.median(with_it) / statistics.median(without)
    reference("8. edge_of_stability: 200 epochs with Sharpness / without", ratio)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peak-memory"]:
        train_for_peak_memory(int(sys.argv[2]))
    elif sys.argv[1:2] == ["--gpu"]:  # --gpu [jobs] [steps] [overrides...]
        gpu(*(int(arg) for arg in sys.argv[2:4]), *sys.argv[4:])
    elif sys.argv[1:2] == ["--stacks"]:  # what stacking changes: lines 6, 6a, 6b, 7, 9 and 10
        stacked_sweeps(tensor_batches())
        stack_memory()
        kernel_launches()
        sweep_overhead()
    else:
        main()
