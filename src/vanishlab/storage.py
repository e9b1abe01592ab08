"""How vanishlab keeps its files, so that no fault loses or blocks a result.

- Every file is written atomically (`write_atomically`): into a temporary file *beside* its
  target, flushed to the disk, then renamed over it. A kill or a full disk leaves the old file
  or the new one, never half of one (checkpoints too: `vanishlab.checkpoints`).
- A file that cannot be read (damaged on disk, or written before this rule) is set aside under
  a new name (`set_aside`) and the log names it; it never blocks the job that owns it.
- A full disk ends the command with one paragraph (`DiskFull`): jobs that were running keep
  their `started` records and train on when the same command runs again.
- One command at a time sweeps into a directory (`SweepLock`, a lock of the `filelock` library,
  which the system drops when its process dies).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from filelock import FileLock, Timeout

from vanishlab import ConfigError

log = logging.getLogger(__name__)

# A command refuses to start with less than this free where it writes: a run's first files
# (configs, logs, records, one checkpoint of a small network) fit in it.
MIN_FREE_BYTES = 16 * 2**20


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """`write(file)` into a temporary file beside `path`, flushed to the disk, then renamed to
    `path`. The temporary name is unique, so two processes never write into each other's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_aside(path: Path, why: str) -> Path:
    """Rename an unreadable file to `<name>.corrupt` (`.corrupt-2`, ... if taken), so it is
    kept but no longer in the way, and say so in the log."""
    target = path.with_name(f"{path.name}.corrupt")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{n}")
    os.replace(path, target)
    log.warning("%s cannot be read (%s); set aside as %s", path, why, target.name)
    return target


def is_disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, is the disk (or the user's quota) full."""
    seen = set()  # a chain can loop: an error re-raised while its wrapper was handled
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def report_disk_full_in_threads() -> None:
    """A writer thread that meets a full disk (TensorBoard's event writer) logs one line
    instead of printing a traceback: the command itself ends with the `DiskFull` paragraph."""
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and is_disk_full(args.exc_value):
            log.error("%s could not write: the disk is full (%s)", args.thread, args.exc_value)
        else:
            default(args)

    threading.excepthook = hook


class DiskFull(ConfigError):
    """The disk a command writes to is full: what is kept, what to do."""

    def __init__(self, where: Path) -> None:
        free = shutil.disk_usage(existing(where)).free
        super().__init__(
            f"the disk that holds {where} is full ({free / 2**20:.1f} MiB free; vanishlab "
            f"needs at least {MIN_FREE_BYTES / 2**20:.0f} MiB to start). Every finished record "
            f"is kept as it is; a job that was running keeps its `started` record and trains "
            f"on from its last checkpoint. Fix: free space on that disk (or write elsewhere: "
            f"paths.log_dir=<dir>, or hydra.sweep.dir=<dir>), then run the same command again."
        )


def existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (a directory not made yet)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_free_space(where: Path) -> None:
    """Raise `DiskFull` before a command writes anything, when `where` has too little room."""
    if shutil.disk_usage(existing(where)).free < MIN_FREE_BYTES:
        raise DiskFull(where)


class SweepLock:
    """The lock one command holds on a sweep directory while it sweeps into it. A second
    command is refused with the holder's process id, host and command line; a lock whose
    process died is free (the system releases it), so the next command takes it over."""

    def __init__(self, sweep_dir: Path) -> None:
        self.sweep_dir = sweep_dir
        self.lock = FileLock(sweep_dir / ".sweep.lock", timeout=0)
        self.owner = sweep_dir / ".sweep.lock.owner"

    def acquire(self) -> None:
        try:
            self.lock.acquire()
        except Timeout:
            raise ConfigError(
                f"another command is sweeping into hydra.sweep.dir={str(self.sweep_dir)!r} "
                f"({self.holder()}); two commands in one sweep would train the same jobs twice. "
                f"Fix: wait until it ends (its jobs' records will be there), or give this "
                f"command a new hydra.sweep.dir."
            ) from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": sys.argv}
        write_atomically(self.owner, lambda file: file.write(json.dumps(owner).encode()))

    def holder(self) -> str:
        try:
            owner = json.loads(self.owner.read_text())
        except (OSError, ValueError):
            return "its process id is not known"
        command = " ".join(owner.get("command", []))
        return f"process {owner.get('pid')} on {owner.get('host')}: {command}"

    def release(self) -> None:
        self.lock.release()

    def __getstate__(self) -> dict[str, Path]:
        """Pickled (a SLURM launcher sends Hydra's callbacks to its jobs) as a lock not held:
        only the process that acquired it holds it."""
        return {"sweep_dir": self.sweep_dir}

    def __setstate__(self, state: dict[str, Path]) -> None:
        self.__init__(state["sweep_dir"])
