"""DeepSpeed's CPU ops ask py-cpuinfo for their compiler flags: once per machine boot, not per rank and run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import cpuinfo
import pytest

from nbtrain.launch.ops import ask_cpuinfo_once

# In a fresh process: count py-cpuinfo's probes (`python .../cpuinfo.py --json`) while DeepSpeed
# works out a CPU op's flags. (Importing cpuinfo also runs `file` and `uname`: milliseconds.)
FLAGS_AND_PROBES = """
import json, sys
probes = []
def count(event, args):
    if event == "subprocess.Popen" and any(str(a).endswith("cpuinfo.py") for a in args[1]):
        probes.append(args[1])
sys.addaudithook(count)
if sys.argv[1] != "-":
    from nbtrain.launch.ops import ask_cpuinfo_once
    ask_cpuinfo_once(sys.argv[1])
from deepspeed.ops.op_builder.cpu import CPUAdamBuilder
flags = CPUAdamBuilder().cxx_args()
print(json.dumps({"flags": flags, "probes": len(probes)}))
"""


def flags_and_probes(cache: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", FLAGS_AND_PROBES, cache], check=True, stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.integration
def test_a_rank_on_a_machine_already_probed_starts_no_probe_and_gets_the_same_flags(tmp_path: Path) -> None:
    plain = flags_and_probes("-")
    assert plain["probes"] >= 2, f"DeepSpeed no longer probes per flag ({plain}): is the cache still worth it?"
    first = flags_and_probes(str(tmp_path))
    assert first["probes"] == 1, f"the first rank on this boot probes once, not per flag: {first}"
    later = flags_and_probes(str(tmp_path))
    assert later == {"flags": plain["flags"], "probes": 0}, f"a later rank probed again or got other flags: {later}"


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Stand in for py-cpuinfo's probe (a subprocess, ~1 s): count the calls; restore it after the test."""
    calls: list[int] = []

    def get_cpu_info() -> dict[str, Any]:
        calls.append(1)
        return {"arch": "X86_64", "flags": ["avx2"], "vendor_id_raw": "GenuineIntel"}

    monkeypatch.setattr(cpuinfo, "get_cpu_info", get_cpu_info)
    return calls


def cache_file(cache: Path) -> Path:
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return cache / "cpuinfo" / f"{socket.gethostname()}-{boot}.json"


def test_one_process_probes_once_and_each_caller_gets_its_own_copy(tmp_path: Path, probe: list[int]) -> None:
    ask_cpuinfo_once(str(tmp_path))
    ask_cpuinfo_once(str(tmp_path))  # a second install keeps the first
    first = cpuinfo.get_cpu_info()
    first["flags"] = []
    assert cpuinfo.get_cpu_info()["flags"] == ["avx2"], "a caller's change leaked to the next caller"
    assert len(probe) == 1
    assert json.loads(cache_file(tmp_path).read_text())["vendor_id_raw"] == "GenuineIntel"
    assert [p.name for p in cache_file(tmp_path).parent.iterdir()] == [cache_file(tmp_path).name], "a temp file was left"


def test_a_torn_cache_file_is_probed_again_and_rewritten(tmp_path: Path, probe: list[int]) -> None:
    cache_file(tmp_path).parent.mkdir(parents=True)
    cache_file(tmp_path).write_text('{"arch": "X86')
    ask_cpuinfo_once(str(tmp_path))
    assert cpuinfo.get_cpu_info()["arch"] == "X86_64" and len(probe) == 1
    assert json.loads(cache_file(tmp_path).read_text())["arch"] == "X86_64"


def test_an_unwritable_cache_still_answers_probing_once_per_process(tmp_path: Path, probe: list[int]) -> None:
    (tmp_path / "cpuinfo").write_text("a file where the folder should be")
    ask_cpuinfo_once(str(tmp_path))
    assert cpuinfo.get_cpu_info()["arch"] == cpuinfo.get_cpu_info()["arch"] == "X86_64"
    assert len(probe) == 1
