"""What a SLURM cluster allows, asked before anything starts (issue 17).

`slurm_problems(config, environ)` asks the cluster the kernel can reach (`sinfo`,
`scontrol`, `sacctmgr`, run with the caller's environment so that SLURM_CONF is kept, each
with a short timeout) whether `--slurm` can run as asked: SLURM installed and its controller
answering, the partition and account known, enough GPUs and nodes, a time limit within the
partition's. `check_slurm` raises them as one `ConfigError`; the launcher calls it first.
The pure rules (formats, flags only meaningful with `--slurm`) are `flag_problems`, part of
`nbtrain.config.validate.check`.

>>> parse_time("1-12:30"), parse_time("90"), parse_time("0:30"), parse_time("INFINITE")
(2190, 90, 1, inf)

Standard library only: the pure validator imports this module.
"""

from __future__ import annotations

import math
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nbtrain.config.tree import TrainConfig, flag_name
from nbtrain.errors import ConfigError, Problem

TIME_FORMATS = "M, M:S, H:M:S, D-H, D-H:M, D-H:M:S"
# Slurm's own words for "no limit" (parse_time.c: time_str2mins); 0 as a request means the same.
_NO_LIMIT = {"INFINITE", "UNLIMITED", "-1"}
_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
# The SLURM fields sinfo prints for us, one line per partition and node kind (-h -o: no header).
_SINFO_FORMAT = "%P|%a|%D|%l|%G"
# Commands that read the cluster give up after this many seconds (a dead controller can hang).
QUERY_TIMEOUT_S = 10.0
# The TrainConfig fields that only --slurm reads (their flags: --nodes, ..., --time, ...).
SLURM_FIELDS = ("nodes", "partition", "time_limit", "account", "gpus_per_node")
_DEBIAN_PACKAGES = "slurm-client (srun, sinfo, salloc, scontrol, sacctmgr) and munge"


def parse_time(text: str) -> float:
    """Return a Slurm time limit in whole minutes (seconds round up, as Slurm does); inf for none.

    Raises ValueError for text in none of Slurm's formats (TIME_FORMATS).
    """
    word = text.strip()
    if word.upper() in _NO_LIMIT:
        return math.inf
    match = _TIME.match(word)
    if match is None:
        raise ValueError(f"not a Slurm time limit: {text!r}")
    days, d_hours, d_minutes, d_seconds, first, second, third = (int(g) if g else 0 for g in match.groups())
    if match.group(1) is not None:
        seconds = ((days * 24 + d_hours) * 60 + d_minutes) * 60 + d_seconds
    elif match.group(7) is not None:  # H:M:S
        seconds = (first * 60 + second) * 60 + third
    else:  # M or M:S
        seconds = first * 60 + second
    minutes = -(-seconds // 60)
    return math.inf if minutes == 0 else minutes  # `--time 0` asks for no limit


def flag_problems(cfg: TrainConfig) -> list[Problem]:
    """Return the pure problems of the SLURM flags: used without --slurm, or values out of rule."""
    given = {flag_name(f): getattr(cfg, f) for f in SLURM_FIELDS if getattr(cfg, f) is not None}
    if not cfg.slurm:
        return [Problem(flag, value, "only with --slurm (it shapes the SLURM allocation)",
                        f"add --slurm to run on a SLURM allocation, or drop {flag}") for flag, value in given.items()]
    found: list[Problem] = []
    if cfg.nodes is not None and cfg.nodes < 1:
        found.append(Problem("--nodes", cfg.nodes, "must be 1 or more", "give --nodes 1 or more"))
    if cfg.gpus_per_node is not None and cfg.gpus_per_node < 0:
        found.append(Problem("--gpus-per-node", cfg.gpus_per_node, "must be 0 or more",
                             "give --gpus-per-node 0 or more (0: no GPUs)"))
    if cfg.time_limit is not None:
        try:
            parse_time(cfg.time_limit)
        except ValueError:
            found.append(Problem("--time", cfg.time_limit, f"not one of Slurm's time formats ({TIME_FORMATS}; "
                                 "M alone is minutes)", "e.g. --time 30 (minutes), --time 2:00:00, --time 1-12"))
    return found


# -- asking the cluster ------------------------------------------------------------------

@dataclass(frozen=True)
class Partition:
    """One partition as sinfo shows it: its nodes' count, time limit and GPUs per node."""

    name: str
    default: bool
    state: str  # sinfo's %a: up, down, drain or inact (only "up" starts jobs)
    nodes: int
    max_time: str  # sinfo's %l, e.g. "1-00:00:00" or "infinite"
    gres: tuple[tuple[str, int], ...]  # (sinfo's %G, node count) per kind of node

    @property
    def max_minutes(self) -> float:
        """MaxTime in minutes; inf when the partition has none."""
        try:
            return parse_time(self.max_time)
        except ValueError:
            return math.inf  # "n/a" and the like: Slurm enforces no limit we can read

    def gpus_per_node(self) -> list[tuple[int, int]]:
        """Return (GPUs per node, nodes with that many), most GPUs first."""
        counts: dict[int, int] = {}
        for gres, nodes in self.gres:
            counts[gpu_count(gres)] = counts.get(gpu_count(gres), 0) + nodes
        return sorted(counts.items(), reverse=True)


def gpu_count(gres: str) -> int:
    """Return the GPUs of one node from sinfo's %G (`gpu:4`, `gpu:a100:2,gpu:v100:2`, `(null)`)."""
    total = 0
    # Each entry is name[:type][:count][(S:sockets)]; a missing count is 1 (gres.conf's default).
    for entry in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = entry.strip().split(":")
        if parts[0] == "gpu":
            total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


def parse_sinfo(text: str) -> list[Partition]:
    """Read `sinfo -h -o '%P|%a|%D|%l|%G'`: one partition per name, its node kinds merged."""
    rows: dict[str, dict[str, object]] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5 or not fields[2].isdigit():
            continue
        name, available, count, limit, gres = fields
        default = name.endswith("*")
        name = name.rstrip("*")
        row = rows.setdefault(name, {"default": False, "state": available, "nodes": 0, "max_time": limit, "gres": []})
        row["default"] = bool(row["default"]) or default
        row["nodes"] = int(str(row["nodes"])) + int(count)
        row["gres"].append((gres, int(count)))  # type: ignore[attr-defined]
    return [Partition(name, bool(r["default"]), str(r["state"]), int(str(r["nodes"])), str(r["max_time"]),
                      tuple(r["gres"]))  # type: ignore[arg-type]
            for name, r in rows.items()]


def parse_config(text: str) -> dict[str, str]:
    """Read `scontrol show config` (`Name = value` lines) into a dict."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() and " " not in name.strip():
            found[name.strip()] = value.strip()
    return found


def enforces_accounts(config: Mapping[str, str]) -> bool:
    """Whether the cluster refuses jobs of an unknown account (slurmdbd with enforced associations)."""
    storage = config.get("AccountingStorageType", "accounting_storage/none")
    enforce = config.get("AccountingStorageEnforce", "none").lower()
    # "limits", "qos", "safe" each imply "associations" (slurm.conf(5)).
    return storage.endswith("/slurmdbd") and any(w in enforce for w in ("associations", "limits", "qos", "safe"))


class SlurmUnavailable(Exception):
    """A SLURM command is missing, failed or hung; `problem` says which and what to do."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


def _query(args: Sequence[str], environ: Mapping[str, str], timeout: float = QUERY_TIMEOUT_S) -> str:
    """Run a SLURM client command with the caller's environment; return its stdout."""
    program = args[0]
    if shutil.which(program, path=environ.get("PATH", os.defpath)) is None:
        raise SlurmUnavailable(Problem("--slurm", True, f"no SLURM client on this machine (`{program}` is not on PATH)",
                                       f"install Debian's {_DEBIAN_PACKAGES} with the cluster's slurm.conf "
                                       "(or ask the cluster's admin), or drop --slurm"))
    try:
        done = subprocess.run(list(args), env=dict(environ), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(_no_controller(environ, f"`{' '.join(args)}` gave no answer within {timeout:g} s")) from None
    if done.returncode != 0:
        said = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise SlurmUnavailable(_no_controller(environ, f"`{' '.join(args)}` failed: {said}"))
    return done.stdout


def _no_controller(environ: Mapping[str, str], said: str) -> Problem:
    conf = environ.get("SLURM_CONF")
    where = f"SLURM_CONF={conf}" if conf else "/etc/slurm/slurm.conf (SLURM_CONF is not set)"
    return Problem("--slurm", True, f"the SLURM controller does not answer: {said}",
                   f"check the cluster's configuration, read from {where}, and that slurmctld runs "
                   "(`scontrol ping`); or drop --slurm")


def partitions(environ: Mapping[str, str] | None = None) -> list[Partition]:
    """Return the cluster's partitions (hidden ones included); raise SlurmUnavailable if it cannot be asked."""
    env = os.environ if environ is None else environ
    return parse_sinfo(_query(["sinfo", "--all", "-h", "-o", _SINFO_FORMAT], env))


def default_partition(found: Sequence[Partition]) -> Partition | None:
    """Return the partition jobs go to without -p (sinfo marks it with *), if the cluster has one."""
    return next((p for p in found if p.default), None)


def partition_info(name: str | None, environ: Mapping[str, str] | None = None) -> Partition | None:
    """Return partition `name` (None: the default one), or None when the cluster has no such partition."""
    found = partitions(environ)
    if name is None:
        return default_partition(found)
    return next((p for p in found if p.name == name), None)


def allocation(environ: Mapping[str, str]) -> tuple[str, int] | None:
    """Return (job id, node count) of the allocation the kernel runs in, or None outside one."""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return None
    count = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or "1"
    return job, int(count) if count.isdigit() else 1


def node_count(nodes: int | None, environ: Mapping[str, str]) -> int:
    """Return the nodes of a --slurm run: --nodes, else the allocation's, else 1 (contract)."""
    if nodes is not None:
        return nodes
    inside = allocation(environ)
    return inside[1] if inside else 1


def salloc_command(name: str, nodes: int, nproc: int, partition: str | None, time_limit: str | None,
                   account: str | None, gpus_per_node: int | None) -> list[str]:
    """Return the salloc command line of an allocation for `nodes` x `nproc` tasks (the launcher runs it)."""
    argv = ["salloc", "--no-shell", "--job-name", name, "-N", str(nodes), "--ntasks-per-node", str(nproc)]
    for flag, value in (("-p", partition), ("-t", time_limit), ("-A", account)):
        if value:
            argv += [flag, value]
    if gpus_per_node:
        argv += ["--gpus-per-node", str(gpus_per_node)]
    return argv


# -- the checks ---------------------------------------------------------------------------

def slurm_problems(config: TrainConfig, environ: Mapping[str, str] | None = None) -> list[Problem]:
    """Ask the cluster whether a `--slurm` run of `config` (a TrainConfig) can start as asked.

    Returns [] when `config.slurm` is false. Inside an allocation (SLURM_JOB_ID) the nodes are
    checked against it, --partition/--account must be its own and --time is refused (the
    allocation's own limit applies); otherwise everything is checked against the partition
    nbtrain will request (--partition, else the cluster's default).
    """
    if not config.slurm:
        return []
    env = os.environ if environ is None else environ
    try:
        _query(["srun", "--version"], env)  # the launcher's own program, before asking the controller
        found = partitions(env)
        inside = allocation(env)
        if inside is not None:
            return _inside_allocation(config, found, inside, env)
        return _for_a_request(config, found, env)
    except SlurmUnavailable as e:
        return [e.problem]


def check_slurm(config: TrainConfig, environ: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError with every slurm_problems; the launcher calls it before it starts anything."""
    problems = slurm_problems(config, environ)
    if problems:
        raise ConfigError(problems)


def _for_a_request(cfg: TrainConfig, found: list[Partition], env: Mapping[str, str]) -> list[Problem]:
    partition, problems = _named_partition(cfg.partition, found)
    problems += _account_problems(cfg.account, env)
    if partition is None:
        return problems
    if partition.state != "up":
        problems.append(Problem("--partition", partition.name, f"partition {partition.name} is {partition.state} "
                                "(sinfo), so it starts no job and the allocation would wait",
                                "choose a partition that is up (`sinfo`), or ask the cluster's admin"))
    problems += _shape_problems(cfg, partition)
    if cfg.time_limit is not None and parse_time(cfg.time_limit) > partition.max_minutes:
        most = format_minutes(partition.max_minutes)
        problems.append(Problem("--time", cfg.time_limit,
                                f"partition {partition.name} allows at most {most} (its MaxTime; sinfo shows "
                                f"{partition.max_time})", f"give --time {most} or less, or a partition that "
                                "allows longer"))
    return problems


def format_minutes(minutes: float) -> str:
    """Write minutes as Slurm's H:MM:SS or D-HH:MM:SS, which no reader takes for minutes:seconds."""
    if math.isinf(minutes):
        return "INFINITE"
    days, rest = divmod(int(minutes), 24 * 60)
    hours, mins = divmod(rest, 60)
    return f"{days}-{hours:02d}:{mins:02d}:00" if days else f"{hours}:{mins:02d}:00"


def _inside_allocation(cfg: TrainConfig, found: list[Partition], inside: tuple[str, int],
                       env: Mapping[str, str]) -> list[Problem]:
    job, count = inside
    problems: list[Problem] = []
    own = {"--partition": (cfg.partition, env.get("SLURM_JOB_PARTITION")),
           "--account": (cfg.account, env.get("SLURM_JOB_ACCOUNT"))}
    for flag, (asked, theirs) in own.items():
        if asked is not None and theirs and asked != theirs:
            problems.append(Problem(flag, asked, f"the kernel runs inside allocation {job}, whose {flag[2:]} is "
                                    f"{theirs}; the run uses that allocation", f"drop {flag} (or give {theirs}), "
                                    "or start the notebook outside an allocation so that nbtrain requests one"))
    if cfg.time_limit is not None:  # the launcher runs its step in the allocation, under the allocation's limit
        problems.append(Problem("--time", cfg.time_limit, f"the kernel runs inside allocation {job}, whose own "
                                "time limit applies; --time only shapes an allocation nbtrain requests",
                                "drop --time, or start the notebook outside an allocation"))
    if cfg.nodes is not None and cfg.nodes > count:
        problems.append(Problem("--nodes", cfg.nodes, f"allocation {job} has {count} node(s)",
                                f"give --nodes {count} or fewer, or ask salloc/sbatch for more nodes"))
    partition = next((p for p in found if p.name == env.get("SLURM_JOB_PARTITION")), None)
    if partition is not None and cfg.gpus_per_node:
        problems += _gpu_problems(cfg.gpus_per_node, cfg.nodes or count, partition)
    return problems


def _named_partition(name: str | None, found: list[Partition]) -> tuple[Partition | None, list[Problem]]:
    names = ", ".join(p.name for p in found) or "none"
    default = default_partition(found)
    if name is None:
        if default is None:
            return None, [Problem("--partition", None, f"the cluster has no default partition (partitions: {names})",
                                  "name one with --partition")]
        return default, []
    match = next((p for p in found if p.name == name), None)
    if match is None:
        said = f"; the default is {default.name}" if default else ""
        return None, [Problem("--partition", name, f"the cluster has no such partition (partitions: {names}{said})",
                              "give one of those, or drop --partition for the default")]
    return match, []


def _shape_problems(cfg: TrainConfig, partition: Partition) -> list[Problem]:
    nodes = cfg.nodes or 1
    if nodes > partition.nodes:
        return [Problem("--nodes", nodes, f"partition {partition.name} has {partition.nodes} node(s)",
                        f"give --nodes {partition.nodes} or fewer, or a larger partition")]
    if cfg.gpus_per_node:
        return _gpu_problems(cfg.gpus_per_node, nodes, partition)
    return []


def _gpu_problems(asked: int, nodes: int, partition: Partition) -> list[Problem]:
    kinds = partition.gpus_per_node()
    enough = sum(count for gpus, count in kinds if gpus >= asked)
    if enough >= nodes:
        return []
    shown = "; ".join(f"{count} with {_gres_words(gpus)}" for gpus, count in kinds)
    most = kinds[0][0] if kinds else 0
    if enough == 0:
        fix = (f"give --gpus-per-node {most} or fewer" if most else "drop --gpus-per-node (or give 0)") + \
              ", or a partition with more GPUs per node"
    else:
        fix = f"give --nodes {enough} or fewer, or fewer GPUs per node"
    return [Problem("--gpus-per-node", asked, f"the nodes of partition {partition.name} have {shown}: "
                    f"{enough} of them have {asked} or more, {nodes} asked for", fix)]


def _gres_words(gpus: int) -> str:
    return f"gpu:{gpus}" if gpus else "no GPU"


def _account_problems(account: str | None, env: Mapping[str, str]) -> list[Problem]:
    """Refuse an account the cluster's accounting does not know for this user; say nothing without accounting."""
    if account is None or not enforces_accounts(parse_config(_query(["scontrol", "show", "config"], env))):
        return []
    user = pwd.getpwuid(os.getuid()).pw_name  # Slurm knows jobs by uid, whatever $USER says
    text = _query(["sacctmgr", "-n", "-P", "show", "assoc", f"where user={user}", "format=Account"], env)
    mine = sorted({line.strip() for line in text.splitlines() if line.strip()})
    if account in mine:
        return []
    return [Problem("--account", account, f"not an account of user {user} in the cluster's accounting "
                    f"(theirs: {', '.join(mine) or 'none'})",
                    "give one of those, or ask the cluster's admin to add you to the account")]
