"""Checkpoints and `--resume`: published atomically, refused when they cannot load, resumed exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from nbtrain.config.arguments import parse_line
from nbtrain.config.machine import MachineFacts
from nbtrain.config.plan import plan_run
from nbtrain.errors import ConfigError
from nbtrain.rundir.checkpoints import find_run, published
from nbtrain.worker.data import MicroBatchLoader
from tests.conftest import status_of, worker_processes
from tests.kernel import Kernel

CPU = MachineFacts(gpu_count=0, has_libaio=True)


def fake_run(root: Path, run_id: str, *, tag: str | None = "step-10", world_size: int = 2, stage: int = 2,
             folder: bool = True) -> Path:
    """Write a run directory as nbtrain leaves it (only the parts `--resume` reads)."""
    run = root / run_id
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"run_id": run_id}))
    if tag is not None:
        if folder:
            (run / "checkpoints" / tag).mkdir()
        (run / "checkpoints" / "latest.json").write_text(json.dumps(
            {"tag": tag, "step": 10, "world_size": world_size, "zero_stage": stage}))
    return run


def refusal(line: str) -> str:
    with pytest.raises(ConfigError) as caught:
        plan_run(parse_line(line), CPU)
    return str(caught.value)


def test_latest_is_the_newest_run_with_a_published_checkpoint(tmp_path: Path) -> None:
    older = fake_run(tmp_path, "20261125-080000-a-0001")
    fake_run(tmp_path, "20261125-090000-b-0002", tag=None)  # newer, but never checkpointed
    fake_run(tmp_path, "20261125-100000-c-0003", folder=False)  # pointer to a folder that is gone
    assert find_run(tmp_path, "latest") == (older, "")
    saved = published(older)
    assert saved is not None and (saved.tag, saved.step, saved.world_size, saved.zero_stage) == ("step-10", 10, 2, 2)


def test_resume_plans_the_checkpoint_it_continues(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "20261125-080000-a-0001")
    plan = plan_run(parse_line(f"--resume --run-dir {tmp_path} --zero 2 --nproc 2"), CPU)
    assert plan.resume_from == {"run": str(run), "tag": "step-10", "step": 10}
    assert any("resuming run 20261125-080000-a-0001 from its checkpoint at step 10" in n for n in plan.notices)


def test_resume_is_refused_where_deepspeed_cannot_load_the_checkpoint(tmp_path: Path) -> None:
    fake_run(tmp_path, "20261125-080000-a-0001")
    shown = refusal(f"--resume 20261125-080000-a-0001 --run-dir {tmp_path} --zero 3 --nproc 4")
    assert "--zero = 3: the checkpoint of run 20261125-080000-a-0001 was saved at ZeRO stage 2" in shown, shown
    assert "Fix: use --zero 2" in shown and "Fix: use --nproc 2" in shown, shown
    assert "partitioned over another number of ranks" in shown


def test_resume_of_a_run_without_checkpoints_is_refused(tmp_path: Path) -> None:
    fake_run(tmp_path, "20261125-080000-a-0001", tag=None)
    shown = refusal(f"--resume 20261125-080000-a-0001 --run-dir {tmp_path}")
    assert "has no published checkpoint" in shown and "drop --resume" in shown, shown


def trace(loader: MicroBatchLoader, stop_after: int | None = None) -> tuple[list[Any], dict[str, Any]]:
    """Return the batches and per-batch RNG draws (like dropout) of `loader`, and its state when stopped."""
    seen: list[Any] = []
    for i, batch in enumerate(loader):
        seen.append((batch, torch.rand(1).item()))
        if stop_after is not None and i + 1 == stop_after:
            return seen, {"micro_batches": loader.position, "epoch_rng": loader.epoch_rng,
                          "rng": torch.get_rng_state()}
    return seen, {}


@pytest.mark.parametrize("kind", ["dataset", "shuffling-dataloader"])
def test_a_resumed_loader_yields_exactly_the_rest_of_the_run(kind: str) -> None:
    data = torch.utils.data.TensorDataset(torch.arange(40.0))

    def make(**resume: Any) -> MicroBatchLoader:
        source = data if kind == "dataset" else torch.utils.data.DataLoader(data, batch_size=2, shuffle=True)
        return MicroBatchLoader(source, rank=1, world_size=2, micro_batch=2, grad_accum=3, max_steps=9, seed=5,
                                **resume)

    torch.manual_seed(0)
    whole, _ = trace(make())
    torch.manual_seed(0)
    first, state = trace(make(), stop_after=12)  # 12 of 27 micro-batches: mid-epoch 1 (10 per epoch)
    torch.set_rng_state(state["rng"])  # what the checkpoint restores last
    rest, _ = trace(make(start=state["micro_batches"], epoch_rng=state["epoch_rng"]))
    assert len(whole) == 27 and len(rest) == 15
    assert repr(first + rest) == repr(whole), "the resumed loader must continue the same batches and RNG draws"


# -- real runs -------------------------------------------------------------------------------
DROPOUT_MODEL = '''
def make_dropout_model():
    # Dropout draws from the torch RNG every step: a resume without the RNG state would differ.
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(32, 4))
'''
# 320 samples, 2 ranks, micro-batch 4: 40 micro-batches per rank and epoch, 3 per step, so step
# 10 ends mid-epoch and steps 11-20 cross into the next epoch.
FLAGS = ("--nproc 2 --steps 20 --micro-batch 4 --grad-accum 3 --zero 2 --lr 0.01 --scheduler warmup_cosine "
         "--warmup-steps 5 --checkpoint-every 10")
FIT = '''
def flaky(model, batch):
    if {fail_at} and bigtrain.engine.global_steps == {fail_at} and bigtrain.rank == 1:
        raise RuntimeError("injected fault after step {fail_at}")
    return loss_fn(model, batch)
bigtrain.fit(make_dropout_model(), ToyData(), loss_fn=flaky)
'''


def by_step(run: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics" / "rank-0.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def run_named(root: Path, name: str) -> Path:
    (found,) = [p for p in (root / "bigtrain-runs").iterdir() if p.name.split("-")[2] == name]
    return found


@pytest.mark.integration
def test_a_resumed_run_continues_exactly_where_the_failed_one_stopped(kernel: Kernel, tmp_path: Path) -> None:
    kernel.execute(DROPOUT_MODEL)
    kernel.execute(f"%%bigtrain {FLAGS} --name full\n{FIT.format(fail_at=0)}")
    failed = kernel.execute(f"%%bigtrain {FLAGS} --name crashed\n{FIT.format(fail_at=13)}", allow_error=True)
    assert failed.error is not None and "injected fault after step 13" in failed.error.text
    resumed = kernel.execute(f"%%bigtrain {FLAGS} --name resumed --resume\n{FIT.format(fail_at=0)}")
    full, crashed, again = (run_named(tmp_path, n) for n in ("full", "crashed", "resumed"))
    assert f"resuming run {crashed.name} from its checkpoint at step 10" in resumed.text, resumed.text

    assert sorted(by_step(full, "loss")) == list(range(1, 21))
    assert by_step(crashed, "loss") == {s: v for s, v in by_step(full, "loss").items() if s <= 13}
    # The same losses and learning rates, bit for bit: weights, optimizer, scheduler, data, RNG.
    assert by_step(again, "loss") == {s: v for s, v in by_step(full, "loss").items() if s > 10}
    assert by_step(again, "lr") == {s: v for s, v in by_step(full, "lr").items() if s > 10}

    # The crashed run's last published checkpoint is step 10; the resumed run saved step 20 once.
    assert json.loads((crashed / "checkpoints" / "latest.json").read_text())["tag"] == "step-10"
    assert sorted(p.name for p in (again / "checkpoints").iterdir() if p.is_dir()) == ["step-20"]
    assert sorted(p.name for p in (full / "checkpoints").iterdir() if p.is_dir()) == ["step-10", "step-20"]
    assert (full / "checkpoints" / "latest").read_text() == "step-20"  # DeepSpeed's own pointer too

    # Where DeepSpeed could not load it, the checkpoint is refused before anything starts.
    refused = kernel.execute(f"%%bigtrain {FLAGS.replace('--nproc 2', '--nproc 1')} --resume\npass", allow_error=True)
    assert f"--nproc = 1: the checkpoint of run {again.name} was saved by 2 processes" in refused.text, refused.text
    assert len(list((tmp_path / "bigtrain-runs").iterdir())) == 3


SAVE_AND_DIE = '''
import os, signal, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    # Rank 1 dies in the middle of writing the second checkpoint.
    if ".partial-step-4" in str(f) and bigtrain.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
engine, loader = bigtrain.prepare(make_model(), ToyData())
for x, y in loader:
    engine.backward(loss_fn(engine, (x, y)))
    engine.step()
    if engine.global_steps % 2 == 0:
        print("saved", bigtrain.save_checkpoint())
'''


@pytest.mark.integration
def test_a_crash_during_a_save_leaves_the_last_good_checkpoint_resumable(kernel: Kernel, tmp_path: Path) -> None:
    out = kernel.execute(f"%%bigtrain --nproc 2 --steps 6 --micro-batch 4 --zero 1 --name dies\n{SAVE_AND_DIE}",
                         allow_error=True)
    assert out.error is not None and "rank 1 was killed by SIGKILL" in out.error.text
    run = run_named(tmp_path, "dies")
    assert f"saved {run / 'checkpoints' / 'step-2'}" in out.text
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["tag"] == "step-2"
    # The interrupted save is not published (its partial folder is left, or removed by rank 0's cleanup).
    assert not (run / "checkpoints" / "step-4").exists()
    assert sorted((run / "checkpoints" / "step-2").iterdir()), "the last good checkpoint must be complete"
    # The last good checkpoint loads: the resumed run starts at step 2 and trains steps 3-6.
    kernel.execute(f"%%bigtrain --nproc 2 --steps 6 --micro-batch 4 --zero 1 --name after --resume {run.name}\n"
                   "engine, loader = bigtrain.prepare(make_model(), ToyData())\n"
                   "print('starts at', engine.global_steps, 'with', len(loader), 'micro-batches')\n"
                   "for x, y in loader:\n    engine.backward(loss_fn(engine, (x, y)))\n    engine.step()\n"
                   "print('ends at', engine.global_steps)")
    after = run_named(tmp_path, "after")
    log = (after / "logs" / "rank-0.out").read_text()
    assert "starts at 2 with 4 micro-batches" in log and "ends at 6" in log, log
    assert status_of(after)["state"] == "succeeded"
    kernel.execute("%bigtrain shutdown")  # the succeeded run's workers were kept warm
    assert not worker_processes(str(tmp_path))
