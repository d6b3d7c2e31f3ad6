"""The live dashboard's own figures, in a real kernel (tests/kernel.py) on the benchmark's workload.

- telemetry: throughput with the live dashboard / with `--no-plot`: the same cell on the same
  warm workers, run as PAIRS_PER_REP back-to-back pairs per repetition (which side goes first
  swaps every pair); each pair's ratio of median steady step times, and the median of those
  ratios (goal >= 0.99). Pairing cancels the drift of a shared machine's load, which moves
  single runs by more than the few per cent measured;
- dashboard latency: from rank 0 logging a loss (`bigtrain.log` inside `bigtrain.fit`; the
  record's `time`, taken by the worker as it writes it) to the kernel's Dashboard widget
  holding it (a traitlets observer on the progress line, timestamped in the kernel); p95 over
  every step of the dashboard runs (goal <= 500 ms);
- kernel round trip: a trivial cell (`1+1`), execute request to reply, while a `--background`
  run of the same cell trains with its dashboard; p95 of the cells sent between the run's
  first and last step (goal <= 100 ms).

`launch_overhead.py` (`make bench`) measures these in its repetitions; alone:
`benchmarks/dashboard.py [--reps N]` prints only these lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from launch_overhead import CELL, FLAGS, SETUP, STEPS, Kernel, run_ours, steady_step_s

from nbtrain.rundir import FINAL_STATES, read_json, read_records

GOALS = {"telemetry": ">= 0.99", "dashboard_latency_ms": "<= 500", "kernel_rtt_ms": "<= 100"}
PAIRS_PER_REP = 3  # a warm pair takes about 5 s here: cheap samples against a noisy machine
RTT_STEPS = 150  # the background run: long enough for ~100 round trips on a quiet machine
RTT_PAUSE_S = 0.03  # between two trivial cells, as the next cell a user runs comes after some time

# Run once in the kernel before any dashboard: every Dashboard then notes, each time its
# progress line changes, when (kernel clock), its run, and the step and last loss it holds.
PROBE = """
def _bench_probe():
    import time
    from nbtrain.dashboard.widget import Dashboard
    if getattr(Dashboard, "_bench_seen", None) is not None:
        return
    Dashboard._bench_seen = []
    original = Dashboard.started
    def started(self, *args, **kwargs):
        original(self, *args, **kwargs)
        def seen(change):
            metrics = self.metrics
            Dashboard._bench_seen.append((time.time(), metrics.run.run_id, metrics.step, metrics.loss.last))
        self.progress_text.observe(seen, "value")
    Dashboard.started = started
_bench_probe()
"""
TAKE_SEEN = ("from nbtrain.dashboard.widget import Dashboard as _D\n"
             "print(__import__('json').dumps(_D._bench_seen)); _D._bench_seen.clear()")


def install_probe(kernel: Kernel) -> None:
    kernel.execute(PROBE)


def latencies_ms(run: Path, seen: list[list[Any]]) -> list[float]:
    """Return, per loss record of rank 0, the ms from its writing to the first moment the widget held it.

    Records are read in file order, so the widget holds step s's loss once it shows a later
    step, or step s with that very loss (float from the same JSON text: equal exactly).
    The last losses, written after the live view's last read (the run ended before the next
    one), are shown by the final picture instead, and are left out.
    """
    records, _ = read_records(run / "metrics" / "rank-0.jsonl")
    mine = [(t, step, loss) for t, run_id, step, loss in seen if run_id == run.name]
    firsts = [(record, next((t for t, step, loss in mine if step > record["step"]
                             or (step == record["step"] and loss == record["loss"])), None))
              for record in records if record.get("loss") is not None]
    while firsts and firsts[-1][1] is None:
        firsts.pop()
    missed = [record["step"] for record, first in firsts if first is None]
    assert not missed, f"the losses of steps {missed} never reached the dashboard of {run.name}"
    return [(first - record["time"]) * 1e3 for record, first in firsts if first is not None]


def telemetry_pairs(kernel: Kernel, workdir: Path) -> list[dict[str, Any]]:
    """Run PAIRS_PER_REP pairs of the cell, with the dashboard and with --no-plot, on warm workers.

    Each pair holds both steady step times and the dashboard run's latencies; the side that
    goes first alternates from pair to pair.
    """
    pairs = []
    for pair in range(PAIRS_PER_REP):
        sides = ("dashboard", "no_plot") if pair % 2 == 0 else ("no_plot", "dashboard")
        found: dict[str, Any] = {}
        for side in sides:
            ours = run_ours(kernel, workdir, cold=False, flags=FLAGS + (" --no-plot" if side == "no_plot" else ""))
            found[side] = steady_step_s(ours["times"])
            if side == "dashboard":
                seen = json.loads(kernel.execute(TAKE_SEEN).text.strip())
                found["latencies_ms"] = latencies_ms(ours["run"], seen)
        pairs.append(found)
    return pairs


def kernel_rtt_ms(kernel: Kernel, workdir: Path) -> list[float]:
    """Return the round trips (ms) of `1+1` cells sent while a --background run trained."""
    before = set((workdir / "bigtrain-runs").glob("*"))
    flags = FLAGS.replace(f"--steps {STEPS}", f"--steps {RTT_STEPS}")
    kernel.execute(f"%%bigtrain {flags} --background\n{CELL}")
    kernel.execute("_bench_handle = _")
    (run,) = set((workdir / "bigtrain-runs").glob("*")) - before
    trips = []
    while read_json(run / "status.json", {}).get("state") not in FINAL_STATES:
        sent = time.time()
        kernel.execute("1+1")
        trips.append((sent, time.time() - sent))
        time.sleep(RTT_PAUSE_S)
    kernel.execute("_bench_handle.wait(); del _bench_handle")
    records, _ = read_records(run / "metrics" / "rank-0.jsonl")
    steps = [r["time"] for r in records if "lr" in r]
    return [trip * 1e3 for sent, trip in trips if steps[0] <= sent and sent + trip <= steps[-1]]


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def bench_lines(pairs: list[dict[str, Any]], trips: list[float]) -> list[str]:
    """Return the table lines and the BENCH lines of the dashboard's figures."""
    dash = statistics.median(p["dashboard"] for p in pairs)
    quiet = statistics.median(p["no_plot"] for p in pairs)
    ratios = sorted(p["no_plot"] / p["dashboard"] for p in pairs)
    latencies = [ms for p in pairs for ms in p["latencies_ms"]]
    figures = {"telemetry": f"{statistics.median(ratios):.3f}", "dashboard_latency_ms": f"{p95(latencies):.0f}",
               "kernel_rtt_ms": f"{p95(trips):.1f}"}
    return [
        f"steady step, warm, dashboard / --no-plot (ms, median of {len(pairs)}): {dash * 1e3:.2f} / {quiet * 1e3:.2f}",
        f"telemetry ratio of each back-to-back pair: {' '.join(f'{r:.3f}' for r in ratios)}",
        f"dashboard latency over {len(latencies)} losses (ms): median {statistics.median(latencies):.0f}, "
        f"p95 {p95(latencies):.0f}, max {max(latencies):.0f}",
        f"kernel round trip over {len(trips)} cells during a --background run (ms): "
        f"median {statistics.median(trips):.1f}, p95 {p95(trips):.1f}, max {max(trips):.1f}",
        *(f"BENCH {name} {value} (goal {GOALS[name]})" for name, value in figures.items()),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    reps = parser.parse_args().reps
    workdir = Path(tempfile.mkdtemp(prefix="nbtrain-bench-dashboard-"))
    kernel = Kernel(workdir)
    try:
        kernel.execute(SETUP)
        install_probe(kernel)
        run_ours(kernel, workdir, cold=True)  # start the workers (untimed)
        pairs = []
        for rep in range(reps):
            for pair in telemetry_pairs(kernel, workdir):
                pairs.append(pair)
                print(f"rep {rep}: steady step {pair['dashboard'] * 1e3:.2f} ms (dashboard) vs "
                      f"{pair['no_plot'] * 1e3:.2f} ms (--no-plot); latency p95 {p95(pair['latencies_ms']):.0f} ms",
                      flush=True)
        trips = kernel_rtt_ms(kernel, workdir)
    finally:
        kernel.shutdown()
    print("\n".join(bench_lines(pairs, trips)))


if __name__ == "__main__":
    sys.exit(main())
