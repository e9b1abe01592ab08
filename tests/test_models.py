"""The network interface: every model family in conf/model/ trains and is measured through its
probes alone; init, remedies, dead units and the test-split evidence read only that interface."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from conftest import FAST, compose_config, same_record, worst
from vanishlab import ConfigError
from vanishlab.config import CONFIG_DIR
from vanishlab.diagnostics import evidence_on_test_split
from vanishlab.init import initialise, kaiming_normal, variance_scaling, zeros
from vanishlab.nets import CNN, MLP, Probe, Residual
from vanishlab.results import (
    CLASSES_PREDICTED,
    GRAD_NORMS_AT_START,
    MAX_DEAD,
    STATUS,
    VERDICT,
)
from vanishlab.stack import fit_and_test_stack
from vanishlab.train import build, fit_and_test

MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
REMEDIES = sorted(p.stem for p in (CONFIG_DIR / "remedy").glob("*.yaml"))
# Families with no norm or residual keys (a ViT has both built in): a remedy other than none is
# refused.
NO_REMEDIES = {"rnn", "vit"}


def scalar_tags(run_dir) -> set[str]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return set(events.Tags()["scalars"])


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("remedy", ["none", "residual_layernorm"])
def test_every_model_trains_and_every_probe_is_logged(model, remedy, tiny_data, tmp_path) -> None:
    overrides = [*FAST, f"model={model}", f"remedy={remedy}", "model.depth=3"]
    cfg = compose_config(overrides, tiny_data, tmp_path)
    if model in NO_REMEDIES and remedy != "none":
        with pytest.raises(ConfigError, match="could not be built from its config"):
            build(cfg)
        return
    datamodule, module = build(cfg)
    probes = module.net.probes()
    assert len({p.name for p in probes}) == len(probes)  # stable, distinct tags
    assert any(p.is_norm for p in probes) == (remedy != "none" or model == "vit")
    record = fit_and_test(cfg)
    tags = scalar_tags(tmp_path)
    for probe in probes:
        weighted = () if probe.is_time else ("grad_norm", "weight_norm", "update_ratio")
        for family in (*weighted, "act_mean", "act_std", "backward"):
            assert f"{family}/{probe.name}" in tags
    verdicts = ("trained", "vanishing", "exploding", "dead", "undertrained", "too_short")
    assert record[VERDICT] in verdicts
    layers = sum(not (p.is_norm or p.is_time) for p in probes)
    assert len(record[GRAD_NORMS_AT_START]) == layers


def test_batches_keep_the_image_shape_and_the_network_gets_the_data_shapes(tiny_data, tmp_path):
    cfg = compose_config([*FAST, "model=cnn"], tiny_data, tmp_path)
    datamodule, module = build(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    x, _ = next(iter(datamodule.train_dataloader()))
    assert x.shape[1:] == (1, 28, 28) == datamodule.sample_shape
    assert module(x).shape == (len(x), datamodule.num_classes)


def test_init_reaches_every_declared_weight_conv_included(tiny_data, tmp_path) -> None:
    cfg = compose_config(
        [*FAST, "model=cnn", "remedy=batchnorm", "init=zeros"], tiny_data, tmp_path
    )
    _, module = build(cfg)
    for probe in module.net.probes():
        if probe.is_norm:  # norm layers start at weight 1, bias 0 whatever the init
            assert torch.all(probe.layer.weight == 1) and torch.all(probe.layer.bias == 0)
        else:
            assert torch.all(probe.layer.weight == 0) and torch.all(probe.layer.bias == 0)
    assert {type(p.layer) for p in module.net.probes()} == {nn.Conv2d, nn.BatchNorm2d, nn.Linear}


def test_variance_scaling_draws_weights_and_biases_with_the_variances_asked(
    tiny_data, tmp_path
) -> None:
    """Variances, not standard deviations: read as stds, 2.5 and 0.09 would give 6.25 and 0.0081.
    4 million hidden weights and 4,010 biases put the sample variances within 1% and 3%."""
    sigma_w2, sigma_b2 = 2.5, 0.09
    init = ["init=variance_scaling", f"init.sigma_w2={sigma_w2}", f"init.sigma_b2={sigma_b2}"]
    cfg = compose_config([*FAST, *init, "model.width=2000"], tiny_data, tmp_path)
    probes = build(cfg)[1].net.probes()
    for probe in probes:
        weight = probe.layer.weight.detach()
        assert weight.var().item() * weight.shape[1] == pytest.approx(sigma_w2, rel=0.05)
    biases = torch.cat([p.layer.bias.detach() for p in probes])
    assert biases.var().item() == pytest.approx(sigma_b2, rel=0.1)
    assert abs(biases.mean().item()) < 0.1 * sigma_b2**0.5
    default = compose_config([*FAST, "model.width=2000"], tiny_data, tmp_path)
    assert all(torch.all(p.layer.bias == 0) for p in build(default)[1].net.probes())


class WithUndeclaredWeight(nn.Module):
    """A network whose probes leave one parameter out."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.relu = nn.Linear(4, 2), nn.ReLU()
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.relu(self.linear(x)) * self.scale

    def probes(self) -> list[Probe]:
        return [Probe("layer_00", self.linear, self.relu)]


def test_init_names_the_weights_it_leaves_alone(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="vanishlab.init"):
        initialise(WithUndeclaredWeight(), zeros)
    assert "1 parameter(s)" in caplog.text and "scale" in caplog.text


# The weights MLP and CNN started from, seed 0, when init read each probe's `layer.weight` and
# `layer.bias` (before probes named their parameters and had roles): the sum over the state
# dict's tensors of (position + 1) x sum of squares, which any other draw or order changes.
BEFORE_ROLES = {
    ("mlp", "kaiming_normal"): 2803.050859667855,
    ("mlp", "variance_scaling"): 2811.4599170826914,
    ("cnn", "kaiming_normal"): 524.5134239985241,
    ("cnn", "variance_scaling"): 513.3205182341998,
}
NETS = {
    "mlp": lambda: MLP((1, 28, 28), 10, depth=3, width=20, norm="batch", residual=True),
    "cnn": lambda: CNN((1, 28, 28), 10, depth=3, width=4, norm="layer", residual=True),
}
INITS = {
    "kaiming_normal": kaiming_normal,
    "variance_scaling": partial(variance_scaling, sigma_w2=2.0, sigma_b2=0.1),
}


@pytest.mark.parametrize(("model", "init"), BEFORE_ROLES)
def test_mlp_and_cnn_start_from_the_weights_they_always_did(model, init) -> None:
    torch.manual_seed(0)
    net = NETS[model]()
    initialise(net, INITS[init])
    tensors = net.state_dict().values()
    fingerprint = sum((i + 1) * t.double().square().sum().item() for i, t in enumerate(tensors))
    assert fingerprint == pytest.approx(BEFORE_ROLES[model, init], rel=1e-12)
    roles = [p.role for p in net.probes()]
    assert roles == ["input", "norm", "hidden", "norm", "hidden", "norm", "output"]


@pytest.mark.parametrize(
    ("activation", "dead_logged"), [("relu", True), ("leaky_relu", False), ("gelu", False)]
)
def test_only_relu_units_can_be_dead(activation, dead_logged, tiny_data, tmp_path) -> None:
    """A ReLU unit with output 0 for every example gets no gradient: dead. Leaky ReLU and GELU
    units always pass some gradient, so they get no dead_frac and no `dead` verdict."""
    cfg = compose_config([*FAST, f"model.activation={activation}"], tiny_data, tmp_path)
    _, module = build(cfg)
    *hidden, output = (p.kind for p in module.net.probes())
    assert set(hidden) == {activation} and output == "identity"
    record = fit_and_test(cfg)
    assert ("dead_frac/layer_00" in scalar_tags(tmp_path)) == dead_logged
    assert dead_logged or record[MAX_DEAD] == 0
    assert record[VERDICT] != "dead"


def test_evidence_on_test_split_uses_eval_mode(tiny_data, tmp_path) -> None:
    cfg = compose_config([*FAST, "remedy=batchnorm"], tiny_data, tmp_path)
    datamodule, module = build(cfg)
    datamodule.prepare_data()
    datamodule.setup("test")
    norm = next(p.layer for p in module.net.probes() if p.is_norm)
    norm.running_mean.fill_(50.0)  # eval mode reads it: every unit's input shifts far negative
    module.train()
    evidence = evidence_on_test_split(module, datamodule)
    assert module.training  # left as it was
    module.eval()
    with torch.no_grad():
        images, _ = datamodule.splits["test"]
        predicted = module(images).argmax(dim=1).unique().numel()
    assert evidence[CLASSES_PREDICTED] == predicted


BAD_KEYS = [
    ("model.depth=0", "model.depth=0 is not allowed"),
    ("model.norm=group", "model.norm='group' is not allowed"),
    ("model.residual_scale=inf", "model.residual_scale=inf is not allowed"),
    ("+model.dropout=0.1", "could not be built from its config"),
]
# model=rnn and model=vit have no norm or residual keys to override.
BAD_MODEL_KEYS = [
    (model, override, message)
    for model in MODELS
    for override, message in BAD_KEYS
    if not (model in NO_REMEDIES and override.startswith(("model.norm", "model.residual")))
]


@pytest.mark.parametrize(("model", "override", "message"), BAD_MODEL_KEYS)
def test_bad_model_keys_end_in_one_paragraph(model, override, message, tiny_data, tmp_path):
    cfg = compose_config([*FAST, f"model={model}", override], tiny_data, tmp_path)
    with pytest.raises(ConfigError, match=message) as error:
        build(cfg)
    assert "Fix:" in str(error.value)


@pytest.mark.parametrize("remedy", REMEDIES)
def test_each_remedy_builds_what_it_names(remedy, tiny_data, tmp_path) -> None:
    _, module = build(compose_config([*FAST, f"remedy={remedy}"], tiny_data, tmp_path))
    norms = {type(p.layer).__name__ for p in module.net.probes() if p.is_norm}
    skips = [m for m in module.net.modules() if isinstance(m, Residual)]
    expected_norm = {"batchnorm": {"BatchNorm1d"}, "layernorm": {"LayerNorm"}}
    assert norms == expected_norm.get(remedy, {"LayerNorm"} if "layernorm" in remedy else set())
    assert bool(skips) == remedy.startswith("residual")


@pytest.mark.parametrize(
    ("model", "override", "message"),
    [
        ("rnn", "model.cell=elman", "model.cell='elman' is not allowed"),
        ("rnn", "model.sequence=columns", "model.sequence='columns' is not allowed"),
        ("rnn", "model.recurrent_init=xavier", "model.recurrent_init='xavier' is not allowed"),
        ("rnn", "model.recurrent_scale=-1", "model.recurrent_scale=-1 is not allowed"),
        ("rnn", "remedy=layernorm", "could not be built from its config"),
        ("vit", "model.heads=3", r"model.heads=3 does not divide model.width=64.* Fix: .*1, 2, 4"),
        ("vit", "model.heads=0", "model.heads=0 is not allowed"),
        ("vit", "model.norm_position=sandwich", "model.norm_position='sandwich' is not allowed"),
        ("vit", "remedy=residual_layernorm", "could not be built from its config"),
    ],
)
def test_bad_family_keys_and_remedies_end_in_one_paragraph(
    model, override, message, tiny_data, tmp_path
) -> None:
    cfg = compose_config([*FAST, f"model={model}", override], tiny_data, tmp_path)
    with pytest.raises(ConfigError, match=message) as error:
        build(cfg)
    assert "Fix:" in str(error.value)


@pytest.mark.parametrize(
    "small",
    [
        ["model=rnn", "model.width=16"],
        ["model=vit", "model.width=16", "model.depth=2", "model.heads=2"],
    ],
    ids=["rnn", "vit"],
)
def test_stacked_family_jobs_complete_and_measure_as_alone(small, tiny_data, tmp_path) -> None:
    jobs = [["seed=0", "optimizer.lr=0.05"], ["seed=1", "optimizer.lr=0.1"]]

    def configs(where: str) -> list:
        return [
            compose_config([*FAST, *small, *job], tiny_data, tmp_path / where / str(i))
            for i, job in enumerate(jobs)
        ]

    alone = [fit_and_test(cfg) for cfg in configs("alone")]
    stacked = fit_and_test_stack(configs("stacked"))
    for own, record in zip(alone, stacked, strict=True):
        assert record[STATUS] == own[STATUS] == "completed"
        assert same_record(record, own), worst(record, own)
