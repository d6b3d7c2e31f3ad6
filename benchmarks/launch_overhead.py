"""%%bigtrain against the plain way (a DeepSpeed script under torchrun), alternating, same run.

Both sides train the same small GPT-2 on the same data with the same DeepSpeed JSON and
the same threads (OMP_NUM_THREADS=1 per process, torchrun's default for 2 processes),
and must reach the same losses — the proof that both did the same work. Measured:
- throughput: median optimizer-step time after warm-up (ratio = plain / ours; goal >= 0.98);
- first step: seconds from the start (the cell's execute request; the torchrun command)
  to the first completed optimizer step, no worker existing before (ratio = ours / plain;
  goal <= 1.0);
- warm first step: the same cell run again at once, in the warm workers the first run left
  (goal under 1 s, and warm / plain below 0.15), and the idle memory of a warm worker.
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


def run_ours(kernel: Kernel, workdir: Path, cold: bool, flags: str = FLAGS) -> dict:
    """Run the %%bigtrain cell; return step times (from the execute request) and losses.

    `cold`: no worker exists before (the warm ones of the last run are ended first, untimed).
    """
    if cold:
        kernel.execute("%bigtrain shutdown")
    before = set((workdir / "bigtrain-runs").glob("*")) if (workdir / "bigtrain-runs").exists() else set()
    execution = kernel.execute(f"%%bigtrain {flags}\n{CELL}", timeout=600)
    (run,) = set((workdir / "bigtrain-runs").glob("*")) - before
    records = [json.loads(line) for line in (run / "metrics" / "rank-0.jsonl").read_text().splitlines()]
    steps: dict[int, dict] = {}
    for record in records:
        steps.setdefault(record["step"], {}).update(record)
    ordered = [steps[s] for s in sorted(steps)]
    config = json.loads((run / "deepspeed.effective.json").read_text())["config"]
    warm = json.loads((run / "status.json").read_text())["workers"]["warm"]
    assert warm != cold, f"expected {'fresh' if cold else 'warm'} workers"
    return {"times": [r["time"] - execution.started for r in ordered if "lr" in r],
            "losses": [r["loss"] for r in ordered if "loss" in r], "config": config}


def idle_worker_mib(kernel: Kernel) -> list[float]:
    """Return the memory (RSS, MiB) of each idle warm worker, a moment after its run."""
    time.sleep(2)  # the clean-up after a run
    shown = kernel.execute("from nbtrain.pool import POOL as _pool\nprint([r['rss_mib'] for r in _pool.describe()])")
    return [float(v) for v in json.loads(shown.text.strip())]


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
            ours = run_ours(kernel, workdir, cold=True)
            config = config or ours["config"]
            warm = run_ours(kernel, workdir, cold=False)
            idle = idle_worker_mib(kernel)
            plain = run_plain(config, workdir)
            worst = max(abs(a - b) for side in (ours, warm)
                        for a, b in zip(side["losses"], plain["losses"], strict=True))
            rows.append({"rep": rep, "ours_first": ours["times"][0], "plain_first": plain["times"][0],
                         "warm_first": warm["times"][0], "idle_mib": max(idle),
                         "ours_step": steady_step_s(ours["times"]), "plain_step": steady_step_s(plain["times"]),
                         "warm_step": steady_step_s(warm["times"]),
                         "loss_diff": worst, "final_loss": ours["losses"][-1]})
            print(f"rep {rep}: first step {rows[-1]['ours_first']:.2f} s (ours) vs {rows[-1]['plain_first']:.2f} s "
                  f"(torchrun), warm {rows[-1]['warm_first']:.2f} s; step {rows[-1]['ours_step'] * 1e3:.1f} ms vs "
                  f"{rows[-1]['plain_step'] * 1e3:.1f} ms; idle warm worker {max(idle):.0f} MiB; "
                  f"max loss difference {worst:.2e}", flush=True)
    finally:
        kernel.shutdown()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "rep"}
    print()
    print(f"{'figure':<34}{'%%bigtrain':>12}{'torchrun':>12}{'ratio':>8}")
    print(f"{'time to first step (s, median)':<34}{med['ours_first']:>12.2f}{med['plain_first']:>12.2f}"
          f"{med['ours_first'] / med['plain_first']:>8.3f}")
    print(f"{'  warm, the same cell again (s)':<34}{med['warm_first']:>12.2f}{med['plain_first']:>12.2f}"
          f"{med['warm_first'] / med['plain_first']:>8.3f}")
    print(f"{'steady step time (ms, median)':<34}{med['ours_step'] * 1e3:>12.2f}{med['plain_step'] * 1e3:>12.2f}"
          f"{med['plain_step'] / med['ours_step']:>8.3f}")
    print(f"{'  in warm workers (ms)':<34}{med['warm_step'] * 1e3:>12.2f}{med['plain_step'] * 1e3:>12.2f}"
          f"{med['plain_step'] / med['warm_step']:>8.3f}")
    print(f"idle warm worker memory (RSS, median of the larger rank): {med['idle_mib']:.0f} MiB")
    print(f"largest loss difference over {reps} reps x {STEPS} steps, cold and warm: "
          f"{max(r['loss_diff'] for r in rows):.2e} (final loss {med['final_loss']:.4f})")
    print(f"BENCH throughput {med['plain_step'] / med['ours_step']:.3f}")
    print(f"BENCH first_step {med['ours_first'] / med['plain_first']:.3f}")
    print(f"BENCH warm_first_step_s {med['warm_first']:.3f}")
    print(f"BENCH warm_first_step {med['warm_first'] / med['plain_first']:.3f}")


if __name__ == "__main__":
    main()
