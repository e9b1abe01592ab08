"""vanishlab: sweeps of MNIST classifiers that show why deep networks fail to train."""

import sys
from typing import NoReturn


class ConfigError(ValueError):
    """A bad setting, reported as one paragraph (key, value, fix) before any training starts."""


def exit_with(err: ConfigError) -> NoReturn:
    """End a command on a bad setting: the paragraph on stderr, exit code 2, no traceback."""
    print(f"\nError: {err}\n", file=sys.stderr)
    raise SystemExit(2)
