"""Records that never lie: the Lightning-Hydra template's test suite in spirit (fast_dev_run,
resume with ckpt_path, train then test, every preset as a sweep), and the cases where a record
was once wrong: one job, one record; no verdict without evidence."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import FAST, compose_config, run_cli
from vanishlab import ConfigError
from vanishlab.config import CONFIG_DIR, check_config, check_sweepable
from vanishlab.losses import mean_loss
from vanishlab.results import (
    EPOCHS,
    FIRST_OVER_LAST,
    FULL_EPOCHS,
    GRAD_NORMS_AT_START,
    JOB_CONFIG,
    RESUMED_FROM,
    START,
    STATUS,
    STEPS,
    TAGS,
    TEST_ACC,
    TEST_LOSS,
    TESTED,
    VAL_ACC,
    VERDICT,
    Status,
    Verdict,
    job_id,
    job_identity,
    read_record,
    write_json,
)
from vanishlab.train import build, fit_and_test, instantiate_function, instantiate_model

SWEEP_PRESETS = sorted(
    p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if "sweeper" in p.read_text()
)


def test_status_and_verdict_values_are_their_strings_on_disk_and_in_text(tmp_path) -> None:
    """A record written with the enums is the record written with the strings, byte for byte,
    and a value read back from disk is its member."""
    path = tmp_path / "metrics.json"
    write_json(path, {STATUS: Status.DIVERGED, VERDICT: Verdict.TOO_SHORT})
    plain = {STATUS: "diverged", VERDICT: "too_short"}
    assert path.read_text() == json.dumps(plain, indent=2) + "\n"
    assert read_record(path) == {STATUS: Status.DIVERGED, VERDICT: Verdict.TOO_SHORT}
    assert read_record(path)[STATUS] in {Status.DIVERGED}
    assert f"{Status.DIVERGED}, {Verdict.TOO_SHORT}" == "diverged, too_short"


# --- no verdict without evidence -------------------------------------------------------------


def test_fast_dev_run_records_one_step_and_no_trained_network_verdict(tiny_data, tmp_path) -> None:
    record = fit_and_test(compose_config([*FAST, "debug=fdr"], tiny_data, tmp_path))
    assert record[STATUS] == "completed" and record[STEPS] == 1
    assert record[FULL_EPOCHS] == 0
    assert START in record  # the first step's gradient ratio is measured: evidence at step 1
    assert record[VERDICT] in ("too_short", "vanishing", "exploding")


def test_zero_epochs_is_too_short_not_dead(tiny_data, tmp_path) -> None:
    record = fit_and_test(compose_config([*FAST, "trainer.max_epochs=0"], tiny_data, tmp_path))
    assert record[STEPS] == 0 and record[EPOCHS] == 0
    assert record[VERDICT] == "too_short"


def test_limited_batches_are_not_a_full_pass(tiny_data, tmp_path) -> None:
    cfg = compose_config(
        [*FAST, "trainer.limit_train_batches=3", "trainer.max_epochs=2"], tiny_data, tmp_path
    )
    record = fit_and_test(cfg)
    assert record[STEPS] == 6 and record[EPOCHS] == 2 and record[FULL_EPOCHS] == 0
    assert record[VERDICT] != "trained"


def test_a_full_epoch_is_evidence_of_a_trained_network(tiny_data, tmp_path) -> None:
    cfg = compose_config([*FAST, "optimizer.lr=0.1", "trainer.max_epochs=2"], tiny_data, tmp_path)
    record = fit_and_test(cfg)
    assert record[FULL_EPOCHS] == 2 and record[STEPS] == 20  # 500 images, batches of 50
    assert record[VERDICT] == "trained"


def test_without_callbacks_the_verdict_rests_on_the_test_split(tiny_data, tmp_path) -> None:
    cfg = compose_config([*FAST, "callbacks=none", "optimizer.lr=0.1"], tiny_data, tmp_path)
    record = fit_and_test(cfg)
    assert START not in record and record[STEPS] == 10
    assert record[VERDICT] == "trained"


# --- GradientFlow under gradient accumulation --------------------------------------------------


def test_accumulated_gradient_is_measured_at_the_step_that_applies_it(tiny_data, tmp_path) -> None:
    overrides = [
        *FAST,
        "trainer.accumulate_grad_batches=2",
        "callbacks.gradient_flow.every_n_steps=1",
    ]
    cfg = compose_config(overrides, tiny_data, tmp_path)
    record = fit_and_test(cfg)
    assert record[STEPS] == 5  # 10 batches, 2 per step

    # The same network and first two batches, by hand: Lightning scales each loss by 1/2.
    torch.manual_seed(cfg.seed)
    datamodule, module = build(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    for x, y in list(datamodule.train_dataloader())[:2]:
        (mean_loss(module.loss_fn, module(x), y) / 2).backward()
    expected = module.net.probes()[0].layer.weight.grad.norm().item()

    events = read_scalars(tmp_path, "grad_norm/layer_00")
    assert [step for step, _ in events] == [0, 1, 2, 3, 4]  # one point per optimizer step
    assert events[0][1] == pytest.approx(expected, rel=1e-5)
    assert record[GRAD_NORMS_AT_START][0] == pytest.approx(expected, rel=1e-5)


def read_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# --- resume with ckpt_path; train, then test only ----------------------------------------------


def test_resume_with_ckpt_path_ends_as_an_uninterrupted_run(tiny_data, tmp_path) -> None:
    def run(name: str, *overrides: str) -> dict:
        cfg = compose_config([*FAST, "optimizer.lr=0.05", *overrides], tiny_data, tmp_path / name)
        return fit_and_test(cfg)

    whole = run("whole", "trainer.max_epochs=4")
    run("first", "trainer.max_epochs=2")
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed = run("resumed", "trainer.max_epochs=4", f"ckpt_path={ckpt}")
    assert resumed[RESUMED_FROM] == str(ckpt)
    assert resumed[STEPS] == whole[STEPS] == 40 and resumed[EPOCHS] == 4
    # Epochs 2 and 3 saw the batches the uninterrupted run's epochs 2 and 3 saw.
    for key in (TEST_ACC, TEST_LOSS, VAL_ACC, "val/loss"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6), key
    assert resumed[START] == whole[START]  # the first step's evidence came with the checkpoint

    # A checkpoint with no epoch left to train keeps its evidence, and so its verdict.
    done = run(
        "done", "trainer.max_epochs=4", f"ckpt_path={tmp_path / 'whole/checkpoints/last.ckpt'}"
    )
    assert done[STEPS] == 40 and done[VERDICT] == whole[VERDICT]
    assert done[FIRST_OVER_LAST] == whole[FIRST_OVER_LAST]


def test_train_then_test_only_gives_the_same_test_figures(tiny_data, tmp_path) -> None:
    trained = fit_and_test(compose_config(FAST, tiny_data, tmp_path / "train"))
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    overrides = [*FAST, "train=false", "test=true", f"ckpt_path={ckpt}"]
    tested = fit_and_test(compose_config(overrides, tiny_data, tmp_path / "test"))
    assert tested[TESTED] == str(ckpt) and "verdict" not in tested  # an evaluation, not a run
    assert tested[TEST_ACC] == pytest.approx(trained[TEST_ACC], abs=1e-6)
    assert tested[TEST_LOSS] == pytest.approx(trained[TEST_LOSS], abs=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train=false"], "train=false with test=True and ckpt_path=None does nothing"),
        (["ckpt_path=/no/such.ckpt"], "ckpt_path='/no/such.ckpt' is not a file"),
    ],
)
def test_train_test_and_ckpt_path_that_cannot_work_are_refused(
    overrides, message, tiny_data, tmp_path
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        fit_and_test(compose_config([*FAST, *overrides], tiny_data, tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_a_run_without_a_logger_works(tiny_data, tmp_path) -> None:
    record = fit_and_test(compose_config([*FAST, "~logger"], tiny_data, tmp_path))
    assert record[STATUS] == "completed" and record[VERDICT]
    assert not list(tmp_path.glob("events.out.tfevents.*"))


# --- one job, one record (command line) --------------------------------------------------------


def sweep_records(sweep_dir: Path) -> dict[Path, dict]:
    return {p.parent: json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")}


def assert_one_record_per_job(sweep_dir: Path, jobs: int) -> dict[Path, dict]:
    """Each job has its own directory, and its record is of the config Hydra saved there.
    (Two presets can compose the same config, e.g. seed_variance run as one job is
    seed_output_relu: such jobs share a job_id, not a directory.)"""
    records = sweep_records(sweep_dir)
    assert len(records) == jobs, sorted(p.name for p in records)
    for job_dir, record in records.items():
        saved = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
        assert record[JOB_CONFIG] == job_identity(saved), job_dir.name
    return records


def preset_sweep(experiment: str) -> list[list[str]]:
    """The jobs of a preset's sweep, each as its overrides, in the order the command line
    launches them: the preset's `hydra.sweeper.params` expanded by Hydra's own sweeper code
    (`BasicSweeper.split_arguments`, which also expands `glob(*)` over a config group)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
        params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        (jobs,) = BasicSweeper.split_arguments(parser.parse_overrides(params), None)
    return jobs


@pytest.mark.parametrize("experiment", SWEEP_PRESETS)
def test_every_job_of_every_preset_is_valid_and_builds(experiment, preset_data, tmp_path) -> None:
    """Every job of the preset's sweep, as its own config: it resolves, passes the checks that
    `train.prepare` makes of a sweep's job (`check_config`, `check_sweepable`), has its own
    job_id (one job, one record); and what `train.build` makes of it (data module, network,
    init, loss, optimizer, scheduler) is made, the network on the meta device, where a
    training step's forward and backward run on shapes alone: a value that composes but
    cannot build or train fails here, job by job, for the cost of composing it. Real weights,
    Lightning's loop, the launcher and the records are the next test's: it trains the corners
    of each sweep through the command line."""
    jobs = preset_sweep(experiment)
    assert len(jobs) > 1, jobs
    constants = [
        f"paths.data_dir={preset_data}",
        f"paths.output_dir={tmp_path}",
        f"experiment={experiment}",
        "data.download=false",
    ]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):  # one loader for all
        configs = [compose("train", overrides=[*constants, *job]) for job in jobs]
    ids = set()
    for overrides, cfg in zip(jobs, configs, strict=True):
        identity = job_identity(cfg)
        ids.add(job_id(identity))
        check_config(cfg)
        check_sweepable(cfg)
        # What `train.build` makes, on PyTorch's meta device (shapes, no values: a depth-64
        # orthogonal init costs nothing), and a training step's forward and backward through it.
        datamodule = instantiate(cfg.data)
        shape, classes = datamodule.sample_shape, datamodule.num_classes
        instantiate(cfg.init), instantiate(cfg.scheduler) if cfg.get("scheduler") else None
        loss_fn = instantiate_function(cfg.loss)
        with torch.device("meta"):
            net = instantiate_model(cfg.model, input_shape=shape, num_classes=classes)
            outputs = net(torch.empty(4, *shape))
            loss = mean_loss(loss_fn, outputs, torch.zeros(4, dtype=torch.long))
        instantiate(cfg.optimizer)(net.parameters())
        assert outputs.shape == (4, classes) and loss.shape == (), overrides
        loss.backward()
    assert len(ids) == len(jobs), f"{len(jobs) - len(ids)} jobs of {experiment} share a job_id"


def corners(jobs: list[list[str]]) -> list[str]:
    """Each key the sweep varies, as `key=<first value>,<last value>` (one value where it has
    one): on the command line these override the preset's own lists."""
    values: dict[str, list[str]] = {}
    for overrides in jobs:
        for override in overrides:
            key, value = override.split("=", 1)
            if value not in values.setdefault(key, []):
                values[key].append(value)
    return [f"{key}={','.join(dict.fromkeys([v[0], v[-1]]))}" for key, v in values.items()]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", [*SWEEP_PRESETS, "glob(*)"])
def test_every_preset_as_a_fast_dev_run_sweep(experiment, preset_data, tmp_path) -> None:
    """The preset's sweep through the command line, as a fast_dev_run, on its corners: each key
    it varies at its first and its last value, and every combination of those (its first and
    last jobs among them). That is every end of every range (depth 1 and 16, lr 0.001 and 10,
    a pre- and a post-norm transformer at both depths) and stacks of several jobs wherever the
    full sweep stacks them (inits, losses, learning rates, seeds), through the launcher, into
    one record per job. The values between (a middle depth, tanh, lstm, a third loss) are
    checked, built and stepped job by job above, and trained by their modules' own tests; so
    a preset costs a few stacks here instead of up to 15.

    `experiment=glob(*)` runs every preset (those without a sweep too) as one job each."""
    sweep = [] if experiment == "glob(*)" else corners(preset_sweep(experiment))
    result = run_cli(
        "vanishlab.train",
        "-m",
        f"experiment={experiment}",
        *sweep,
        "debug=fdr",
        "data.download=false",
        "++callbacks.progress_bar=null",
        f"hydra.sweep.dir={tmp_path}",
        data_dir=preset_data,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (launched,) = re.findall(r"Launching (\d+) jobs locally", result.stderr + result.stdout)
    records = assert_one_record_per_job(tmp_path, int(launched))
    assert all(r[STATUS] in ("completed", "diverged") for r in records.values())
    assert all(r[STEPS] <= 1 and r[VERDICT] != "trained" for r in records.values())
    if experiment == "glob(*)":
        assert int(launched) == len(list((CONFIG_DIR / "experiment").glob("*.yaml")))
    else:  # the corners, and only they, were launched
        assert int(launched) == math.prod(len(s.split("=", 1)[1].split(",")) for s in sweep)


@pytest.mark.slow
def test_a_rerun_takes_only_records_of_its_own_config(tiny_data, tmp_path) -> None:
    """A preset edited between two runs of the same command: its jobs keep their names but not
    their configs, so the re-run trains them anew beside the old records, which stay as they
    were; a third run skips them all."""
    conf = tmp_path / "my_conf" / "experiment"
    conf.mkdir(parents=True)
    preset = conf / "mine.yaml"
    sweep_dir = tmp_path / "sweep"

    def run(max_epochs: int) -> str:
        preset.write_text(f"# @package _global_\ntrainer:\n  max_epochs: {max_epochs}\n")
        result = run_cli(
            "vanishlab.train",
            "-m",
            "experiment=mine",
            "seed=0,1",
            *FAST[:3],
            "++callbacks.progress_bar=null",
            f"hydra.searchpath=[file://{conf.parent}]",
            f"hydra.sweep.dir={sweep_dir}",
            data_dir=tiny_data,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout + result.stderr

    run(max_epochs=1)
    first = {p: p.read_text() for p in sweep_dir.glob("*/metrics.json")}
    first_configs = {p: p.read_text() for p in sweep_dir.glob("*/.hydra/config.yaml")}
    assert len(first) == 2

    output = run(max_epochs=2)
    assert "Skipping" not in output
    records = assert_one_record_per_job(sweep_dir, 4)
    assert {p: p.read_text() for p in first} == first  # the old records are untouched
    assert {p: p.read_text() for p in first_configs} == first_configs
    new = [r for p, r in records.items() if "~" in p.name]
    assert len(new) == 2 and all(r[EPOCHS] == 2 for r in new)

    assert run(max_epochs=2).count("Skipping") == 2


@pytest.mark.slow
def test_a_finished_run_directory_is_never_written_again(tiny_data, tmp_path) -> None:
    args = ["vanishlab.train", *FAST, f"hydra.run.dir={tmp_path}"]
    assert run_cli(*args, "tags=[first]", data_dir=tiny_data).returncode == 0
    kept = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = run_cli(*args, "seed=1", data_dir=tiny_data)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "already holds a run" in result.stderr and "ckpt_path=" in result.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == kept
    assert json.loads((tmp_path / "metrics.json").read_text())[TAGS] == ["first"]


@pytest.mark.slow
def test_seed_null_draws_a_seed_that_the_record_keeps(tiny_data, tmp_path) -> None:
    def run(name: str, seed: str) -> dict:
        result = run_cli(
            "vanishlab.train",
            *FAST,
            f"seed={seed}",
            f"hydra.run.dir={tmp_path / name}",
            data_dir=tiny_data,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / name / "metrics.json").read_text())

    drawn = run("drawn", "null")
    assert isinstance(drawn["seed"], int) and drawn[JOB_CONFIG]["seed"] is None
    again = run("again", str(drawn["seed"]))
    results = (STATUS, "seed", STEPS, TEST_ACC, TEST_LOSS, VAL_ACC, VERDICT)
    assert {k: again[k] for k in results} == {k: drawn[k] for k in results}
