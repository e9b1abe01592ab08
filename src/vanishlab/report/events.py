"""A job's scalars read straight from its TensorBoard event files: the loss and sharpness
figures draw them."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event, SessionLog

LOSS_TAGS = ("train/loss", "val/loss")
EVENT_FILES = "events.out.tfevents.*"


def logged(job_dir: Path) -> bool:
    """Whether the job has written TensorBoard events."""
    return any(job_dir.glob(EVENT_FILES))


def scalar_curves(job_dir: Path, tags: Iterable[str]) -> dict[str, tuple[list[int], list[float]]]:
    """The job's scalars `tags` as (steps, values), read straight from its TensorBoard event files.

    Each file is a run of records: the length (8 bytes), its CRC (4), an `Event`, its CRC (4).
    The CRCs are not checked: without TensorFlow, tensorboard's `EventAccumulator` checks them in
    pure Python at about 3 MB/s, minutes for a real sweep whose events hold histograms and images.
    A record cut short (the job is still writing) ends the file. A session that starts at step s
    (a job that trained on from its checkpoint: `purge_step`) drops what came before it from
    step s on, as TensorBoard does: a killed attempt's values there were trained again.
    """
    tags = set(tags)
    points: dict[str, dict[int, float]] = {}
    for path in sorted(job_dir.glob(EVENT_FILES)):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            if pos + 16 + length > len(data):
                break
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 16 + length
            if event.session_log.status == SessionLog.START:
                for curve in points.values():
                    for step in [step for step in curve if step >= event.step]:
                        del curve[step]
            for value in event.summary.value:  # Lightning logs scalars as `simple_value`
                if value.tag in tags and value.WhichOneof("value") == "simple_value":
                    points.setdefault(value.tag, {})[event.step] = value.simple_value
    return {tag: (list(curve), list(curve.values())) for tag, curve in points.items()}
