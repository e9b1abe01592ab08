"""Checkpoints: written atomically, read as data only, and never in a job's way.

Lightning's own checkpoint plugin writes its temporary file in the system's temp directory and
then copies it across file systems, which a full disk cuts short: a truncated `last.ckpt` that
every later run failed to read. `AtomicCheckpointIO` writes beside the target instead
(`storage.write_atomically`). A checkpoint that does not read is set aside, and the job trains
on from its newest readable one (`newest_readable_checkpoint`), or from scratch.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins import TorchCheckpointIO

from vanishlab import ConfigError
from vanishlab.storage import set_aside, write_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin with `write_atomically` (module docstring)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        write_atomically(Path(path), lambda file: torch.save(checkpoint, file))


class UnreadableCheckpoint(ConfigError):
    """A checkpoint that does not read as data only: `reason` says what went wrong."""

    def __init__(self, path: Path, err: Exception) -> None:
        lines = str(err).strip().splitlines()
        # torch's first sentence only: its next ones suggest weights_only=False, which runs code.
        self.reason = f"{type(err).__name__}: {lines[0].split('. ')[0] if lines else 'no detail'}"
        super().__init__(
            f"ckpt_path={str(path)!r} cannot be read as a checkpoint ({self.reason}); it was not "
            f"loaded further, as it may hold code. Fix: pass a whole checkpoint that a vanishlab "
            f"run wrote (<run>/checkpoints/last.ckpt)."
        )


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, read as data only (`weights_only`: tensors and plain containers,
    never pickled objects, so a checkpoint from elsewhere runs no code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UnreadableCheckpoint(path, err) from None


def newest_readable_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `directory` that reads, with its contents; each unreadable one
    newer than it is set aside."""
    for path in sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return path, read_checkpoint(path)
        except UnreadableCheckpoint as err:
            set_aside(path, err.reason)
    return None


def eval_command(ckpt_path: Path) -> str:
    """The command that evaluates `ckpt_path`, quoted to paste into a shell as it is: the path
    in quotes for Hydra's parser (a sweep job's directory holds `=` and `,`), the whole
    override in quotes for the shell."""
    path = ckpt_path.absolute()
    path = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    quote = "'" if '"' in str(path) else '"'
    return f"python -m vanishlab.eval {shlex.quote(f'ckpt_path={quote}{path}{quote}')}"


def logging_step(checkpoint: dict[str, Any]) -> int:
    """The step at which a trainer restored from `checkpoint` logs again: Lightning's count of
    batches that stepped, from its fit loop's state. It is the checkpoint's `global_step` but for
    a stacked job that stopped early, whose loops are its stack's."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return loop.get("_batches_that_stepped", checkpoint["global_step"])
