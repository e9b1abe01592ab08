"""A fault injector for tests/test_faults.py: `+callbacks.kill_at={_target_:kill_at.KillAt}`.

It is part of every run's config in those tests (so the interrupted and uninterrupted sweeps
have the same job ids), and does nothing unless `KILL_AT=<point>:<n>` is set, when it kills
its own process with SIGKILL (no clean-up, as a lost node or the OOM killer would) at the n-th
time this process reaches `<point>`: a Lightning hook (`on_train_batch_start`,
`on_validation_batch_start`, `on_test_batch_start`) or `save_record` (writing a job's record).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

import pytorch_lightning as pl

from vanishlab import train

REACHED: Counter = Counter()


def reach(point: str) -> None:
    target, _, n = os.environ.get("KILL_AT", "").partition(":")
    if target == point:
        REACHED[point] += 1
        if REACHED[point] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)


def save_record_then_maybe_die(original):
    def save_record(path, record):
        if record.get("status") != "started":
            reach("save_record")
        original(path, record)

    save_record.patched = True
    return save_record


class KillAt(pl.Callback):
    def __init__(self) -> None:
        if not getattr(train.save_record, "patched", False):
            train.save_record = save_record_then_maybe_die(train.save_record)

    def on_train_batch_start(self, *args) -> None:
        reach("on_train_batch_start")

    def on_validation_batch_start(self, trainer: pl.Trainer, *args) -> None:
        if not trainer.sanity_checking:
            reach("on_validation_batch_start")

    def on_test_batch_start(self, *args) -> None:
        reach("on_test_batch_start")
