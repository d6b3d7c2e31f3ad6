"""Helpers of the GPU tests (`make test-gpu`): DeepSpeed's CUDA ops built up front, nvidia-smi's view,
and the figures the tests measure."""

from __future__ import annotations

import os

FIGURES_ENV = "NBTRAIN_GPU_FIGURES"


def report(line: str) -> None:
    """Print a measured figure, and keep it for the closing table of `.ci/gpu-kit test` ($NBTRAIN_GPU_FIGURES)."""
    print(line)
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
