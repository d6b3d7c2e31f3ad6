"""%%bigtrain through a real kernel: real DeepSpeed on 2 CPU worker processes (gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import losses, only_run, status_of
from tests.kernel import Kernel

pytestmark = pytest.mark.integration

FIT_CELL = """
result = bigtrain.fit(make_model(), ToyData(), loss_fn=loss_fn)
state = result.state_dict
"""


def run_cell(kernel: Kernel, flags: str, cell: str = FIT_CELL, **kw) -> str:
    return kernel.execute(f"%%bigtrain {flags}\n{cell}", **kw).text


def test_fit_trains_binds_out_and_returns_a_run_result(kernel: Kernel, tmp_path: Path) -> None:
    out = kernel.execute("%%bigtrain --nproc 2 --steps 20 --micro-batch 8 --out state,note\n"
                         "note = f'rank {bigtrain.rank} of {bigtrain.world_size}'\n" + FIT_CELL)
    assert "succeeded" in out.value(), out.text
    # --out binds rank 0's values in the kernel.
    assert kernel.execute("print(note)").text.strip() == "rank 0 of 2"
    check = kernel.execute("r = _\nprint(sorted(state)[:2], r.status, len(r.metrics[r.metrics['rank'] == 0]))")
    assert check.text.strip() == "['0.bias', '0.weight'] succeeded 20", check.text
    run = only_run(tmp_path)
    loss = losses(run)
    assert len(loss) == 20 and loss[-1] < loss[0], f"loss did not go down: {loss}"
    timings = status_of(run)["timings"]
    assert 0 < timings["first_step_s"] < timings["total_s"]


def test_same_seed_gives_the_same_loss_at_every_zero_stage(kernel: Kernel, tmp_path: Path) -> None:
    sequences = {}
    for stage in (0, 1, 2, 3):
        run_cell(kernel, f"--nproc 2 --zero {stage} --steps 12 --micro-batch 8 --name zero{stage}")
    for run in sorted((tmp_path / "bigtrain-runs").iterdir()):
        sequences[run.name.split("-")[2]] = losses(run)
    reference = sequences["zero0"]
    for name, seq in sequences.items():
        worst = max(abs(a - b) for a, b in zip(seq, reference, strict=True))
        assert worst < 1e-5, f"{name} differs from ZeRO-0 by up to {worst:.2e}: {seq} vs {reference}"


def test_weights_from_fit_under_zero3_equal_those_under_zero0(kernel: Kernel) -> None:
    run_cell(kernel, "--nproc 2 --zero 0 --steps 6 --micro-batch 8 --out state")
    kernel.execute("state0 = state")
    run_cell(kernel, "--nproc 2 --zero 3 --steps 6 --micro-batch 8 --out state")
    diff = kernel.execute(
        "print(max((state[k] - state0[k]).abs().max().item() for k in state0), sorted(state) == sorted(state0))")
    worst, same_keys = diff.text.split()
    assert same_keys == "True" and float(worst) < 1e-5, diff.text


def test_hand_written_loop_and_names_from_earlier_cells(kernel: Kernel, tmp_path: Path) -> None:
    kernel.execute("SCALE = 0.5\ndef scaled(loss):\n    return loss * SCALE")
    cell = """
engine, loader = bigtrain.prepare(make_model(), ToyData())
for x, y in loader:
    loss = scaled(torch.nn.functional.cross_entropy(engine(x), y))
    engine.backward(loss)
    engine.step()
    bigtrain.log(loss=loss.item(), seen=len(x))
steps = engine.global_steps
"""
    run_cell(kernel, "--nproc 2 --zero 2 --epochs 2 --micro-batch 16 --out steps", cell)
    # 320 samples / 2 ranks / 16 per micro-batch = 10 steps per epoch.
    assert kernel.execute("print(steps)").text.strip() == "20"
    frame = kernel.execute("m = _.metrics\nprint(sorted(m['rank'].unique().tolist()), int(m['seen'].sum()))").text.split("]")
    assert frame[0] == "[0, 1" and int(frame[1]) == 640, frame


def test_progress_and_prints_reach_the_cell_while_it_runs(kernel: Kernel) -> None:
    cell = """
import time
for i in range(3):
    if bigtrain.is_main:
        print('tick', i, flush=True)
    time.sleep(1.0)
result = bigtrain.fit(make_model(), ToyData(), loss_fn=loss_fn)
"""
    # The text progress line (--no-plot); the dashboard's live updates are tested in test_dashboard.py.
    out = kernel.execute(f"%%bigtrain --nproc 2 --steps 200 --micro-batch 4 --no-plot\n{cell}")
    ticks = [m for m in out.messages if m.kind == "stream" and "tick" in m.text]
    updates = [m for m in out.messages if m.kind == "update_display_data" and "step" in m.text]
    end = out.messages[-1].time
    assert ticks and ticks[0].time < end - 2, "rank 0's prints arrived only at the end"
    assert len(updates) >= 2 and updates[0].time < end - 1, "the progress line did not update during the run"
    assert "[succeeded] step 200/200" in updates[-1].text
    assert not any("rank 1" in m.text for m in out.messages)  # other ranks' prints stay in their logs


def test_dry_run_json_is_what_the_engine_ran_with(kernel: Kernel, tmp_path: Path) -> None:
    flags = ("--nproc 2 --zero 2 --offload-optimizer cpu --micro-batch 8 --grad-accum 2 --lr 0.01 "
             "--scheduler warmup_decay --warmup-steps 3 --steps 8 --grad-clip 1.0 --set steps_per_print=1000")
    dry = kernel.execute(f"%%bigtrain {flags} --dry-run\nraise RuntimeError('must not run')").text
    assert not (tmp_path / "bigtrain-runs").exists(), "--dry-run started something"
    planned = json.loads(dry[dry.index("{"): dry.index("\n}\n") + 2])
    run_cell(kernel, flags)
    effective = json.loads((only_run(tmp_path) / "deepspeed.effective.json").read_text())
    ran = effective["config"]
    for key, value in planned.items():
        assert ran.get(key) == value, f"{key}: dry run said {value!r}, the engine ran with {ran.get(key)!r}"
    engine = effective["engine"]
    assert (engine["zero_stage"], engine["micro_batch"], engine["grad_accum"], engine["train_batch_size"]) == \
        (2, 8, 2, 32)


def test_a_kernel_with_torch_threads_and_its_own_process_group_still_runs(kernel: Kernel) -> None:
    kernel.execute("""
import threading, os, torch.distributed as dist
from nbtrain.launch.launcher import free_port
stop = threading.Event()
spinner = threading.Thread(target=lambda: stop.wait(), daemon=True); spinner.start()
os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()), RANK='0', WORLD_SIZE='1')
dist.init_process_group('gloo')
torch.ones(3) @ torch.ones(3)
""")
    out = run_cell(kernel, "--nproc 2 --steps 5 --micro-batch 8 --no-plot")
    assert "[succeeded] step 5/5" in out
    assert kernel.execute("print(dist.get_world_size(), spinner.is_alive())").text.strip() == "1 True"
