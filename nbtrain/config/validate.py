"""Check a run's settings completely, before anything starts.

`check(cfg, ds, machine)` returns every problem at once; each names the flag or dotted
key, the value, the rule and the fix. It never imports DeepSpeed: the keys DeepSpeed
accepts come from `nbtrain.config.schema`.
"""

from __future__ import annotations

import difflib
import keyword
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nbtrain.config.deepspeed_rules import check_rules
from nbtrain.config.hosts import check_host_flags
from nbtrain.config.keys import DECAYING_SCHEDULERS, SCHEDULER_TYPES, WARMUP_SCHEDULERS, key_of, named, rows_of
from nbtrain.config.machine import MachineFacts, too_few_gpus
from nbtrain.config.render import FROM_DATALOADER, get_path
from nbtrain.config.schema import DeepSpeedSchema, load_schema
from nbtrain.config.slurm import flag_problems
from nbtrain.config.tree import DEEPSPEED_DEFAULT_WARMUP_STEPS, DEFAULT_RUN_ROOT, TrainConfig
from nbtrain.errors import Problem

_NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check(cfg: TrainConfig, ds: Mapping[str, Any], machine: MachineFacts, nproc: int,
          schema: DeepSpeedSchema | None = None) -> list[Problem]:
    """Return every problem with these settings (an empty list when they can run)."""
    problems: list[Problem] = []
    problems += _check_numbers(cfg, ds)
    schema = schema or load_schema()
    rules = check_rules(cfg, ds, schema)  # DeepSpeed's cross-key rules; their message beats "unknown key" for one key
    problems += [p for p in _check_unknown_keys(ds, schema) if p.where not in {r.where for r in rules}]
    problems += _check_combinations(cfg, ds, nproc)
    problems += rules
    problems += _check_machine(cfg, ds, machine)
    problems += _check_device_count(cfg, machine, nproc)
    problems += _check_bookkeeping(cfg)
    problems += _check_slurm(cfg)
    return problems


def _positive(where: str, value: Any, *, allow_zero: bool = False, whole: bool = True) -> list[Problem]:
    if value is None or value == FROM_DATALOADER:
        return []
    kind = "a whole number" if whole else "a number"
    ok_type = isinstance(value, int) if whole else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        return [Problem(where, value, f"must be {kind}", f"give {where} {kind}")]
    if value < 0 or (value == 0 and not allow_zero):
        floor = "0 or more" if allow_zero else "greater than 0"
        return [Problem(where, value, f"must be {floor}", f"give {where} a value {floor}")]
    return []


def _check_numbers(cfg: TrainConfig, ds: Mapping[str, Any]) -> list[Problem]:
    found: list[Problem] = []
    for flag, value in (("--nproc", cfg.nproc), ("--steps", cfg.steps), ("--epochs", cfg.epochs),
                        ("--checkpoint-every", cfg.checkpoint_every), ("--hpz", cfg.hpz)):
        found += _positive(flag, value)
    found += _positive("--warmup-steps", cfg.warmup_steps)  # DeepSpeed's warm-up schedulers refuse 0
    found += _positive("--hang-timeout", cfg.hang_timeout, whole=False)
    found += _positive("--keep-warm", cfg.keep_warm, allow_zero=True, whole=False)
    found += _positive("--seed", cfg.seed, allow_zero=True)
    for field, rules in (("micro_batch", {}), ("grad_accum", {}), ("lr", {"whole": False}),
                         ("weight_decay", {"allow_zero": True, "whole": False}),
                         ("grad_clip", {"allow_zero": True, "whole": False})):
        (row,) = rows_of(field)  # each of these flags sets one DeepSpeed key
        found += _positive(named(cfg, field), get_path(ds, row.key), **rules)
    found += _positive("train_batch_size", ds.get("train_batch_size"))
    if cfg.steps is not None and cfg.epochs is not None:
        found.append(Problem("--epochs", cfg.epochs, "--steps and --epochs both end the run",
                             "give --steps or --epochs, not both"))
    return found


def _check_unknown_keys(ds: Mapping[str, Any], schema: DeepSpeedSchema, path: str = "",
                        root: Mapping[str, Any] | None = None) -> list[Problem]:
    """Refuse keys DeepSpeed does not read (it would silently ignore them), with did-you-mean."""
    root = ds if root is None else root
    allowed = schema.allowed(path, dict(root))
    found: list[Problem] = []
    for key, value in ds.items():
        dotted = f"{path}.{key}" if path else key
        if dotted in schema.removed:
            found.append(Problem(dotted, value, f"DeepSpeed {schema.version} refuses it: {schema.removed[dotted]}",
                                 f"remove {dotted!r}"))
            continue
        if allowed is not None and key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            fix = f"did you mean {close[0]!r}?" if close else "remove it, or check DeepSpeed's config docs"
            where = "top-level key" if not path else f"key under {path}"
            found.append(Problem(dotted, value,
                                 f"DeepSpeed {schema.version} has no {where} {key!r} (it would ignore it silently)",
                                 fix))
            continue
        if isinstance(value, Mapping):
            found += _check_unknown_keys(value, schema, dotted, root)
    return found


def _check_combinations(cfg: TrainConfig, ds: Mapping[str, Any], nproc: int) -> list[Problem]:
    found: list[Problem] = []
    stage = get_path(ds, "zero_optimization.stage", 0)
    if stage not in (0, 1, 2, 3):
        found.append(Problem(named(cfg, "zero"), stage, "ZeRO stage must be 0, 1, 2 or 3", "pick one of 0-3"))
        return found
    for kind in ("offload_optimizer", "offload_param"):
        device = get_path(ds, key_of(kind), "none")
        flag = named(cfg, kind)
        if device not in ("none", "cpu", "nvme"):
            found.append(Problem(flag, device, "offload device must be none, cpu or nvme", "pick one of them"))
            continue
        if device == "none":
            continue
        if kind == "offload_param" and stage != 3:
            found.append(Problem(flag, device, f"parameter offload needs ZeRO stage 3 (stage is {stage})",
                                 "add --zero 3, or drop --offload-param"))
        if kind == "offload_optimizer" and stage == 0:
            found.append(Problem(flag, device, "optimizer offload needs ZeRO stage 1, 2 or 3 (stage is 0)",
                                 "add --zero 2 (or 1, 3), or drop --offload-optimizer"))
        if device == "nvme":
            found += _check_nvme(cfg, ds, kind, flag, stage)
    if get_path(ds, "bf16.enabled") is True and get_path(ds, "fp16.enabled") is True:
        found.append(Problem("bf16.enabled/fp16.enabled", True, "bf16 and fp16 cannot both be enabled",
                             "choose one with --precision bf16 or --precision fp16"))
    for key, flag in (("zero_quantized_weights", "qwz"), ("zero_quantized_gradients", "qgz")):
        if get_path(ds, f"zero_optimization.{key}") is True and stage != 3:
            found.append(Problem.about(cfg.quant, "--quant", f"zero_optimization.{key}", flag,
                                 f"ZeRO++ {flag} needs ZeRO stage 3 (stage is {stage})", "add --zero 3"))
    hpz = get_path(ds, "zero_optimization.zero_hpz_partition_size", 1)
    if isinstance(hpz, int) and hpz > 1:
        where = named(cfg, "hpz")
        if stage != 3:
            found.append(Problem(where, hpz, f"hpZ needs ZeRO stage 3 (stage is {stage})", "add --zero 3"))
        if nproc % hpz:
            found.append(Problem(where, hpz, f"the hpZ partition size must divide the processes per host ({nproc})",
                                 f"use a divisor of {nproc}"))
    found += _check_scheduler(cfg, ds)
    return found


def _check_nvme(cfg: TrainConfig, ds: Mapping[str, Any], kind: str, flag: str, stage: int) -> list[Problem]:
    found: list[Problem] = []
    if kind == "offload_optimizer" and stage != 3:
        found.append(Problem(flag, "nvme",
                             f"NVMe offload is a ZeRO-3 feature; at stage {stage} DeepSpeed silently keeps "
                             "the optimizer state in CPU memory instead",
                             "add --zero 3, or use --offload-optimizer cpu"))
    path = get_path(ds, f"zero_optimization.{kind}.nvme_path")
    if path is None:
        found.append(Problem(flag, "nvme", "NVMe offload needs a directory to write to",
                             "add --nvme-path /a/fast/local/disk"))
    elif not os.path.isdir(str(path)):
        found.append(Problem.about(cfg.nvme_path, "--nvme-path", f"zero_optimization.{kind}.nvme_path", path,
                             "the NVMe offload directory does not exist", f"create it: mkdir -p {path}"))
    return found


def _check_scheduler(cfg: TrainConfig, ds: Mapping[str, Any]) -> list[Problem]:
    kind = get_path(ds, "scheduler.type")
    if cfg.warmup_steps is not None and kind not in WARMUP_SCHEDULERS:
        return [Problem("--warmup-steps", cfg.warmup_steps,
                        "only the warmup, warmup_decay and warmup_cosine schedulers warm up "
                        f"({_scheduler_words(kind)})",
                        "add --scheduler warmup_cosine (or warmup, warmup_decay), or drop --warmup-steps")]
    if kind is None:
        return []
    known = tuple(SCHEDULER_TYPES.values())
    if kind not in known:
        return [Problem("scheduler.type", kind, "not a DeepSpeed scheduler",
                        f"use one of {', '.join(known)} (or --scheduler)")]
    total = get_path(ds, "scheduler.params.total_num_steps")
    warmup = get_path(ds, "scheduler.params.warmup_num_steps", DEEPSPEED_DEFAULT_WARMUP_STEPS)
    if kind in DECAYING_SCHEDULERS and isinstance(total, int) and isinstance(warmup, int) \
            and warmup > total:
        source = "--warmup-steps" if cfg.warmup_steps is not None else "DeepSpeed's default warmup_num_steps"
        return [Problem("--warmup-steps", warmup,
                        f"{source} ({warmup}) exceeds the run's {total} steps, so the LR never decays",
                        f"give --warmup-steps below {total}")]
    return []


def _scheduler_words(kind: Any) -> str:
    return f"the scheduler is {kind}" if kind else "no scheduler is set"


def _check_machine(cfg: TrainConfig, ds: Mapping[str, Any], machine: MachineFacts) -> list[Problem]:
    """Refuse what DeepSpeed cannot run on this machine, with the reason."""
    found: list[Problem] = []
    if machine.cuda:
        return found
    if get_path(ds, "fp16.enabled") is True:
        found.append(Problem.about(cfg.precision, "--precision", "fp16.enabled", "fp16",
                             "DeepSpeed supports fp16 only on CUDA devices "
                             "(\"Type fp16 is not supported on your device\"); this machine has no GPU",
                             "use --precision bf16 (or fp32)"))
    if str(get_path(ds, "optimizer.type", "")).lower() == "lamb":
        found.append(Problem(named(cfg, "optimizer"), "lamb",
                             "DeepSpeed's Lamb optimizer has no CPU implementation; "
                             "this machine has no GPU", "use --optimizer adamw (or adam, sgd)"))
    for key, name in (("zero_quantized_weights", "qwz"), ("zero_quantized_gradients", "qgz")):
        if get_path(ds, f"zero_optimization.{key}") is True:
            found.append(Problem.about(cfg.quant, "--quant", f"zero_optimization.{key}", name,
                                 f"ZeRO++ {name} uses CUDA kernels that DeepSpeed has no CPU "
                                 "version of; this machine has no GPU", "drop --quant (hpZ with --hpz runs on CPU)"))
    return found + _check_libaio(ds, machine)


def _check_device_count(cfg: TrainConfig, machine: MachineFacts, nproc: int) -> list[Problem]:
    """Refuse more processes than this machine shows GPUs: each rank needs one of its own.

    A CPU machine (no GPU visible) runs CPU processes, any number. A multi-node run's
    hosts are checked one by one when they are reached (`nbtrain.config.hosts.check_reachable`),
    SLURM nodes by `nbtrain.config.slurm.slurm_problems`: this machine's GPUs say nothing about theirs.
    """
    if not machine.cuda or not isinstance(nproc, int) or nproc <= machine.gpu_count \
            or cfg.hostfile is not None or cfg.hosts is not None or cfg.slurm:
        return []
    return [too_few_gpus(nproc, machine.gpu_count, machine.shown(), "make more GPUs visible")]


def _check_libaio(ds: Mapping[str, Any], machine: MachineFacts) -> list[Problem]:
    uses_nvme = any(get_path(ds, f"zero_optimization.{k}.device") == "nvme"
                    for k in ("offload_optimizer", "offload_param"))
    if uses_nvme and not machine.has_libaio:
        return [Problem("--offload-optimizer/--offload-param", "nvme",
                        "NVMe offload needs DeepSpeed's async_io op, which needs libaio",
                        "install it: apt-get install libaio-dev")]
    return []


def check_resume(cfg: TrainConfig, ds: Mapping[str, Any], nproc: int) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Find the checkpoint `--resume` continues; refuse one that is missing or cannot be loaded here."""
    from nbtrain.rundir.checkpoints import find_run, published

    if cfg.resume is None:
        return None, []
    root = Path(cfg.run_dir or DEFAULT_RUN_ROOT).resolve()
    run, why = find_run(root, cfg.resume)
    if run is None:
        return None, [Problem("--resume", cfg.resume, why,
                              "give a run id that `%bigtrain runs` lists, or 'latest'; check --run-dir")]
    saved = published(run)
    if saved is None:
        return None, [Problem("--resume", cfg.resume, f"run {run.name} has no published checkpoint (it ran without "
                              "--checkpoint-every, or ended before its first one)",
                              "resume a run that saved checkpoints, or drop --resume to start afresh")]
    problems = []
    stage = get_path(ds, "zero_optimization.stage", 0)
    if stage != saved.zero_stage:
        problems.append(Problem(named(cfg, "zero"), stage,
                                f"the checkpoint of run {run.name} was saved at ZeRO stage {saved.zero_stage}; "
                                "DeepSpeed loads optimizer state only into the stage that saved it",
                                f"use --zero {saved.zero_stage}"))
    if nproc != saved.world_size:
        why = ("DeepSpeed cannot load optimizer state partitioned over another number of ranks" if saved.zero_stage
               else "each rank resumes its own data position and RNG state")
        problems.append(Problem("--nproc", nproc, f"the checkpoint of run {run.name} was saved by "
                                f"{saved.world_size} processes; {why}", f"use --nproc {saved.world_size}"))
    target = {"run": str(run), "tag": saved.tag, "step": saved.step}
    return (None if problems else target), problems


def _check_bookkeeping(cfg: TrainConfig) -> list[Problem]:
    found: list[Problem] = []
    for name in cfg.out:
        if not name.isidentifier() or keyword.iskeyword(name):
            found.append(Problem("--out", name, "not a Python variable name", "list variable names: --out a,b"))
    if cfg.name is not None and not _NAME_RULE.match(cfg.name):
        found.append(Problem("--name", cfg.name, "run names use letters, digits, '_', '.', '-' (at most 64)",
                             "e.g. --name gpt2-zero3"))
    return found


def _check_slurm(cfg: TrainConfig) -> list[Problem]:
    """Refuse the SLURM flags (issue 17) without --slurm, outside Slurm's formats, or beside hosts."""
    found = flag_problems(cfg)
    if cfg.slurm:
        found += check_host_flags(cfg.hostfile, cfg.hosts, cfg.multinode_launcher, slurm=True)
    return found
