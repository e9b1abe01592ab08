"""`make bench`'s GPU mode runs as is where there is no GPU, and says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parents[1] / "bench" / "run.py"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback: a GPU runs the real one")
def test_the_gpu_mode_falls_back_to_the_cpu_and_says_the_gpu_figure_is_unmeasured(
    tiny_data,
) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--gpu", "2", "8", "data.val_size=100", "data.batch_size=50"],
        env={**os.environ, "DATA_DIR": str(tiny_data)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no CUDA device: GPU figure unmeasured" in result.stdout
    rates = next(line for line in result.stdout.splitlines() if "job-steps per second" in line)
    assert "a fused stack of 2" in rates, rates
