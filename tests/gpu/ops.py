"""Build DeepSpeed's CUDA ops once, in one process, before the GPU tests (`python -m tests.gpu.ops`).

What `nbtrain.launch.ops` does for the CPU ops: the first run on a machine JIT-compiles the ops it
uses, and two ranks compiling one op at once can fail; a build inside a test would also count
against its time (on an H100: fused_adam ~25 s, cpu_adam ~35 s, the ZeRO++ quantizer ~70 s).
TORCH_EXTENSIONS_DIR and TORCH_CUDA_ARCH_LIST come from the caller (`.ci/gpu-kit test`).
"""

from __future__ import annotations

import time

# AdamW on the GPU (every run without optimizer offload), and on the CPU (--offload-optimizer cpu).
OPS = ("FusedAdamBuilder", "CPUAdamBuilder")
# ZeRO++ qwZ/qgZ: only the tests that need 2 GPUs use it.
MULTI_GPU_OPS = ("QuantizerBuilder",)


def build_gpu_ops(gpus: int) -> list[tuple[str, float]]:
    """Load (building if needed) the CUDA ops the GPU tests use; return (op, seconds) of each."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    names = OPS + (MULTI_GPU_OPS if gpus >= 2 else ())
    built = []
    for name in names:
        began = time.monotonic()
        builder = accelerator.create_op_builder(name)
        builder.load(verbose=False)
        built.append((builder.name, time.monotonic() - began))
    return built


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("DeepSpeed's CUDA ops: not built (no CUDA GPU here; the gpu tests skip)")
        return 0
    import logging
    import os

    from nbtrain.launch.launcher import ops_cache_dir

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", ops_cache_dir())  # where the workers look
    logging.disable(logging.WARNING)
    print(f"building DeepSpeed's CUDA ops for {torch.cuda.get_device_name(0)} "
          f"(TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'all')}) in "
          f"{os.environ['TORCH_EXTENSIONS_DIR']}", flush=True)
    for name, seconds in build_gpu_ops(torch.cuda.device_count()):
        print(f"  {name}: ready in {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
