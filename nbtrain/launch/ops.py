"""DeepSpeed's CPU ops: build them once, in one process (`python -m nbtrain.launch.ops`), and
ask py-cpuinfo once per machine for the flags they are loaded with.

The first run on a machine JIT-compiles the ops; two ranks compiling the same op at once
can fail. Building them here first (set-up does) makes the first run as fast as the next.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any

from nbtrain.rundir import read_json, write_json_atomic


def build_cpu_ops(nvme: bool = True) -> list[str]:
    """Load (building if needed) the ops a CPU run uses, NVMe offload's too unless not `nvme`; return their names."""
    import ctypes.util

    from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, FusedAdamBuilder, ShareMemCommBuilder

    builders = [ShareMemCommBuilder(), CPUAdamBuilder(), FusedAdamBuilder()]
    if nvme and ctypes.util.find_library("aio"):  # NVMe offload's op needs libaio
        from deepspeed.ops.op_builder.cpu import AsyncIOBuilder

        builders.append(AsyncIOBuilder())
    built = []
    for builder in builders:
        builder.load(verbose=False)
        built.append(builder.name)
    return built


def ask_cpuinfo_once(cache_dir: str) -> None:
    """Make `cpuinfo.get_cpu_info()` answer from a per-boot file in `cache_dir` after its first real probe.

    DeepSpeed asks py-cpuinfo for the CPU's arch and SIMD flags every time it loads a CPU op
    (the compiler flags decide whether a cached build still fits, so even a cached op asks),
    and for the vendor when it makes a CPU Adam. Each call starts a Python subprocess that
    probes the CPU: about 1 s of CPU and of wall time, 2-3 times per rank and run. The CPU
    does not change until the machine reboots, so the first answer on a host is kept, keyed
    by host name and boot id, next to the ops whose flags it decides. Only `hz_actual` (the
    clock at the probe) can be stale; DeepSpeed does not read it.
    """
    import cpuinfo

    if getattr(cpuinfo.get_cpu_info, "_nbtrain_once", False):
        return
    probe = cpuinfo.get_cpu_info
    path = _cpuinfo_file(cache_dir)

    @functools.cache
    def answer() -> dict[str, Any]:
        known = read_json(path) if path is not None else None
        if isinstance(known, dict):
            return known
        info = probe()  # not probed on this boot yet, or the file is torn
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(path, info)  # ranks of one host may write it at once
            except OSError:
                pass  # a cache that cannot be written: every process then probes once for itself
        return info

    @functools.wraps(probe)
    def get_cpu_info() -> dict[str, Any]:
        return dict(answer())  # a copy: a caller may change what it got

    get_cpu_info._nbtrain_once = True  # type: ignore[attr-defined]
    cpuinfo.get_cpu_info = get_cpu_info


def _cpuinfo_file(cache_dir: str) -> Path | None:
    """Return the file for this host and boot, or None where the boot has no id (not Linux)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return Path(cache_dir) / "cpuinfo" / f"{socket.gethostname()}-{boot_id}.json"


if __name__ == "__main__":
    import argparse
    import logging

    from nbtrain.launch.launcher import ops_cache_dir

    parser = argparse.ArgumentParser(prog="python -m nbtrain.launch.ops", description="Build DeepSpeed's CPU ops once, in one process.")
    parser.add_argument("--without-nvme", action="store_true",
                        help="skip NVMe offload's op (async_io, the longest build; built on first use then)")
    args = parser.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", ops_cache_dir())  # where the workers look
    ask_cpuinfo_once(os.environ["TORCH_EXTENSIONS_DIR"])
    logging.disable(logging.WARNING)
    print("DeepSpeed CPU ops ready:", ", ".join(build_cpu_ops(nvme=not args.without_nvme)))
