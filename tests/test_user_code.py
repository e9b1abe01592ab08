"""A user extends vanishlab from a project of their own, outside its source tree: their YAMLs
join vanishlab's groups through `hydra.searchpath`, and their `_target_`s name their own code."""

from __future__ import annotations

import json
import textwrap

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import FAST, run_cli
from vanishlab.results import (
    JOB_CONFIG,
    STATUS,
    TEST_ACC,
    VERDICT,
)

USER_NETS = '''
"""A second model family with its own layout: named attributes, no vanishlab Blocks."""
import math

from torch import nn

from vanishlab.nets import Probe


class OneHidden(nn.Module):
    def __init__(self, input_shape, num_classes, width=32):
        super().__init__()
        self.hidden = nn.Linear(math.prod(input_shape), width)
        self.squash = nn.Tanh()
        self.readout = nn.Linear(width, num_classes)
        self.logits = nn.Identity()

    def forward(self, x):
        return self.logits(self.readout(self.squash(self.hidden(x.flatten(1)))))

    def probes(self):
        return [
            Probe("layer_00", self.hidden, self.squash),
            Probe("layer_01", self.readout, self.logits),
        ]


def scaled_normal(weight, bias, scale=0.5):
    """An init of the user's own: N(0, scale^2 / fan_in)."""
    nn.init.normal_(weight, std=scale / math.sqrt(weight.shape[1]))
'''


@pytest.mark.slow
def test_a_users_model_and_init_from_their_own_directory(tiny_data, tmp_path) -> None:
    project = tmp_path / "project"
    (project / "my_conf" / "model").mkdir(parents=True)
    (project / "my_conf" / "init").mkdir()
    (project / "mynets.py").write_text(textwrap.dedent(USER_NETS))
    (project / "my_conf" / "model" / "one_hidden.yaml").write_text(
        "_target_: mynets.OneHidden\nwidth: 32\n"
    )
    (project / "my_conf" / "init" / "scaled_normal.yaml").write_text(
        "_target_: mynets.scaled_normal\n_partial_: true\nscale: 0.5\n"
    )
    run_dir = project / "run"
    result = run_cli(
        "vanishlab.train",
        *FAST,
        f"hydra.searchpath=[file://{project / 'my_conf'}]",
        "model=one_hidden",
        "init=scaled_normal",
        f"hydra.run.dir={run_dir}",
        data_dir=tiny_data,
        cwd=project,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record[STATUS] == "completed" and record[VERDICT] in ("trained", "too_short")
    assert record[JOB_CONFIG]["model"]["_target_"] == "mynets.OneHidden"
    events = EventAccumulator(str(run_dir))
    events.Reload()
    for probe in ("layer_00", "layer_01"):
        assert f"grad_norm/{probe}" in events.Tags()["scalars"]
    assert "saturated_frac/layer_00" in events.Tags()["scalars"]  # tanh, read from its type
    assert "init left" not in result.stderr  # every weight was declared

    # Its checkpoint names the user's class: eval runs it only when the user trusts it.
    ckpt = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    evaluate = [ckpt, f"hydra.run.dir={project / 'e1'}"]
    refused = run_cli("vanishlab.eval", *evaluate, data_dir=tiny_data, cwd=project)
    assert refused.returncode == 2 and "trust=[mynets]" in refused.stderr
    evaluate = [ckpt, "trust=[mynets]", f"hydra.run.dir={project / 'e2'}"]
    trusted = run_cli("vanishlab.eval", *evaluate, data_dir=tiny_data, cwd=project)
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    evaluated = json.loads((project / "e2" / "metrics.json").read_text())
    assert evaluated[TEST_ACC] == pytest.approx(record[TEST_ACC], abs=1e-6)


USER_RNN = '''
"""A recurrent model whose probe says nothing of its parameters: an RNN has no `weight`."""
from torch import nn

from vanishlab.nets import Probe


class Rows(nn.Module):
    def __init__(self, input_shape, num_classes, width=16):
        super().__init__()
        self.rnn = nn.RNN(input_shape[-1], width, batch_first=True)
        self.last = nn.Identity()
        self.readout, self.logits = nn.Linear(width, num_classes), nn.Identity()

    def forward(self, x):
        states, _ = self.rnn(x.flatten(1, 2))
        return self.logits(self.readout(self.last(states[:, -1])))

    def probes(self):
        return [
            Probe("layer_00", self.rnn, self.last),
            Probe("layer_01", self.readout, self.logits),
        ]
'''


@pytest.mark.slow
def test_a_probe_naming_parameters_its_layer_lacks_ends_in_one_paragraph(tiny_data, tmp_path):
    """Where init once failed deep inside with `'bool' object has no attribute 'zero_'`
    (`nn.RNN.bias` is a flag), the network is refused as it is built: exit 2, no traceback."""
    project = tmp_path / "project"
    (project / "my_conf" / "model").mkdir(parents=True)
    (project / "mynets.py").write_text(textwrap.dedent(USER_RNN))
    (project / "my_conf" / "model" / "rows.yaml").write_text("_target_: mynets.Rows\n")
    result = run_cli(
        "vanishlab.train",
        *FAST,
        f"hydra.searchpath=[file://{project / 'my_conf'}]",
        "model=rows",
        f"hydra.run.dir={project / 'run'}",
        data_dir=tiny_data,
        cwd=project,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "model=mynets.Rows: probe 'layer_00' names weight, bias" in result.stderr
    assert "params=('weight_ih_l0', 'weight_hh_l0', 'bias_ih_l0', 'bias_hh_l0')" in result.stderr
    assert "Traceback" not in result.stderr
