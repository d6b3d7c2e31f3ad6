"""Model size and eval loss: fp32 vs quantization-aware training vs post-training int8.

One small GPT-2 (workload.py) trained by `%%bigtrain` in a real kernel, the same seed and
steps each time: once in fp32, once with `--qat int8` and once with `--qat int4` (converted
at the end of the run); the fp32 model is then quantized in the kernel with `nbtrain.quantize`
(int8 weight-only and int8 dynamic). Every model is evaluated in the kernel on the same 256
sequences; size is `torch.save(model.state_dict())` on disk. Prints a table.
Usage: benchmarks/quantization.py [--steps N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.kernel import Kernel  # noqa: E402 - the same real-kernel driver the tests use

SETUP = f"""import sys, json, torch, nbtrain
sys.path.insert(0, {str(HERE)!r})
from workload import TokenData, make_model
from nbtrain.quantization import size_on_disk
%load_ext nbtrain
held_out = TokenData(n=256)[:]
def eval_loss(model):
    with torch.no_grad():
        return model(**held_out).loss.item()
def figures(model):
    return {{"size_mib": size_on_disk(model) / 2**20, "eval_loss": eval_loss(model)}}
"""
TRAIN = """%%bigtrain --nproc 2 --zero 2 --micro-batch 8 --lr 3e-3 --steps {steps} --no-plot {flags} --out {name}
{name} = bigtrain.fit(make_model(), TokenData())"""
PTQ = """report = nbtrain.quantize(fp32.model, {mode!r}, eval_fn=eval_loss)
print(json.dumps({{"size_mib": report.size_after / 2**20, "eval_loss": report.eval_after}}))"""


def main(steps: int) -> None:
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        kernel = Kernel(Path(tmp))
        try:
            kernel.execute(SETUP)
            for name, flags in (("fp32", ""), ("qat8", "--qat int8"), ("qat4", "--qat int4")):
                kernel.execute(TRAIN.format(steps=steps, flags=flags, name=name))
                out = kernel.execute(f"print(json.dumps(figures({name}.model)))")
                rows[{"fp32": "fp32", "qat8": "QAT int8 (--qat int8)", "qat4": "QAT int4 (--qat int4)"}[name]] = \
                    json.loads(out.text.strip().splitlines()[-1])
            for mode in ("int8_weight_only", "int8_dynamic"):
                out = kernel.execute(PTQ.format(mode=mode))
                rows[f"PTQ {mode}"] = json.loads(out.text.strip().splitlines()[-1])
        finally:
            kernel.shutdown()
    base = rows["fp32"]
    print(f"small GPT-2 (workload.py), {steps} steps ZeRO-2 on 2 processes; eval on 256 held-out sequences")
    print(f"{'model':<24} {'size MiB':>9} {'x fp32':>7} {'eval loss':>10} {'vs fp32':>8}")
    for name, row in rows.items():
        print(f"{name:<24} {row['size_mib']:>9.3f} {row['size_mib'] / base['size_mib']:>7.2f} "
              f"{row['eval_loss']:>10.4f} {row['eval_loss'] - base['eval_loss']:>+8.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    main(parser.parse_args().steps)
