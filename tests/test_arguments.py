"""The `%%bigtrain` line: the frozen flag set, parsing, and the way back to a line."""

from __future__ import annotations

import dataclasses

import pytest

from nbtrain.config.arguments import build_parser, parse_line, to_line
from nbtrain.config.tree import TrainConfig, flag_name
from nbtrain.errors import ConfigError

# The public contract of DESIGN.md ("The %%bigtrain contract"). Notebooks, the config panel
# and users' muscle memory depend on these names: renaming one must fail here, loudly.
CONTRACT_FLAGS = {
    "--nproc", "--zero", "--offload-optimizer", "--offload-param", "--nvme-path", "--precision",
    "--micro-batch", "--grad-accum", "--grad-clip", "--optimizer", "--lr", "--weight-decay",
    "--scheduler", "--warmup-steps", "--steps", "--epochs", "--quant", "--hpz", "--qat", "--config",
    "--set", "--name", "--run-dir", "--out", "--background", "--no-plot", "--checkpoint-every",
    "--resume", "--hang-timeout", "--seed", "--dry-run", "--hostfile", "--hosts", "--multinode-launcher",
    "--cold", "--keep-warm",
    "--slurm", "--nodes", "--partition", "--time", "--account", "--gpus-per-node",  # issue 17
}
CONTRACT_CHOICES = {
    "--zero": [0, 1, 2, 3],
    "--offload-optimizer": ["none", "cpu", "nvme"],
    "--offload-param": ["none", "cpu", "nvme"],
    "--precision": ["fp32", "bf16", "fp16"],
    "--optimizer": ["adamw", "adam", "sgd", "lamb"],
    "--scheduler": ["none", "warmup", "warmup_decay", "warmup_cosine", "one_cycle", "lr_range_test"],
    "--quant": ["none", "qwz", "qgz", "qwz+qgz"],
    "--qat": ["none", "int8", "int4"],
    "--multinode-launcher": ["pdsh", "openmpi", "mvapich", "slurm", "standard"],
}


def _actions() -> dict[str, object]:
    return {opt: action for action in build_parser()._actions for opt in action.option_strings}


def test_the_parser_has_exactly_the_contract_flags() -> None:
    flags = set(_actions())
    assert flags == CONTRACT_FLAGS, (
        f"the %%bigtrain flags changed: added {sorted(flags - CONTRACT_FLAGS)}, "
        f"removed {sorted(CONTRACT_FLAGS - flags)}. Update DESIGN.md's contract and this list together.")


@pytest.mark.parametrize("flag", sorted(CONTRACT_CHOICES))
def test_choice_flags_offer_the_contract_choices(flag: str) -> None:
    assert list(_actions()[flag].choices) == CONTRACT_CHOICES[flag]  # type: ignore[attr-defined]


def test_every_flag_has_help_text() -> None:
    missing = [opt for opt, action in _actions().items() if not action.help]  # type: ignore[attr-defined]
    assert not missing, f"flags without help: {missing}"


def test_parse_line_types_the_values() -> None:
    cfg = parse_line("--nproc 2 --zero 3 --offload-optimizer cpu --lr 3e-4 --grad-clip 1 "
                     "--out model_state,losses --set a.b=1 --set c=x --dry-run")
    assert cfg == TrainConfig(nproc=2, zero=3, offload_optimizer="cpu", lr=3e-4, grad_clip=1.0,
                              out=("model_state", "losses"), set=("a.b=1", "c=x"), dry_run=True)


def test_an_empty_line_sets_nothing() -> None:
    assert parse_line("") == TrainConfig()
    assert TrainConfig().given() == {}


def test_resume_alone_means_latest() -> None:
    assert parse_line("--resume").resume == "latest"
    assert parse_line("--resume 20261125-083705-gpt2-c302").resume == "20261125-083705-gpt2-c302"


def test_a_negative_number_is_a_value_not_a_flag() -> None:
    # argparse alone reads '-1e-3' as an unknown flag and says "expected one argument".
    assert parse_line("--lr -1e-3").lr == -1e-3
    assert parse_line("--micro-batch -1").micro_batch == -1


def test_quoted_values_keep_their_spaces() -> None:
    cfg = parse_line("""--nvme-path "/mnt/fast disk" --set 'optimizer.params.betas=[0.9, 0.95]'""")
    assert cfg.nvme_path == "/mnt/fast disk"
    assert cfg.set == ("optimizer.params.betas=[0.9, 0.95]",)


def test_an_unclosed_quote_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        parse_line("--name 'oops")
    assert "close the quote" in str(err.value)


def test_every_argparse_mistake_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse_line("--lr abc --zero 5 --bogus 3 --steps 10")
    found = {(p.where, str(p.value)) for p in err.value.problems}
    assert found == {("--lr", "abc"), ("--zero", "5"), ("--bogus", "--bogus 3")}, err.value


@pytest.mark.parametrize("line", [
    "",
    "--nproc 2 --zero 3 --offload-optimizer cpu --precision bf16 --lr 0.0003 --scheduler warmup_cosine "
    "--warmup-steps 20 --steps 200 --out model_state",
    "--set 'optimizer.params.betas=[0.9, 0.95]' --set steps_per_print=5 --name my.run-1",
    "--nvme-path '/mnt/fast disk' --offload-param nvme --zero 3 --hosts a,b --resume",
    "--dry-run --no-plot --background --config ds.json --run-dir /tmp/runs --seed 7",
])
def test_to_line_and_parse_line_round_trip(line: str) -> None:
    cfg = parse_line(line)
    assert parse_line(to_line(cfg)) == cfg, to_line(cfg)


def test_the_slurm_flags_set_their_fields_and_the_long_form_means_slurm() -> None:
    # Issue 17: the launcher reads config.slurm, config.nodes ... whichever form the user wrote.
    cfg = parse_line("--slurm --nodes 2 --partition gpu --time 2:00:00 --account proj --gpus-per-node 4")
    assert (cfg.slurm, cfg.nodes, cfg.partition, cfg.time_limit, cfg.account, cfg.gpus_per_node) == \
        (True, 2, "gpu", "2:00:00", "proj", 4)
    assert parse_line("--multinode-launcher slurm").slurm is True
    assert parse_line("--multinode-launcher pdsh").slurm is False
    assert flag_name("time_limit") == "--time"


def test_every_field_survives_the_round_trip() -> None:
    # A non-default value in every field: a new field that to_line forgets fails here.
    samples = {"int": 3, "float": 0.25, "str": "x y", "bool": True}
    values = {}
    for f in dataclasses.fields(TrainConfig):
        action = _actions()[flag_name(f.name)]
        choices = getattr(action, "choices", None)
        if choices:
            values[f.name] = list(choices)[-1]
        elif f.name in ("set",):
            values[f.name] = ("a.b=[1, 2]", "c=d")
        elif f.name in ("out", "hosts"):
            values[f.name] = ("a", "b")
        else:
            kind = str(f.type).split(" ")[0]
            values[f.name] = samples[kind]
    cfg = TrainConfig(**values)
    assert parse_line(to_line(cfg)) == cfg, to_line(cfg)
