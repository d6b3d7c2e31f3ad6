"""One host x 2 processes against 2 hosts x 1 process, the same GPT-2 run, alternating (needs root).

The hosts are network namespaces on this machine (tests/netns.py) that do not share the
run directory with the head, so every record crosses a relay. Same total processes, same
model, data and DeepSpeed JSON as `launch_overhead.py`; both must reach the same losses.
Prints first-step and steady-step medians and `BENCH multinode_<figure> <ratio>` lines
(ratio = one host / two hosts: what spreading over hosts costs here). Usage:
benchmarks/multinode.py [--reps N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from launch_overhead import SETUP, STEPS, run_ours, steady_step_s  # noqa: E402

from tests.kernel import Kernel  # noqa: E402
from tests.netns import INTERFACE, cluster  # noqa: E402

FLAGS = f"--zero 2 --micro-batch 8 --lr 3e-3 --steps {STEPS} --no-plot"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    reps = parser.parse_args().reps
    workdir = Path(tempfile.mkdtemp(prefix="nbtrain-bench-multinode-"))
    runs = workdir / "bigtrain-runs"
    runs.mkdir()
    (workdir / ".deepspeed_env").write_text(f"GLOO_SOCKET_IFNAME={INTERFACE}\n")
    rows = []
    with cluster(2, private_dirs=[runs]) as c:
        kernel = Kernel(workdir, env=c.env)
        try:
            kernel.execute(SETUP)
            for rep in range(reps):
                one = run_ours(kernel, workdir, cold=True, flags=f"--nproc 2 {FLAGS}")
                two = run_ours(kernel, workdir, cold=True, flags=f"--hosts node0,node1 --nproc 1 {FLAGS}")
                worst = max(abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True))
                rows.append({"one_first": one["times"][0], "two_first": two["times"][0],
                             "one_step": steady_step_s(one["times"]), "two_step": steady_step_s(two["times"]),
                             "loss_diff": worst})
                print(f"rep {rep}: first step {rows[-1]['one_first']:.2f} s (1 host x 2) vs "
                      f"{rows[-1]['two_first']:.2f} s (2 hosts x 1); step {rows[-1]['one_step'] * 1e3:.1f} ms vs "
                      f"{rows[-1]['two_step'] * 1e3:.1f} ms; max loss difference {worst:.2e}", flush=True)
        finally:
            kernel.shutdown()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"\n{'figure':<34}{'1 host x 2':>12}{'2 hosts x 1':>13}{'ratio':>8}")
    print(f"{'time to first step (s, median)':<34}{med['one_first']:>12.2f}{med['two_first']:>13.2f}"
          f"{med['one_first'] / med['two_first']:>8.3f}")
    print(f"{'steady step time (ms, median)':<34}{med['one_step'] * 1e3:>12.2f}{med['two_step'] * 1e3:>13.2f}"
          f"{med['one_step'] / med['two_step']:>8.3f}")
    print(f"largest loss difference: {max(r['loss_diff'] for r in rows):.2e}")
    print(f"BENCH multinode_first_step {med['one_first'] / med['two_first']:.3f}")
    print(f"BENCH multinode_throughput {med['one_step'] / med['two_step']:.3f}")


if __name__ == "__main__":
    main()
