"""%%bigtrain against the plain way (a DeepSpeed script under torchrun), alternating, same run.

Both sides train the same small GPT-2 on the same data with the same DeepSpeed JSON and
the same threads (OMP_NUM_THREADS=1 per process, torchrun's default for 2 processes),
and must reach the same losses — the proof that both did the same work. Measured:
- throughput: median optimizer-step time after warm-up (ratio = plain / ours; goal >= 0.98);
- first step: seconds from the start (the cell's execute request; the torchrun command)
  to the first completed optimizer step, no worker existing before (ratio = ours / plain;
  goal <= 1.0).
Prints a table and `BENCH <figure> <ratio>` lines. Usage: benchmarks/launch_overhead.py [--reps N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from nbtrain.launcher import ops_cache_dir  # noqa: E402
from tests.kernel import Kernel  # noqa: E402 - the same real-kernel driver the tests use

STEPS = 60
WARMUP_STEPS = 10
FLAGS = f"--nproc 2 --zero 2 --micro-batch 8 --lr 3e-3 --steps {STEPS}"
SETUP = f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom workload import TokenData, make_model\n%load_ext nbtrain"
CELL = "bigtrain.fit(make_model(), TokenData())"


def run_plain(config: dict, workdir: Path) -> dict:
    """Run the plain script under torchrun; return step times (from the command's start) and losses."""
    (workdir / "ds.json").write_text(json.dumps(config))
    out = workdir / "plain.json"
    # The same prebuilt DeepSpeed ops as nbtrain's workers use, so neither side compiles.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE), "TORCH_EXTENSIONS_DIR": ops_cache_dir()}
    began = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(HERE / "plain_deepspeed.py"), str(workdir / "ds.json"), str(STEPS), str(out)],
                            env=env, cwd=workdir, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if proc.wait(timeout=600) != 0:
            raise RuntimeError("the plain DeepSpeed script failed")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    result = json.loads(out.read_text())
    return {"times": [t - began for t in result["step_times"]], "losses": result["losses"]}


def run_ours(kernel: Kernel, workdir: Path) -> dict:
    """Run the %%bigtrain cell; return step times (from the execute request) and losses."""
    before = set((workdir / "bigtrain-runs").glob("*")) if (workdir / "bigtrain-runs").exists() else set()
    execution = kernel.execute(f"%%bigtrain {FLAGS}\n{CELL}")
    (run,) = set((workdir / "bigtrain-runs").glob("*")) - before
    records = [json.loads(line) for line in (run / "metrics" / "rank-0.jsonl").read_text().splitlines()]
    steps: dict[int, dict] = {}
    for record in records:
        steps.setdefault(record["step"], {}).update(record)
    ordered = [steps[s] for s in sorted(steps)]
    config = json.loads((run / "deepspeed.effective.json").read_text())["config"]
    return {"times": [r["time"] - execution.started for r in ordered if "lr" in r],
            "losses": [r["loss"] for r in ordered if "loss" in r], "config": config}


def steady_step_s(times: list[float]) -> float:
    gaps = [b - a for a, b in zip(times[WARMUP_STEPS:], times[WARMUP_STEPS + 1:], strict=False)]
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    reps = parser.parse_args().reps
    workdir = Path(tempfile.mkdtemp(prefix="nbtrain-bench-"))
    kernel = Kernel(workdir)
    try:
        kernel.execute(SETUP)
        rows = []
        config = None
        for rep in range(reps):
            ours = run_ours(kernel, workdir)
            config = config or ours["config"]
            plain = run_plain(config, workdir)
            worst = max(abs(a - b) for a, b in zip(ours["losses"], plain["losses"], strict=True))
            rows.append({"rep": rep, "ours_first": ours["times"][0], "plain_first": plain["times"][0],
                         "ours_step": steady_step_s(ours["times"]), "plain_step": steady_step_s(plain["times"]),
                         "loss_diff": worst, "final_loss": ours["losses"][-1]})
            print(f"rep {rep}: first step {rows[-1]['ours_first']:.2f} s (ours) vs {rows[-1]['plain_first']:.2f} s "
                  f"(torchrun); step {rows[-1]['ours_step'] * 1e3:.1f} ms vs {rows[-1]['plain_step'] * 1e3:.1f} ms; "
                  f"max loss difference {worst:.2e}", flush=True)
    finally:
        kernel.shutdown()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "rep"}
    print()
    print(f"{'figure':<34}{'%%bigtrain':>12}{'torchrun':>12}{'ratio':>8}")
    print(f"{'time to first step (s, median)':<34}{med['ours_first']:>12.2f}{med['plain_first']:>12.2f}"
          f"{med['ours_first'] / med['plain_first']:>8.3f}")
    print(f"{'steady step time (ms, median)':<34}{med['ours_step'] * 1e3:>12.2f}{med['plain_step'] * 1e3:>12.2f}"
          f"{med['plain_step'] / med['ours_step']:>8.3f}")
    print(f"largest loss difference over {reps} reps x {STEPS} steps: {max(r['loss_diff'] for r in rows):.2e} "
          f"(final loss {med['final_loss']:.4f})")
    print(f"BENCH throughput {med['plain_step'] / med['ours_step']:.3f}")
    print(f"BENCH first_step {med['ours_first'] / med['plain_first']:.3f}")


if __name__ == "__main__":
    main()
