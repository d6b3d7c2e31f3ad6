"""Build DeepSpeed's CPU ops once, in one process (`python -m nbtrain.launch.ops`).

The first run on a machine JIT-compiles the ops; two ranks compiling the same op at once
can fail. Building them here first (set-up does) makes the first run as fast as the next.
"""

from __future__ import annotations


def build_cpu_ops() -> list[str]:
    """Load (building if needed) the ops a CPU run uses; return their names."""
    import ctypes.util

    from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, FusedAdamBuilder, ShareMemCommBuilder

    builders = [ShareMemCommBuilder(), CPUAdamBuilder(), FusedAdamBuilder()]
    if ctypes.util.find_library("aio"):  # NVMe offload's op needs libaio
        from deepspeed.ops.op_builder.cpu import AsyncIOBuilder

        builders.append(AsyncIOBuilder())
    built = []
    for builder in builders:
        builder.load(verbose=False)
        built.append(builder.name)
    return built


if __name__ == "__main__":
    import logging
    import os

    from nbtrain.launch.launcher import ops_cache_dir

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", ops_cache_dir())  # where the workers look

    logging.disable(logging.WARNING)
    print("DeepSpeed CPU ops ready:", ", ".join(build_cpu_ops()))
