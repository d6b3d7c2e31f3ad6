"""Turn a TrainConfig into a checked plan: the DeepSpeed dict, process count and notices.

This is the last pure step before anything starts: `plan_run` raises ConfigError with
every problem, or returns a RunPlan that the launcher (or `--dry-run`) uses as is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbtrain.config import estimate
from nbtrain.config.deepspeed_rules import check_batch
from nbtrain.config.hosts import Host, check_launcher, resolve_hosts
from nbtrain.config.machine import MachineFacts
from nbtrain.config.render import FROM_DATALOADER, render_collecting, resolve_batch, unresolved
from nbtrain.config.slurm import allocation, node_count, salloc_command
from nbtrain.config.tree import DEFAULT_CPU_PROCESSES, TrainConfig
from nbtrain.config.validate import check, check_resume
from nbtrain.errors import ConfigError, Problem


@dataclass(frozen=True)
class RunPlan:
    """A run that passed validation: what will be launched, exactly."""

    config: TrainConfig
    deepspeed: dict[str, Any]
    nproc: int
    notices: tuple[str, ...]
    machine: MachineFacts
    # The checkpoint `--resume` continues: {"run", "tag", "step"}; None for a fresh run.
    resume_from: dict[str, Any] | None = None
    # The hosts of a multi-node run (--hostfile/--hosts), in node-rank order; () on one machine.
    hosts: tuple[Host, ...] = ()
    launcher: str = "pdsh"
    # The SLURM nodes of a --slurm run (launcher "slurm"; --nodes, else the allocation's); 0 otherwise.
    nodes: int = 0
    # The SLURM job the kernel runs in (SLURM_JOB_ID) when a --slurm run goes into it; None: nbtrain requests one.
    slurm_job: str | None = None

    @property
    def world_size(self) -> int:
        return self.nproc * max(1, len(self.hosts), self.nodes)

    def describe(self) -> str:
        """Return the `--dry-run` text: launch shape, DeepSpeed JSON and memory estimate."""
        device = f"{self.machine.gpu_count} GPU(s)" if self.machine.cuda else "CPU (gloo backend)"
        lines = [f"%%bigtrain dry run: {self.nproc} processes on {device}; nothing was started."]
        if self.hosts:
            lines[0] = (f"%%bigtrain dry run: {self.nproc} processes on each of {len(self.hosts)} hosts "
                        f"({', '.join(h.name for h in self.hosts)}; {self.world_size} in all) through the "
                        f"{self.launcher} launcher; nothing was started.")
        if self.nodes:
            lines[0] = (f"%%bigtrain dry run: {self.nproc} processes on each of {self.nodes} SLURM node(s) "
                        f"({self.world_size} in all) through srun; nothing was started.")
            lines.append(self._allocation_line())
        lines += [f"note: {n}" for n in self.notices]
        pending = unresolved(self.deepspeed)
        if pending:
            lines.append(f"'{FROM_DATALOADER}' is filled in by the workers: {', '.join(pending)}")
        lines += ["DeepSpeed config:", json.dumps(self.deepspeed, indent=2), "",
                  estimate.describe(self.deepspeed, self.world_size)]
        return "\n".join(lines)

    def _allocation_line(self) -> str:
        """Return where a --slurm run's step would go: the kernel's job, or the salloc nbtrain would run."""
        if self.slurm_job is not None:
            return f"allocation: in SLURM job {self.slurm_job} (the kernel's allocation), as a step with --overlap"
        cfg = self.config
        argv = salloc_command("nbtrain-<run id>", self.nodes, self.nproc, cfg.partition, cfg.time_limit,
                              cfg.account, cfg.gpus_per_node)
        return f"allocation: none here (no SLURM_JOB_ID), nbtrain would request one: {' '.join(argv)}"


def load_base(source: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the DeepSpeed dict of `--config`: a JSON file path or an already-resolved dict."""
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError([Problem("--config", source, "no such file, and no dict or ConfigPanel "
                                   "variable of that name in the notebook", "give a JSON file path or a variable name")])
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError([Problem("--config", source, f"not valid JSON ({e})", "fix the file")]) from e
    if not isinstance(data, dict):
        raise ConfigError([Problem("--config", source, "the JSON must be an object", "wrap the keys in { }")])
    return data


def default_nproc(machine: MachineFacts) -> tuple[int, str | None]:
    """Return the process count when --nproc is absent, and a notice when it is a guess."""
    if machine.cuda:
        return machine.gpu_count, None
    return DEFAULT_CPU_PROCESSES, (f"no GPU found: running {DEFAULT_CPU_PROCESSES} CPU processes "
                                   "(set --nproc to change)")


def plan_run(cfg: TrainConfig, machine: MachineFacts, base: Mapping[str, Any] | None = None) -> RunPlan:
    """Render and validate `cfg`; raise ConfigError with every problem found."""
    notices: list[str] = []
    nproc = cfg.nproc
    if nproc is None:
        nproc, notice = default_nproc(machine)
        if notice:
            notices.append(notice)
    rendered, problems = render_collecting(cfg, base)
    problems += check(cfg, rendered.deepspeed, machine, nproc)
    hosts: list[Host] = []
    multinode = cfg.hostfile is not None or cfg.hosts is not None or cfg.multinode_launcher is not None
    # --slurm: SLURM places the workers (its flags and hosts are checked by `check`, the cluster at launch).
    nodes = node_count(cfg.nodes, os.environ) if cfg.slurm else 0
    if multinode and not cfg.slurm:
        try:
            hosts = resolve_hosts(cfg.hostfile, cfg.hosts, nproc, cfg.multinode_launcher)
        except ConfigError as e:
            problems += e.problems
        if hosts:
            problems += check_launcher(cfg.multinode_launcher or "pdsh")
    if hosts or not multinode or cfg.slurm:  # the batch rule needs the world size: nproc on each host
        problems += check_batch(cfg, rendered.deepspeed, nproc, len(hosts) or nodes)
    resume_from, resume_problems = check_resume(cfg, rendered.deepspeed, nproc)
    problems += resume_problems
    if problems:
        raise ConfigError(problems)
    if resume_from is not None:
        notices.append(f"resuming run {Path(resume_from['run']).name} from its checkpoint at step "
                       f"{resume_from['step']} ({resume_from['tag']})")
    deepspeed = resolve_batch(rendered.deepspeed, nproc * max(1, len(hosts), nodes))
    return RunPlan(cfg, deepspeed, nproc, tuple(notices) + rendered.notices, machine, resume_from,
                   hosts=tuple(hosts), launcher="slurm" if cfg.slurm else cfg.multinode_launcher or "pdsh",
                   nodes=nodes, slurm_job=_slurm_job(os.environ) if cfg.slurm else None)


def _slurm_job(environ: Mapping[str, str]) -> str | None:
    inside = allocation(environ)
    return inside[0] if inside else None
