"""What the machine can run: GPU count through NVML, honouring CUDA_VISIBLE_DEVICES.

No GPU exists here: "with GPUs" uses tests/fakes/pynvml.py, a stand-in that behaves like
nvidia-ml-py (the one fake the project allows, for what cannot exist on this machine).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nbtrain.config.machine import MachineFacts, count_gpus, detect_machine
from tests.nvml import use_fake_nvml


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import pynvml` find the fake NVML with four GPUs."""
    use_fake_nvml(monkeypatch, gpus=4)


@pytest.mark.skipif(Path("/proc/driver/nvidia").exists(), reason="a real NVIDIA driver is loaded here")
def test_no_driver_means_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real nvidia-ml-py on this machine: nvmlInit fails without a driver; that is a normal state.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert count_gpus() == 0
    facts = detect_machine()
    assert (facts.gpu_count, facts.cuda) == (0, False)


def test_a_driver_that_fails_to_load_means_no_gpu(four_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVML_DRIVER", "missing")
    assert count_gpus() == 0


def test_every_gpu_counts_when_nothing_is_hidden(four_gpus: None) -> None:
    assert count_gpus() == 4


@pytest.mark.parametrize(("visible", "count"), [
    ("0,1", 2),
    ("3", 1),
    (" 2 , 0 ", 2),
    ("GPU-8f6c2a0e,GPU-1b2c3d4e", 2),
    ("", 0),
    ("-1", 0),
    ("0,1,2,3,4,5", 4),  # more entries than GPUs
    ("0,7,1", 1),  # CUDA stops at the first invalid index
    ("5", 0),
])
def test_cuda_visible_devices_is_honoured(four_gpus: None, monkeypatch: pytest.MonkeyPatch, visible: str,
                                          count: int) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert count_gpus() == count


def test_counting_does_not_import_torch() -> None:
    code = "import sys; from nbtrain.config.machine import detect_machine; detect_machine(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "asking about GPUs must not import torch (or touch CUDA) in the kernel"


def test_machine_facts() -> None:
    assert MachineFacts().cuda is False and MachineFacts().has_libaio is True
    assert MachineFacts(gpu_count=2).cuda is True


def test_the_facts_keep_cuda_visible_devices_for_messages_and_the_run_directory(
        four_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    facts = detect_machine()
    assert facts.shown() == "this machine shows 2 GPUs (CUDA_VISIBLE_DEVICES=1,3)"
    assert facts.as_record() == {"gpu_count": 2, "cuda_visible_devices": "1,3"}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert detect_machine().shown() == "this machine shows 4 GPUs"
