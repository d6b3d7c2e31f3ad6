"""Bad input is refused before anything starts, with every problem named at once.

Each row of BAD_INPUT is a `%%bigtrain` line (and optionally a DeepSpeed config file's
dict and the machine) that `plan_run` -- the last step before the launcher -- must refuse,
with a problem naming the expected flag or key and a fragment of the rule or fix.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest

from nbtrain.config.arguments import parse_line
from nbtrain.config.deepspeed_rules import check_batch
from nbtrain.config.machine import MachineFacts
from nbtrain.config.plan import plan_run
from nbtrain.config.render import ZERO_TESTED_OPTIMIZERS, render, resolve_batch
from nbtrain.config.tree import TrainConfig
from nbtrain.config.validate import check
from nbtrain.errors import ConfigError, Problem

CPU = MachineFacts(gpu_count=0, has_libaio=True)
GPU = MachineFacts(gpu_count=8, has_libaio=True)


@dataclass(frozen=True)
class Bad:
    line: str
    where: str  # the flag or dotted key the problem must name
    says: str  # a fragment of the problem's rule or fix
    base: dict[str, Any] | None = None
    machine: MachineFacts = field(default=CPU)


BAD_INPUT: dict[str, Bad] = {
    # -- impossible combinations ------------------------------------------------------
    "param offload below stage 3": Bad("--zero 2 --offload-param cpu", "--offload-param", "needs ZeRO stage 3"),
    "param offload below stage 3, from the file": Bad(
        "", "zero_optimization.offload_param.device", "needs ZeRO stage 3",
        base={"zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}}),
    "optimizer offload at stage 0": Bad("--offload-optimizer cpu", "--offload-optimizer", "stage 1, 2 or 3"),
    "fp16 with bf16 via --set": Bad("--set bf16.enabled=true --set fp16.enabled=true", "bf16.enabled/fp16.enabled",
                                    "cannot both be enabled", machine=GPU),
    "fp16 from --set with bf16 from the file": Bad("--set fp16.enabled=true", "bf16.enabled/fp16.enabled",
                                                   "cannot both be enabled", base={"bf16": {"enabled": True}},
                                                   machine=GPU),
    "nvme without a path": Bad("--zero 3 --offload-optimizer nvme", "--offload-optimizer", "--nvme-path"),
    "nvme below stage 3": Bad("--zero 2 --offload-optimizer nvme --nvme-path /tmp", "--offload-optimizer",
                              "silently keeps the optimizer state in CPU memory"),
    "nvme path missing": Bad("--zero 3 --offload-param nvme --nvme-path /no/such/dir", "--nvme-path",
                             "mkdir -p /no/such/dir"),
    "nvme without libaio": Bad("--zero 3 --offload-optimizer nvme --nvme-path /tmp",
                               "--offload-optimizer/--offload-param", "libaio-dev",
                               machine=MachineFacts(gpu_count=0, has_libaio=False)),
    "qwz on CPU": Bad("--zero 3 --quant qwz", "--quant", "no CPU version"),
    "qgz on CPU": Bad("--zero 3 --quant qgz", "--quant", "no CPU version"),
    "qwz from the file on CPU": Bad("--zero 3", "zero_optimization.zero_quantized_weights", "no CPU version",
                                    base={"zero_optimization": {"zero_quantized_weights": True}}),
    "qwz below stage 3": Bad("--zero 2 --quant qwz", "--quant", "needs ZeRO stage 3", machine=GPU),
    "qgz below stage 3": Bad("--zero 1 --quant qwz+qgz", "--quant", "qgz needs ZeRO stage 3", machine=GPU),
    "hpz not dividing nproc": Bad("--nproc 2 --zero 3 --hpz 3", "--hpz", "must divide the processes per host (2)"),
    "hpz below stage 3": Bad("--nproc 2 --zero 2 --hpz 2", "--hpz", "hpZ needs ZeRO stage 3"),
    "lamb on CPU": Bad("--optimizer lamb", "--optimizer", "no CPU implementation"),
    "lamb from the file on CPU": Bad("", "optimizer.type", "no CPU implementation",
                                     base={"optimizer": {"type": "Lamb", "params": {"lr": 0.1}}}),
    "fp16 on CPU": Bad("--precision fp16", "--precision", "only on CUDA"),
    "fp16 from the file on CPU": Bad("", "fp16.enabled", "only on CUDA", base={"fp16": {"enabled": True}}),
    "warmup longer than the run": Bad("--scheduler warmup_cosine --steps 10", "--warmup-steps",
                                      "DeepSpeed's default warmup_num_steps (1000) exceeds the run's 10 steps"),
    "warmup steps without a scheduler": Bad("--warmup-steps 10", "--warmup-steps", "no scheduler is set"),
    "warmup steps with one_cycle": Bad("--scheduler one_cycle --warmup-steps 10 --steps 20", "--warmup-steps",
                                       "the scheduler is OneCycle"),
    "unknown scheduler type": Bad("--set scheduler.type=Cosine", "scheduler.type", "not a DeepSpeed scheduler"),
    "ZeRO stage 5 in the file": Bad("", "zero_optimization.stage", "must be 0, 1, 2 or 3",
                                    base={"zero_optimization": {"stage": 5}}),
    "offload to the GPU in the file": Bad(
        "--zero 2", "zero_optimization.offload_optimizer.device", "none, cpu or nvme",
        base={"zero_optimization": {"offload_optimizer": {"device": "gpu"}}}),
    "a flag and a --set disagree": Bad("--zero 2 --set zero_optimization.stage=3", "--set zero_optimization.stage",
                                       "--zero already sets zero_optimization.stage to 2"),
    # -- misspelt DeepSpeed keys (DeepSpeed would ignore them silently) ----------------
    "misspelt top-level key": Bad("--set gradient_acumulation_steps=2", "gradient_acumulation_steps",
                                  "did you mean 'gradient_accumulation_steps'?"),
    "misspelt top-level key in the file": Bad("", "train_micro_batch_size_per_gu",
                                              "did you mean 'train_micro_batch_size_per_gpu'?",
                                              base={"train_micro_batch_size_per_gu": 4}),
    "misspelt zero_optimization key": Bad(
        "--zero 3 --set zero_optimization.stage3_prefetch_bucket_sze=5e7",
        "zero_optimization.stage3_prefetch_bucket_sze", "did you mean 'stage3_prefetch_bucket_size'?"),
    "misspelt offload_optimizer key": Bad(
        "--zero 2 --offload-optimizer cpu --set zero_optimization.offload_optimizer.pin_memroy=true",
        "zero_optimization.offload_optimizer.pin_memroy", "did you mean 'pin_memory'?"),
    "misspelt bf16 key": Bad("--precision bf16 --set bf16.enabeld=true", "bf16.enabeld", "did you mean 'enabled'?"),
    "scheduler param of another scheduler": Bad(
        "--scheduler warmup --set scheduler.params.total_num_steps=5", "scheduler.params.total_num_steps",
        "no key under scheduler.params"),
    "misspelt scheduler param": Bad(
        "--scheduler warmup_cosine --steps 100 --warmup-steps 5 --set scheduler.params.cos_min_ration=0.1",
        "scheduler.params.cos_min_ration", "did you mean 'cos_min_ratio'?"),
    "optimizer param of another optimizer": Bad(
        "--optimizer sgd --set optimizer.params.betas=[0.9,0.99]", "optimizer.params.betas",
        "no key under optimizer.params"),
    "misspelt adam param": Bad("--set optimizer.params.weight_decya=0.1", "optimizer.params.weight_decya",
                               "did you mean 'weight_decay'?"),
    "removed DeepSpeed feature": Bad("--set amp.enabled=true", "amp", "Apex AMP integration has been removed"),
    # -- malformed or non-positive values -------------------------------------------------
    "zero steps": Bad("--steps 0", "--steps", "greater than 0"),
    "negative micro-batch": Bad("--micro-batch -1", "--micro-batch", "greater than 0"),
    "zero micro-batch in the file": Bad("", "train_micro_batch_size_per_gpu", "greater than 0",
                                        base={"train_micro_batch_size_per_gpu": 0}),
    "micro-batch as text in the file": Bad("", "train_micro_batch_size_per_gpu", "whole number",
                                           base={"train_micro_batch_size_per_gpu": "8"}),
    "zero grad-accum": Bad("--grad-accum 0", "--grad-accum", "greater than 0"),
    "zero processes": Bad("--nproc 0", "--nproc", "greater than 0"),
    "zero epochs": Bad("--epochs 0", "--epochs", "greater than 0"),
    "lr not a number": Bad("--lr abc", "--lr", "'abc' is not a number"),
    "zero lr": Bad("--lr 0", "--lr", "greater than 0"),
    "negative lr": Bad("--lr -1e-3", "--lr", "greater than 0"),
    "lr as text through --set": Bad("--set optimizer.params.lr=fast", "optimizer.params.lr", "must be a number"),
    "negative weight decay": Bad("--weight-decay -0.1", "--weight-decay", "0 or more"),
    "negative grad clip": Bad("--grad-clip -1", "--grad-clip", "0 or more"),
    "negative seed": Bad("--seed -1", "--seed", "0 or more"),
    "steps not a whole number": Bad("--steps 2.5", "--steps", "'2.5' is not a whole number"),
    "ZeRO stage not a choice": Bad("--zero 4", "--zero", "invalid choice"),
    "precision not a choice": Bad("--precision fp64", "--precision", "invalid choice"),
    "unknown flag": Bad("--zeroo 3", "--zeroo", "unknown flag"),
    "a word that is no flag": Bad("zero=3", "zero=3", "unknown flag"),
    "a flag without its value": Bad("--steps", "--steps", "expected one argument"),
    "bad --set syntax": Bad("--set zero_optimization.stage", "--set", "dotted.key=value"),
    "--steps with --epochs": Bad("--steps 10 --epochs 2", "--epochs", "give --steps or --epochs, not both"),
    "--out not an identifier": Bad("--out model,1st", "--out", "not a Python variable name"),
    "--out a keyword": Bad("--out class", "--out", "not a Python variable name"),
    "--name with a space": Bad("--name 'my run'", "--name", "letters, digits"),
    "unclosed quote": Bad("--name 'my run", "%%bigtrain", "close the quote"),
    # -- flags that parse but whose feature comes later ----------------------------------
    "--hang-timeout 0": Bad("--hang-timeout 0", "--hang-timeout", "greater than 0"),
    "--resume a run that does not exist": Bad("--resume 20261125-083705-gpt2-c302 --run-dir /no/such/root",
                                              "--resume", "no run '20261125-083705-gpt2-c302' under /no/such/root"),
    "--resume latest without any run": Bad("--resume --run-dir /no/such/root", "--resume",
                                           "no run under /no/such/root has a published checkpoint"),
    # -- multi-node (reachability is checked at launch: tests/test_multinode.py) -----------
    "--hosts with --hostfile": Bad("--hosts a,b --hostfile hosts.txt", "--hosts", "not both"),
    "--hostfile missing": Bad("--hostfile /no/such/hosts.txt", "--hostfile", "no such file"),
    "--hosts with a bad name": Bad("--hosts a,-b", "--hosts", "would be misread by ssh or pdsh"),
    "--multinode-launcher without hosts": Bad("--multinode-launcher pdsh", "--multinode-launcher",
                                              "nothing to launch on without hosts"),
    # --multinode-launcher slurm is --slurm (issue 17): SLURM, not named hosts, places the workers.
    "--multinode-launcher slurm with hosts": Bad("--hosts a,b --multinode-launcher slurm", "--hosts",
                                                 "--multinode-launcher slurm runs on the nodes SLURM allocates"),
    "--checkpoint-every 0": Bad("--checkpoint-every 0", "--checkpoint-every", "greater than 0"),
    # -- DeepSpeed's batch rule: train_batch_size = micro-batch x grad-accum x world size -----
    "batch sizes that do not multiply out (issue 15)": Bad(
        "--nproc 2 --set train_batch_size=7 --micro-batch 2 --grad-accum 2", "train_batch_size",
        "micro-batch x grad-accum x world size, but 2 x 2 x 2 = 8 (world size 2: --nproc 2). "
        "Fix: set train_batch_size=8 (or drop it: DeepSpeed derives it)"),
    "global batch that no micro-batch reaches": Bad(
        "--nproc 2 --set train_batch_size=12 --micro-batch 2 --grad-accum 2", "train_batch_size",
        "keep it with --micro-batch 3; keep it with --grad-accum 3; keep it with --nproc 3"),
    "global batch with a micro-batch, grad-accum derived": Bad(
        "--nproc 2 --micro-batch 2", "train_batch_size", "gradient_accumulation_steps = train_batch_size / "
        "(micro-batch x world size) = 7 / (2 x 2), which is not a whole number", base={"train_batch_size": 7}),
    "global batch with grad-accum, micro-batch derived": Bad(
        "--nproc 2 --grad-accum 3", "train_batch_size", "8 / (3 x 2), which is not a whole number of at least 1",
        base={"train_batch_size": 8}),
    "global batch alone, not a multiple of the processes": Bad(
        "--nproc 2", "train_batch_size", "7 / 2 (with grad-accum 1)", base={"train_batch_size": 7}),
    "global batch smaller than the processes": Bad(
        "--nproc 4", "train_batch_size", "set train_batch_size to a multiple of 4, e.g. 4",
        base={"train_batch_size": 2}),
    "global batch over several hosts": Bad(
        "--nproc 2 --hosts a,b --set train_batch_size=8 --micro-batch 2 --grad-accum 2", "train_batch_size",
        "2 x 2 x 4 = 16 (world size 4: --nproc 2 on each of 2 hosts)"),
    "global batch of 0": Bad("--set train_batch_size=0", "train_batch_size", "greater than 0"),
    # -- DeepSpeed's other checks at initialize (nbtrain/config/deepspeed_rules.py) ---------------
    "warm-up of 0 steps": Bad("--scheduler warmup --warmup-steps 0", "--warmup-steps", "greater than 0"),
    "warm-up of 0 steps in the file": Bad(
        "", "scheduler.params.warmup_num_steps", "WarmupLR needs warmup_num_steps to be a whole number greater than 0",
        base={"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}}),
    "unknown warm-up curve": Bad(
        "--scheduler warmup_cosine --steps 100 --warmup-steps 5 --set scheduler.params.warmup_type=cosine",
        "scheduler.params.warmup_type", "it would silently use log"),
    "LR range test step size 0": Bad(
        "--scheduler lr_range_test --steps 10 --set scheduler.params.lr_range_test_step_size=0",
        "scheduler.params.lr_range_test_step_size", "LRRangeTest needs lr_range_test_step_size"),
    "one cycle with an empty first half": Bad(
        "--scheduler one_cycle --steps 10 --set scheduler.params.cycle_first_step_size=0",
        "scheduler.params.cycle_first_step_size", "first half must last more than 0 steps"),
    "one cycle with a negative second half": Bad(
        "--scheduler one_cycle --steps 10 --set scheduler.params.cycle_second_step_size=-5",
        "scheduler.params.cycle_second_step_size", "second half cannot be negative"),
    "fp16 master weights without ZeRO": Bad(
        "--precision fp16 --set fp16.fp16_master_weights_and_grads=true", "fp16.fp16_master_weights_and_grads",
        "only in its ZeRO optimizer (stage 1, 2 or 3; stage is 0)", machine=GPU),
    "bf16 master weights without ZeRO": Bad(
        "--precision bf16 --set bf16.bf16_master_weights_and_grads=true", "bf16.bf16_master_weights_and_grads",
        "add --zero 1 (or 2, 3)"),
    "bf16 optimizer states without bf16 master weights": Bad(
        "--zero 2 --precision bf16 --set bf16.bf16_optimizer_states=true", "bf16.bf16_optimizer_states",
        "bf16 optimizer states need bf16 master weights"),
    "negative fp16 loss scale": Bad("--precision fp16 --set fp16.loss_scale=-1", "fp16.loss_scale",
                                    "a number of 0 or more", machine=GPU),
    "dynamic loss scaling with a window of 0": Bad(
        "--precision fp16 --set fp16.loss_scale_window=0", "fp16.loss_scale_window",
        "dynamic loss scaling (loss_scale 0) needs loss_scale_window > 0", machine=GPU),
    "dynamic loss scaling with a minimum scale of 0": Bad(
        "--precision fp16 --set fp16.min_loss_scale=0", "fp16.min_loss_scale", "needs min_loss_scale > 0",
        machine=GPU),
    "gradient norm skipped at stage 3": Bad(
        "--zero 3 --set zero_optimization.compute_grad_norm=false", "zero_optimization.compute_grad_norm",
        "only at ZeRO stage 1 or 2 (stage is 3)"),
    "partial optimizer offload below stage 3": Bad(
        "--zero 2 --offload-optimizer cpu --set zero_optimization.offload_optimizer.ratio=0.5",
        "zero_optimization.offload_optimizer.ratio", "partial optimizer offload (ratio below 1) needs ZeRO stage 3"),
    "summed gradients at stage 3": Bad("--zero 3 --set gradient_allreduce_op=sum", "gradient_allreduce_op",
                                       "does not support summed gradients with ZeRO stage 3"),
    "gradients reduced by max": Bad("--set gradient_allreduce_op=max", "gradient_allreduce_op",
                                    "'mean' or 'sum' only"),
    "max_grad_norm as an optimizer parameter": Bad(
        "--set optimizer.params.max_grad_norm=1.0", "optimizer.params.max_grad_norm", "use --grad-clip 1.0"),
    "an optimizer type torch spells otherwise": Bad("--set optimizer.type=sgd", "optimizer.type",
                                                    "did you mean 'SGD'?"),
    "an optimizer type DeepSpeed cannot build": Bad("", "optimizer.type", "did you mean 'adamw'?",
                                                    base={"optimizer": {"type": "AdamW8bit"}}),
    "an untested optimizer under ZeRO, not allowed": Bad(
        "--optimizer sgd --zero 2 --set zero_allow_untested_optimizer=false", "--optimizer",
        "only with its tested optimizers"),
}


def problems_of(line: str, base: dict[str, Any] | None = None, machine: MachineFacts = CPU) -> list[Problem]:
    """Return the problems the magic would show for this line (none: it would launch)."""
    try:
        plan_run(parse_line(line), machine, base)
    except ConfigError as e:
        return list(e.problems)
    return []


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_refused_naming_the_flag_and_the_rule(case: str) -> None:
    bad = BAD_INPUT[case]
    problems = problems_of(bad.line, bad.base, bad.machine)
    assert problems, f"`%%bigtrain {bad.line}` (file {bad.base}) was accepted"
    named = [p for p in problems if p.where == bad.where]
    assert named, f"no problem names {bad.where!r}: {[str(p) for p in problems]}"
    assert any(bad.says in f"{p.rule}. Fix: {p.fix}" for p in named), \
        f"expected {bad.says!r} in {[str(p) for p in named]}"


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_every_problem_says_what_where_why_and_how_to_fix(case: str) -> None:
    bad = BAD_INPUT[case]
    for problem in problems_of(bad.line, bad.base, bad.machine):
        text = str(problem)
        assert text.startswith(f"{problem.where} = {problem.value!r}: "), text
        assert len(problem.rule) > 10 and len(problem.fix) > 5, f"vague problem: {text}"


def test_the_launch_resume_and_qat_flags_parse_with_their_values() -> None:
    # These were once refused as "not available yet" (NOT_AVAILABLE_YET, now gone): they run.
    cfg = parse_line("--background --resume --qat int8 --hosts a,b --checkpoint-every 5")
    assert (cfg.background, cfg.resume, cfg.qat, cfg.hosts, cfg.checkpoint_every) == \
        (True, "latest", "int8", ("a", "b"), 5)


def test_none_values_of_optional_features_are_no_problem() -> None:
    assert problems_of("--qat none --quant none --offload-optimizer none --offload-param none") == []


def test_config_error_carries_every_problem_at_once() -> None:
    problems = problems_of("--zero 2 --offload-param cpu --steps 0 --out 1x")
    assert [p.where for p in problems] == ["--steps", "--offload-param", "--out"], [str(p) for p in problems]


def test_set_problems_and_validation_problems_come_together() -> None:
    problems = problems_of("--set nonsense --lr 0 --set gradient_acumulation_steps=2 --zero 1 "
                           "--set zero_optimization.stage=2")
    wheres = sorted(p.where for p in problems)
    assert wheres == ["--lr", "--set", "--set zero_optimization.stage", "gradient_acumulation_steps"], \
        [str(p) for p in problems]


def test_the_error_message_lists_each_problem_and_says_nothing_started() -> None:
    with pytest.raises(ConfigError) as err:
        plan_run(parse_line("--steps 0 --micro-batch 0 --lr 0"), CPU)
    message = str(err.value)
    assert message.startswith("3 problems in the %%bigtrain settings (nothing was started):")
    assert message.count("\n  - ") == 3


def test_a_good_line_has_no_problems_on_cpu() -> None:
    line = ("--nproc 2 --zero 3 --offload-optimizer cpu --offload-param cpu --precision bf16 --lr 3e-4 "
            "--scheduler warmup_cosine --warmup-steps 20 --steps 200 --hpz 2 --out model_state --name gpt2-z3")
    assert problems_of(line) == []


def test_what_the_gpu_can_run_is_allowed_there() -> None:
    assert problems_of("--zero 3 --quant qwz+qgz --precision fp16 --optimizer lamb", machine=GPU) == []


def test_nvme_at_stage_3_with_a_real_directory_is_allowed(tmp_path: Any) -> None:
    assert problems_of(f"--zero 3 --offload-optimizer nvme --offload-param nvme --nvme-path {tmp_path}") == []


def test_check_is_pure_and_does_not_raise() -> None:
    cfg = TrainConfig(steps=0)
    problems = check(cfg, render(cfg).deepspeed, CPU, nproc=2)
    assert [p.where for p in problems] == ["--steps"]


def test_marker_values_from_the_dataloader_are_not_problems() -> None:
    cfg = TrainConfig(scheduler="warmup_decay", warmup_steps=3)  # total steps known only in the workers
    assert check(cfg, render(cfg).deepspeed, CPU, nproc=2) == []


# -- DeepSpeed's batch rule, against DeepSpeed itself ------------------------------------------------

def test_the_batch_rule_agrees_with_deepspeed_on_every_small_combination(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_batch refuses exactly what DeepSpeedConfig asserts on, and resolve_batch derives what it derives."""
    from deepspeed.runtime import config as ds_config

    world = {"size": 1}
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: world["size"])
    checked = 0
    for total, micro, accum, size in itertools.product([None, 1, 2, 3, 4, 6, 7, 8, 12], [None, 1, 2, 3, 4],
                                                       [None, 1, 2, 3], [1, 2, 3, 4]):
        given = {k: v for k, v in (("train_batch_size", total), ("train_micro_batch_size_per_gpu", micro),
                                   ("gradient_accumulation_steps", accum)) if v is not None}
        if total is None and micro is None:
            continue  # nbtrain always gives a micro-batch (or takes it from the DataLoader)
        world["size"] = size
        try:
            ds = ds_config.DeepSpeedConfig(dict(given))
            derived = (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps)
        except AssertionError:
            derived = None
        ours = check_batch(TrainConfig(), given, size)
        assert (derived is None) == bool(ours), f"{given} on {size} ranks: DeepSpeed {derived}, nbtrain {ours}"
        if derived is not None and total is not None:
            resolved = resolve_batch(given, size)
            assert tuple(resolved[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                               "gradient_accumulation_steps")) == derived, given
        checked += 1
    assert checked > 500


def test_a_config_with_only_train_batch_size_runs_with_deepspeeds_split() -> None:
    # Before: nbtrain added grad-accum 1 and the DataLoader's micro-batch, and DeepSpeed then
    # failed in the workers unless they happened to multiply out.
    plan = plan_run(parse_line("--nproc 2"), CPU, {"train_batch_size": 32})
    assert (plan.deepspeed["train_micro_batch_size_per_gpu"], plan.deepspeed["gradient_accumulation_steps"]) == (16, 1)
    plan = plan_run(parse_line("--nproc 2 --micro-batch 4"), CPU, {"train_batch_size": 32})
    assert plan.deepspeed["gradient_accumulation_steps"] == 4


def test_the_magic_refuses_the_batch_before_anything_starts(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's line through the real magic (plan_run): refused, no run directory, no worker, the cell never ran."""
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell


    monkeypatch.chdir(tmp_path)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nbtrain")
    line = "--nproc 2 --set train_batch_size=7 --micro-batch 2 --grad-accum 2"
    with pytest.raises(UsageError) as err:
        shell.run_cell_magic("bigtrain", line, "open('the-cell-ran', 'w').close()")
    assert "train_batch_size = 7" in str(err.value) and "2 x 2 x 2 = 8" in str(err.value)
    assert str(err.value).startswith("1 problem in the %%bigtrain settings (nothing was started)")
    assert list(tmp_path.iterdir()) == [], "a run directory or the cell's file appeared"
    assert shell.magics_manager.registry["BigTrainMagics"].state.pool.describe() == [], "workers were started"


def test_an_untested_optimizer_under_zero_is_allowed_as_deepspeed_needs() -> None:
    """render() adds zero_allow_untested_optimizer exactly for the types DeepSpeed's ZeRO has not tested."""
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    from deepspeed.ops.lamb import FusedLamb
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    # The classes DeepSpeed builds for each type (engine._configure_basic_optimizer).
    built = {"adam": [FusedAdam, DeepSpeedCPUAdam, torch.optim.Adam], "adamw": [FusedAdam, torch.optim.AdamW],
             "adagrad": [torch.optim.Adagrad], "lamb": [FusedLamb], "sgd": [torch.optim.SGD]}
    for kind, classes in built.items():
        tested = all(cls in ZERO_SUPPORTED_OPTIMIZERS for cls in classes)
        assert (kind in ZERO_TESTED_OPTIMIZERS) == tested, kind
        ds = render(TrainConfig(zero=2), {"optimizer": {"type": kind, "params": {"lr": 0.1}}}).deepspeed
        assert ds.get("zero_allow_untested_optimizer") is (None if tested else True), kind
    assert problems_of("--zero 3 --optimizer lamb", machine=GPU) == []
