"""What a sweep varies (`vanishlab.varied`): one rule for job names, HParams and the report."""

from __future__ import annotations

from omegaconf import OmegaConf

from vanishlab.varied import named_keys, read_named_keys, save_named_keys, varied_keys

# Two jobs of the vanishing_depth preset, as the report reads them: `init` varies, and each init
# brings keys the other lacks; `data.seed` reads `${seed}`.
NORMAL = {
    "init._target_": "vanishlab.init.normal",
    "init.std": 1.0,
    "model.depth": 8,
    "seed": 0,
    "data.seed": 0,
}
KAIMING = {
    "init._target_": "vanishlab.init.kaiming_normal",
    "init.nonlinearity": "relu",
    "model.depth": 16,
    "seed": 1,
    "data.seed": 1,
}


def test_keys_that_follow_from_a_group_or_copy_another_do_not_vary() -> None:
    assert varied_keys([NORMAL, KAIMING]) == ["init._target_", "model.depth", "seed"]
    # The same rule on the HParams table's rows, where a group's option is the group's column.
    rows = [{"init": "normal", "init.std": 1.0}, {"init": "kaiming_normal"}]
    assert varied_keys(rows) == ["init"]


def test_a_key_the_sweep_names_varies_though_it_follows_from_another() -> None:
    """`init=normal,kaiming_normal init.std=0.5,1` (kaiming's jobs without a std), and a
    `data.seed` swept beside the seed."""
    half = {**NORMAL, "init.std": 0.5}
    assert varied_keys([NORMAL, half, KAIMING], ["init", "init.std"]) == [
        "init._target_",
        "init.std",
        "model.depth",
        "seed",
    ]
    assert "data.seed" in varied_keys([NORMAL, KAIMING], ["seed", "data.seed"])


def test_a_key_that_differs_alone_varies_and_where_jobs_write_never() -> None:
    a = {"paths.output_dir": "/s/a", "callbacks.ckpt.dirpath": "/s/a/c", "seed": 0, "lr": 0.1}
    b = {"paths.output_dir": "/s/b", "callbacks.ckpt.dirpath": "/s/b/c", "seed": 0, "lr": 0.1}
    assert varied_keys([a, b]) == []
    assert varied_keys([a, {**b, "init.std": 1.0}]) == ["init.std"]  # one job has it
    assert varied_keys([a, {**b, "lr": 1.0}]) == ["lr"]
    # Same values as the seed's, but not under a varied group: the shorter name stays.
    assert varied_keys([{"seed": 0, "data.seed": 0}, {"seed": 1, "data.seed": 1}]) == ["seed"]


def test_a_sweep_saves_the_keys_it_names_once(tmp_path) -> None:
    config = OmegaConf.create(
        {
            "hydra": {
                "overrides": {"task": ["init=normal,kaiming_normal", "trainer.max_epochs=2"]},
                "sweeper": {"params": {"model.depth": "1,2"}},
            }
        }
    )
    assert named_keys(config) == ["init", "model.depth"]
    assert read_named_keys(tmp_path) is None
    save_named_keys(tmp_path, config)
    config.hydra.overrides.task = ["seed=1,2"]
    save_named_keys(tmp_path, config)  # a re-run keeps its first names
    assert read_named_keys(tmp_path) == ["init", "model.depth"]
