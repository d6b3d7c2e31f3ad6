"""The fake NVML of tests/fakes/pynvml.py, for tests that need "a machine with GPUs" on this CPU machine.

In this process: `use_fake_nvml(monkeypatch, gpus=1)` makes `import pynvml` give a fresh copy of
the fake. In a kernel or worker started by the test: `fake_nvml_environment(gpus=1)` puts the
fake first on PYTHONPATH (the launcher hands the kernel's sys.path down to the workers).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

FAKES = Path(__file__).parent / "fakes"
_SETTINGS = ("FAKE_NVML_GPUS", "FAKE_NVML_NAME", "FAKE_NVML_DRIVER", "FAKE_NVML_POWER", "FAKE_NVML_PROCESSES",
             "FAKE_NVML_PROCESSES_FILE", "CUDA_VISIBLE_DEVICES")


def use_fake_nvml(monkeypatch: pytest.MonkeyPatch, gpus: int = 2, **settings: str) -> ModuleType:
    """Make `import pynvml` give a fresh fake (it keeps init state like the real one) showing `gpus` GPUs.

    `settings` are its other FAKE_NVML_* variables (and CUDA_VISIBLE_DEVICES); the rest are unset.
    """
    spec = importlib.util.spec_from_file_location("pynvml", FAKES / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pynvml", module)  # before running it: its dataclasses look it up
    spec.loader.exec_module(module)
    for name in _SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FAKE_NVML_GPUS", str(gpus))
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return module


def fake_nvml_environment(gpus: int, **settings: str) -> dict[str, str]:
    """Return this process's environment with the fake NVML first on PYTHONPATH, showing `gpus` GPUs."""
    env = {k: v for k, v in os.environ.items() if k not in _SETTINGS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAKES), os.environ.get("PYTHONPATH", "")]))
    env.update(FAKE_NVML_GPUS=str(gpus), **settings)
    return env
