"""vanishlab: sweeps of MNIST classifiers that show why deep networks fail to train."""

import logging
import sys
import warnings
from typing import NoReturn

# The console shows what the user needs: not Lightning's advertisements for its cloud services,
# nor a deprecation inside Lightning that its users cannot act on, nor its hint to run under
# `srun` (submitit already starts each job of a SLURM sweep with srun). Set here, on the first
# import of any vanishlab module, so that it holds in a launcher's worker processes too.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda record: "💡 Tip:" not in record.getMessage()
)
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system")


class ConfigError(ValueError):
    """A bad setting, reported as one paragraph (key, value, fix) before any training starts."""


def exit_with(err: ConfigError) -> NoReturn:
    """End a command on a bad setting: the paragraph on stderr, exit code 2, no traceback."""
    print(f"\nError: {err}\n", file=sys.stderr)
    raise SystemExit(2)
