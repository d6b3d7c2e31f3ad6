"""One host x 2 processes against 2 hosts x 1 (pdsh) and 2 SLURM nodes x 1 (srun), the same GPT-2 run (needs root).

Every path trains the same model, data and DeepSpeed JSON as `launch_overhead.py` with 2
processes in all, and must reach the same losses (the largest difference is printed):
- 1 host x 2: `--nproc 2` on this machine (the head);
- 2 hosts x 1 through pdsh: `--hosts node0,node1 --nproc 1` on tests/netns.py's namespace
  hosts, each of which sees an empty private tmpfs over the runs folder, so every record
  crosses a relay (ssh);
- 2 nodes x 1 through srun: `--slurm --nproc 1` in an allocation of tests/slurm.py's 2-node
  cluster (its own namespaces, which share this machine's filesystem: the run directory is
  shared, as on a cluster, and no relay runs). The benchmark takes the allocation with
  salloc before anything is timed, and its kernel starts "inside" it (salloc's variables plus
  the traps a kernel started by `srun --pty` has), as JupyterLab in an allocation would;
- the srun path's warm rerun: the same cell again at once, in the tasks the cold run left
  idle in the allocation; and, for reference under the same load, 1 host x 2's warm rerun in
  its local warm workers (run right after its cold run).
Each repetition runs 1 host x 2 (cold, warm), pdsh, srun (cold, warm); cold runs end the
warm workers first (untimed).
Prints first-step and steady-step medians and `BENCH multinode_<figure> <ratio>` lines with
ratio = 1 host x 2 / the path (below 1: the path is slower). Usage (as root):
benchmarks/multinode.py [--reps N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from launch_overhead import SETUP, STEPS, run_ours, steady_step_s  # noqa: E402

from tests.kernel import Kernel  # noqa: E402
from tests.netns import INTERFACE, Cluster, cluster  # noqa: E402
from tests.slurm import SlurmCluster, slurm_cluster  # noqa: E402

FLAGS = f"--zero 2 --micro-batch 8 --lr 3e-3 --steps {STEPS} --no-plot"
PATHS = {  # key -> (column title, flags)
    "one": ("1 host x 2", f"--nproc 2 {FLAGS}"),
    "one_warm": ("1 host x 2, warm", f"--nproc 2 {FLAGS}"),
    "pdsh": ("2 hosts x 1 pdsh", f"--hosts node0,node1 --nproc 1 {FLAGS}"),
    "srun": ("2 nodes x 1 srun", f"--slurm --nodes 2 --nproc 1 {FLAGS}"),
    "warm": ("srun, warm rerun", f"--slurm --nodes 2 --nproc 1 {FLAGS}"),
}


def sees(argv_prefix: list[str], marker: Path) -> bool:
    """Whether a process started with `argv_prefix` (in a host's namespace) sees `marker`."""
    return subprocess.run([*argv_prefix, "test", "-e", str(marker)], capture_output=True).returncode == 0


def file_paths(c: Cluster, sc: SlurmCluster, runs: Path) -> dict[str, str]:
    """Say how each path's records reach the head's run directory, checked on the hosts themselves."""
    marker = runs / ".bench-visible"
    marker.touch()
    try:
        pdsh = sees(c.run_on("node0", []), marker)
        srun = all(sees(sc.run_on(node, []), marker) for node in sc.nodes)
    finally:
        marker.unlink()
    return {"one": "the head writes its run directory itself",
            "pdsh": ("the hosts see the runs folder too (shared)" if pdsh else
                     "the hosts have a private tmpfs over the runs folder: a relay per host (ssh) "
                     "copies the inputs there and streams every record back"),
            "srun": ("the nodes share the head's filesystem: the tasks write the run directory "
                     "itself, no relay" if srun else "the nodes do NOT see the runs folder (the run would be refused)")}


def one_rep(hosts: Kernel, slurm: Kernel, workdir: Path) -> dict[str, dict]:
    """Run every path once, in PATHS' order; return each path's times and losses."""
    runs = {"one": run_ours(hosts, workdir, cold=True, flags=PATHS["one"][1]),
            "one_warm": run_ours(hosts, workdir, cold=False, flags=PATHS["one_warm"][1]),
            "pdsh": run_ours(hosts, workdir, cold=True, flags=PATHS["pdsh"][1]),
            "srun": run_ours(slurm, workdir, cold=True, flags=PATHS["srun"][1]),
            "warm": run_ours(slurm, workdir, cold=False, flags=PATHS["warm"][1])}
    slurm.execute("%bigtrain shutdown")  # no idle task on the nodes while the next rep's other paths run
    return runs


def row_of(runs: dict[str, dict]) -> dict[str, float]:
    row = {}
    for key, run in runs.items():
        row[f"{key}_first"] = run["times"][0]
        row[f"{key}_step"] = steady_step_s(run["times"])
    row["loss_diff"] = max(abs(a - b) for key in ("one_warm", "pdsh", "srun", "warm")
                           for a, b in zip(runs["one"]["losses"], runs[key]["losses"], strict=True))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    reps = parser.parse_args().reps
    workdir = Path(tempfile.mkdtemp(prefix="nbtrain-bench-multinode-"))
    runs = workdir / "bigtrain-runs"
    runs.mkdir()
    (workdir / ".deepspeed_env").write_text(f"GLOO_SOCKET_IFNAME={INTERFACE}\n")  # for the pdsh hosts
    rows = []
    with cluster(2, private_dirs=[runs]) as c, slurm_cluster(2) as sc:
        paths = file_paths(c, sc, runs)
        alloc = sc.salloc(2)  # whole nodes, taken before anything is timed
        hosts, slurm = Kernel(workdir, env=c.env), Kernel(workdir, env=alloc.env)
        try:
            hosts.execute(SETUP)
            slurm.execute(SETUP)
            for rep in range(reps):
                rows.append(row_of(one_rep(hosts, slurm, workdir)))
                r = rows[-1]
                print(f"rep {rep}: first step " + ", ".join(f"{r[f'{k}_first']:.2f} s ({t})" for k, (t, _) in
                                                             PATHS.items())
                      + "; step " + ", ".join(f"{r[f'{k}_step'] * 1e3:.1f} ms" for k in PATHS)
                      + f"; max loss difference {r['loss_diff']:.2e}", flush=True)
        finally:
            hosts.shutdown()
            slurm.shutdown()
            sc.scancel(alloc)
    print_table(rows, paths, alloc.job_id)


def print_table(rows: list[dict[str, float]], paths: dict[str, str], job: str) -> None:
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"\nmedians of {len(rows)} reps, {STEPS} steps each, 2 processes in all; the srun runs in "
          f"allocation {job} (taken before timing: no queue wait)")
    print(f"{'figure':<32}" + "".join(f"{title:>18}" for title, _ in PATHS.values()))
    print(f"{'time to first step (s)':<32}" + "".join(f"{med[f'{k}_first']:>18.2f}" for k in PATHS))
    print(f"{'  ratio 1 host x 2 / path':<32}" + "".join(f"{med['one_first'] / med[f'{k}_first']:>18.3f}"
                                                         for k in PATHS))
    print(f"{'steady step time (ms)':<32}" + "".join(f"{med[f'{k}_step'] * 1e3:>18.2f}" for k in PATHS))
    print(f"{'  ratio 1 host x 2 / path':<32}" + "".join(f"{med['one_step'] / med[f'{k}_step']:>18.3f}"
                                                         for k in PATHS))
    print("files: " + "; ".join(f"{PATHS[k][0]}: {how}" for k, how in paths.items()))
    print(f"largest loss difference against 1 host x 2: {max(r['loss_diff'] for r in rows):.2e}")
    print(f"BENCH multinode_first_step {med['one_first'] / med['pdsh_first']:.3f}")
    print(f"BENCH multinode_throughput {med['one_step'] / med['pdsh_step']:.3f}")
    print(f"BENCH multinode_slurm_first_step {med['one_first'] / med['srun_first']:.3f}")
    print(f"BENCH multinode_slurm_throughput {med['one_step'] / med['srun_step']:.3f}")
    print(f"BENCH multinode_slurm_warm_first_step {med['one_first'] / med['warm_first']:.3f}")
    print(f"BENCH multinode_slurm_warm_first_step_s {med['warm_first']:.3f}")


if __name__ == "__main__":
    main()
