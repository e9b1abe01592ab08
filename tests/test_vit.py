"""model=vit: a vision transformer whose residual stream is the backward signal's axis, Pre-LN
and Post-LN as Xiong et al. (2020) compare them, attention measured through its projections,
and a positional embedding the model initialises itself."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_rnn import log10_first_over_last

from conftest import FAST, compose_config
from vanishlab.config import CONFIG_DIR
from vanishlab.init import initialise, kaiming_normal
from vanishlab.nets import ViT
from vanishlab.results import BACKWARD_START, STATUS
from vanishlab.train import build, fit_and_test

INITS = sorted(p.stem for p in (CONFIG_DIR / "init").glob("*.yaml"))
SMALL = ["model=vit", "model.width=16", "model.depth=2", "model.heads=2"]


def test_post_ln_sends_less_gradient_back_along_the_stream_than_pre_ln() -> None:
    """At init (He normal, 6 blocks of width 64, 100 random images), log10 ||dL/dx|| after the
    first block over after the last: Pre-LN 0.51, 0.62, 0.32, 0.37 for seeds 0-3, Post-LN
    0.20, 0.46, 0.15, -0.24. Post-LN's gradient sits nearer the output, as Xiong et al. find:
    each of its LayerNorms divides the gradient passing back through it, where Pre-LN's skip
    path carries it back whole and every block adds its own."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(100, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (100,), generator=generator)
    ratios = {}
    for position in ("pre", "post"):
        ratios[position] = []
        for seed in range(4):
            torch.manual_seed(seed)
            net = ViT((1, 28, 28), 10, norm_position=position)
            initialise(net, kaiming_normal)
            ratios[position].append(log10_first_over_last(net, x, y))
    gaps = [pre - post for pre, post in zip(ratios["pre"], ratios["post"], strict=True)]
    assert min(gaps) > 0.1 and sum(gaps) / len(gaps) > 0.2
    assert min(ratios["pre"]) > 0.2


def test_attention_and_stream_probes_are_measured(tiny_data, tmp_path) -> None:
    """Attention gets the weight figures of its input projection and dL/dh at its attended
    values; the record's backward ratio is the stream's, after block 0 over after the last."""
    record = fit_and_test(compose_config([*FAST, *SMALL], tiny_data, tmp_path))
    assert record[STATUS] == "completed"
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    _, module = build(compose_config([*FAST, *SMALL], tiny_data, tmp_path / "probes"))
    attention = [p.name for p in module.net.probes() if p.role == "attention"]
    assert attention == ["layer_02", "layer_05"]
    for name in attention:
        for family in ("grad_norm", "weight_norm", "update_ratio", "backward"):
            values = [e.value for e in events.Scalars(f"{family}/{name}")]
            assert values and all(math.isfinite(v) and v > 0 for v in values)
    first, last = (events.Scalars(f"backward/stream_{b:02d}")[0].value for b in (0, 1))
    assert record[BACKWARD_START] == pytest.approx(first / last, rel=1e-5)


@pytest.mark.parametrize("init", INITS)
def test_the_positional_embedding_keeps_its_own_init_under_any_init_group(
    init, tiny_data, tmp_path, caplog
) -> None:
    torch.manual_seed(0)
    own = ViT((1, 28, 28), 10).position.detach()
    cfg = compose_config([*FAST, "model=vit", f"init={init}"], tiny_data, tmp_path)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="vanishlab.init"):
        _, module = build(cfg)
    assert "default init" not in caplog.text  # every parameter is some probe's
    assert torch.equal(module.net.position, own)
    assert own.std().item() == pytest.approx(0.02, rel=0.05)
