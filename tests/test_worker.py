"""What the workers train: schedulers, offload, precision, and parity with a plain DeepSpeed script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nbtrain.launch.launcher import ops_cache_dir
from tests.conftest import NOTEBOOK_SETUP, losses, only_run
from tests.kernel import Kernel

pytestmark = pytest.mark.integration

FIT = "bigtrain.fit(make_model(), ToyData(), loss_fn=loss_fn)"


def runs_by_name(root: Path) -> dict[str, Path]:
    return {run.name.split("-")[2]: run for run in (root / "bigtrain-runs").iterdir()}


def deepspeed_schedule(effective: dict, steps: int) -> list[float]:
    """Return the LR DeepSpeed's own scheduler gives at each step, stepped as the engine does."""
    import torch
    from deepspeed.runtime import lr_schedules

    config = effective["config"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config["optimizer"]["params"]["lr"])
    scheduler = getattr(lr_schedules, config["scheduler"]["type"])(optimizer, **config["scheduler"]["params"])
    expected = []
    for _ in range(steps):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return expected


def test_every_scheduler_logs_deepspeeds_learning_rate_at_each_step(kernel: Kernel, tmp_path: Path) -> None:
    schedulers = ["warmup", "warmup_decay", "warmup_cosine", "one_cycle", "lr_range_test"]
    for name in schedulers:
        warmup = "--warmup-steps 4" if name.startswith("warmup") else ""
        kernel.execute(f"%%bigtrain --nproc 2 --steps 12 --micro-batch 8 --lr 0.01 --scheduler {name} "
                       f"{warmup} --name {name.replace('_', '')}\n{FIT}")
    for name, run in runs_by_name(tmp_path).items():
        records = [json.loads(line) for line in (run / "metrics" / "rank-0.jsonl").read_text().splitlines()]
        logged = [r["lr"] for r in sorted(records, key=lambda r: r["step"]) if "lr" in r]
        effective = json.loads((run / "deepspeed.effective.json").read_text())
        expected = deepspeed_schedule(effective, 12)
        assert logged == pytest.approx(expected, rel=1e-9, abs=1e-12), f"{name}: logged {logged}, DeepSpeed {expected}"
        assert max(logged) == pytest.approx(0.01, rel=0.02) or name in ("warmup", "lrrangetest"), \
            f"{name}: --lr 0.01 should be the peak, got {max(logged)}"
    assert len(runs_by_name(tmp_path)) == len(schedulers)


def test_offload_and_bf16_train_like_the_plain_setting(kernel: Kernel, tmp_path: Path) -> None:
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    settings = {
        "plain": "--zero 0",
        "optcpu": "--zero 2 --offload-optimizer cpu",
        "paramcpu": "--zero 3 --offload-optimizer cpu --offload-param cpu",
        "nvme": f"--zero 3 --offload-optimizer nvme --nvme-path {nvme}",
        "bf16": "--zero 2 --precision bf16",
    }
    for name, flags in settings.items():
        kernel.execute(f"%%bigtrain --nproc 2 --steps 10 --micro-batch 8 {flags} --name {name}\n{FIT}")
    runs = runs_by_name(tmp_path)
    reference = losses(runs["plain"])
    for name in ("optcpu", "paramcpu", "nvme"):
        worst = max(abs(a - b) for a, b in zip(losses(runs[name]), reference, strict=True))
        assert worst < 1e-4, f"{name} loss differs from ZeRO-0 by {worst:.2e}"
    engine = json.loads((runs["nvme"] / "deepspeed.effective.json").read_text())["config"]
    assert engine["zero_optimization"]["offload_optimizer"]["device"] == "nvme"
    assert any(nvme.rglob("*")), "NVMe offload wrote nothing to --nvme-path"
    bf16 = losses(runs["bf16"])
    facts = json.loads((runs["bf16"] / "deepspeed.effective.json").read_text())["engine"]
    assert facts["bf16"] is True and bf16[-1] < bf16[0]
    assert max(abs(a - b) for a, b in zip(bf16, reference, strict=True)) < 0.05, "bf16 drifted far from fp32"


PLAIN_SCRIPT = """
import json, os, sys
import deepspeed, torch
{setup}
deepspeed.init_distributed(dist_backend="gloo")
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.manual_seed(0)
model = make_model()
config = json.load(open(sys.argv[1]))
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
data = ToyData()
sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
loader = torch.utils.data.DataLoader(data, batch_size=config["train_micro_batch_size_per_gpu"], sampler=sampler)
out = []
for x, y in loader:
    loss = loss_fn(engine, (x, y))
    engine.backward(loss)
    engine.step()
    mean = loss.detach().clone()
    torch.distributed.all_reduce(mean)
    out.append(mean.item() / world)
    if engine.global_steps == {steps}:
        break
if rank == 0:
    json.dump(out, open(sys.argv[2], "w"))
engine.destroy()
torch.distributed.destroy_process_group()
sys.stdout.flush()
# As nbtrain's workers (and benchmarks/plain_deepspeed.py) do: skip the comm backends' C++
# destructors, which can abort at exit ("terminate called without an active exception", -6).
os._exit(0)
"""


def torchrun(script: Path, *args: Path, cwd: Path, timeout: float = 300) -> None:
    """Run `script` on 2 processes under torchrun; kill its whole process group on timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": ops_cache_dir()}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), *map(str, args)], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"torchrun failed:\n{output.decode(errors='replace')[-3000:]}"


def test_a_bigtrain_run_equals_the_same_deepspeed_json_under_torchrun(kernel: Kernel, tmp_path: Path) -> None:
    kernel.execute(f"%%bigtrain --nproc 2 --zero 3 --steps 12 --micro-batch 8 --lr 0.01\n{FIT}")
    run = only_run(tmp_path)
    config = json.loads((run / "deepspeed.effective.json").read_text())["config"]
    (tmp_path / "ds.json").write_text(json.dumps(config))
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_SCRIPT.format(setup=textwrap.dedent(NOTEBOOK_SETUP), steps=12))
    torchrun(script, tmp_path / "ds.json", tmp_path / "plain.json", cwd=tmp_path)
    plain = json.loads((tmp_path / "plain.json").read_text())
    ours = losses(run)
    worst = max(abs(a - b) for a, b in zip(ours, plain, strict=True))
    assert worst < 1e-6, f"%%bigtrain and torchrun differ by up to {worst:.2e}:\n{ours}\n{plain}"


RECORDER = '''
class DictData(torch.utils.data.Dataset):
    """Dict samples: float features and an integer label."""
    def __init__(self, n=64):
        self.x = torch.randn(n, 16, generator=torch.Generator().manual_seed(2))
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.x[i, :4].argmax()}

class Recorder(torch.nn.Module):
    """Records the device and dtype of the tensors it receives."""
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 4)
        self.seen = set()
    def forward(self, x, labels):
        self.seen.add(f"x {x.device} {x.dtype}, labels {labels.device} {labels.dtype}")
        return torch.nn.functional.cross_entropy(self.lin(x).float(), labels)
'''

RECORDED = {
    "fit": "model = Recorder()\nbigtrain.fit(model, DictData())",
    "prepare": "model = Recorder()\nengine, loader = bigtrain.prepare(model, DictData())\n"
               "for batch in loader:\n    engine.backward(engine(**batch))\n    engine.step()",
    # A loop of the user's own: batches as collated, moved by the user.
    "own": "model = Recorder()\nengine, loader = bigtrain.prepare(model, DictData(), device_placement=False)\n"
           "for batch in loader:\n    print('raw', batch['x'].dtype)\n    engine.backward(engine(**bigtrain.to_device(batch)))\n"
           "    engine.step()",
}


def test_batches_reach_the_model_on_the_ranks_device_in_the_engines_dtype(kernel: Kernel, tmp_path: Path) -> None:
    # Regression (issue 14): on a GPU, fit with dict batches failed ("index is on cpu, different
    # from other tensors on cuda:0"): batches were never moved. Here the device is the CPU; the
    # mover itself is tested on the "meta" device in test_batches.py.
    kernel.execute(RECORDER)
    for name, body in RECORDED.items():
        kernel.execute(f"%%bigtrain --nproc 2 --steps 3 --micro-batch 4 --zero 2 --precision bf16 --no-plot "
                       f"--name {name}\n{body}\nprint('seen', sorted(model.seen), 'device', bigtrain.device)")
    for name, run in runs_by_name(tmp_path).items():
        for rank in (0, 1):
            out = (run / "logs" / f"rank-{rank}.out").read_text()
            assert "seen ['x cpu torch.bfloat16, labels cpu torch.int64'] device cpu" in out, f"{name} rank {rank}: {out}"
    assert "raw torch.float32" in (runs_by_name(tmp_path)["own"] / "logs" / "rank-0.out").read_text()


HELPERS = '''
from nbtrain import bigtrain

def where():
    return f"module: rank {bigtrain.rank} on {bigtrain.device}, the cell's run {bigtrain!r}"
'''

EARLIER_CELL = '''
def loss_on_device(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x.to(bigtrain.device)).float(), y.to(bigtrain.device))

def describe():
    return f"function: rank {bigtrain.rank} on {bigtrain.device}"
'''

USES_BIGTRAIN = """
import helpers
bigtrain.fit(make_model(), ToyData(), loss_fn=loss_on_device)
print(describe())
print(helpers.where() == f"module: rank {bigtrain.rank} on {bigtrain.device}, the cell's run {bigtrain!r}")
"""


def test_functions_of_earlier_cells_and_of_the_users_modules_see_bigtrain(kernel: Kernel, tmp_path: Path) -> None:
    # Regression (issue 14): a loss_fn from an earlier cell doing .to(bigtrain.device) raised
    # NameError: name 'bigtrain' is not defined, in the worker.
    (tmp_path / "helpers.py").write_text(HELPERS)
    kernel.execute(EARLIER_CELL)
    for name in ("first", "again"):  # the second run is in the same, warm workers: it must see its own run
        kernel.execute(f"%%bigtrain --nproc 2 --steps 2 --micro-batch 8 --no-plot --name {name}\n{USES_BIGTRAIN}")
    runs = runs_by_name(tmp_path)
    assert json.loads((runs["again"] / "status.json").read_text())["workers"]["warm"]
    for name, run in runs.items():
        for rank in (0, 1):
            out = (run / "logs" / f"rank-{rank}.out").read_text()
            assert f"function: rank {rank} on cpu\nTrue\n" in out, f"{name} rank {rank}: {out}"
    outside = kernel.execute("from nbtrain import bigtrain\ntry:\n    bigtrain.rank\nexcept RuntimeError as e:\n"
                             "    print(e)").text
    assert "exists only inside a %%bigtrain cell's workers" in outside, outside
