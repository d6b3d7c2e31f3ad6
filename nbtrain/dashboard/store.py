"""What the dashboard shows, read incrementally from a run directory (no widgets here).

`RunMetrics.update()` reads only the bytes written since its last call (rank 0's metric
records and every rank's utilization records) and appends them to bounded series, so a
tick costs the same at step 10 and at step 100 000. Step, ETA and the start-up phase come
from `nbtrain.rundir.progress`, as in every other view.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbtrain.devices import ProcessGpuMemory
from nbtrain.rundir import RunDirectory, read_json, read_records
from nbtrain.rundir.progress import Startup, StepReader, planned_steps, read_startup

MAX_POINTS = 256  # per curve, about one per pixel of a chart; beyond it, points are merged pairwise
SMOOTHING = 0.9  # weight of the running average of the loss, as TensorBoard's slider


class Series:
    """The points of one curve in bounded memory: past `max_points`, every stored point averages twice as many.

    The resolution stays uniform over the whole run (a 100 000-step run keeps its first
    steps as visible as its last), and `last` is always the latest value as logged.
    """

    def __init__(self, max_points: int = MAX_POINTS):
        self.max_points = max_points - max_points % 2
        self._xs: list[float] = []
        self._ys: list[float] = []
        self._stride = 1  # logged values per stored point
        self._pending: list[float] = [0.0, 0.0, 0]  # sums of x and y, count, of a point still filling
        self.last: float | None = None

    def append(self, x: float, y: float) -> None:
        self.last = float(y)
        pending = self._pending
        pending[0] += float(x)
        pending[1] += float(y)
        pending[2] += 1
        if pending[2] < self._stride:
            return
        self._xs.append(pending[0] / pending[2])
        self._ys.append(pending[1] / pending[2])
        self._pending = [0.0, 0.0, 0]
        if len(self._xs) >= self.max_points:
            self._xs = [(a + b) / 2 for a, b in zip(self._xs[::2], self._xs[1::2], strict=True)]
            self._ys = [(a + b) / 2 for a, b in zip(self._ys[::2], self._ys[1::2], strict=True)]
            self._stride *= 2

    @property
    def xs(self) -> list[float]:
        count = self._pending[2]
        return self._xs + [self._pending[0] / count] if count else list(self._xs)

    @property
    def ys(self) -> list[float]:
        count = self._pending[2]
        return self._ys + [self._pending[1] / count] if count else list(self._ys)

    def __len__(self) -> int:
        return len(self._xs) + (1 if self._pending[2] else 0)


class Smoother:
    """A debiased exponential moving average (the first values are not pulled towards 0)."""

    def __init__(self, weight: float = SMOOTHING):
        self.weight, self._average, self._count = weight, 0.0, 0

    def add(self, value: float) -> float:
        self._count += 1
        self._average = self.weight * self._average + (1 - self.weight) * value
        return self._average / (1 - self.weight**self._count)


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Return the debiased exponential moving average of `values`."""
    smoother = Smoother(weight)
    return [smoother.add(v) for v in values]


@dataclass
class RankUtilization:
    """One rank's utilization over time (x = seconds since the run started)."""

    rank: int
    device: str = "cpu"
    device_name: str = ""
    gpu_index: int | None = None
    no_gpu_reason: str = ""
    cpu_percent: Series = field(default_factory=Series)
    rss_bytes: Series = field(default_factory=Series)
    gpu_util: Series = field(default_factory=Series)
    gpu_mem_bytes: Series = field(default_factory=Series)
    power_w: Series = field(default_factory=Series)
    gpu_mem_total_bytes: int | None = None
    # (time, joules) of the first and latest counter readings: energy is their difference.
    energy: list[tuple[float, float]] = field(default_factory=list)
    cpu_energy: list[tuple[float, float]] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.device == "gpu":
            return f"rank {self.rank} · GPU {self.gpu_index} ({self.device_name})"
        return f"rank {self.rank} · CPU"


def _keep_ends(pairs: list[tuple[float, float]], point: tuple[float, float]) -> None:
    # Energy needs the first reading, the latest and the one before it (for power): keep three.
    pairs.append(point)
    if len(pairs) > 3:
        del pairs[1]


class RunMetrics:
    """Everything the dashboard draws, kept up to date by `update()` from the run directory."""

    def __init__(self, run: RunDirectory):
        self.run = run
        self.loss, self.loss_smooth, self.eval_loss = Series(), Series(), Series()
        self.lr, self.samples_per_s, self.tokens_per_s = Series(), Series(), Series()
        self.steps = StepReader(run.metrics_file(0))
        self.tokens_seen = 0.0
        self.engine: dict[str, Any] = {}
        self.utilization: dict[int, RankUtilization] = {}
        self._run_info = run.run_info()
        self._smoother = Smoother()
        self._util_offsets: dict[Path, int] = {}
        self._util_start: float | None = None
        # The kernel's own GPU memory (a notebook that ran CUDA holds some), apart from the ranks'.
        self.kernel_gpu_mem_bytes = Series()
        self._kernel_gpu: ProcessGpuMemory | None = None

    # -- reading -----------------------------------------------------------------------
    def update(self) -> bool:
        """Read what was written since the last call; return whether anything new came."""
        records = self.steps.read()
        for record in records:
            self._add_metric(record)
        if not self.engine and self.run.effective_deepspeed_file.exists():
            self.engine = (read_json(self.run.effective_deepspeed_file, {}) or {}).get("engine", {})
        new_util = self._read_utilization()
        self._read_kernel_gpu()
        return bool(records) or new_util

    def _add_metric(self, record: dict[str, Any]) -> None:
        step = record["step"]
        loss = record.get("loss")
        if loss is not None:
            self.loss.append(step, loss)
            self.loss_smooth.append(step, self._smoother.add(float(loss)))
        for key, series in (("eval_loss", self.eval_loss), ("lr", self.lr),
                            ("samples_per_s", self.samples_per_s), ("tokens_per_s", self.tokens_per_s)):
            if record.get(key) is not None:
                series.append(step, record[key])
        if record.get("step_time_s") is not None and record.get("tokens_per_s") is not None:
            self.tokens_seen += float(record["tokens_per_s"]) * float(record["step_time_s"])

    def _read_utilization(self) -> bool:
        folder = self.run.utilization_file(0).parent
        new = False
        for path in sorted(folder.glob("rank-*.jsonl")) if folder.is_dir() else ():
            records, self._util_offsets[path] = read_records(path, self._util_offsets.get(path, 0))
            for record in records:
                self._add_utilization(record)
            new = new or bool(records)
        return new

    def _read_kernel_gpu(self) -> None:
        if not self.on_gpu or self._util_start is None:
            return  # no GPU, so no kernel share either (and NVML is never asked on a CPU machine)
        if self._kernel_gpu is None:
            self._kernel_gpu = ProcessGpuMemory(int(self.run.run_info().get("kernel_pid") or 0))
        held = self._kernel_gpu.read()
        if held is not None:
            self.kernel_gpu_mem_bytes.append(max(0.0, time.time() - self._util_start), held)

    def _add_utilization(self, record: dict[str, Any]) -> None:
        rank = int(record["rank"])
        util = self.utilization.get(rank)
        if util is None:
            util = self.utilization[rank] = RankUtilization(rank)
            self.utilization = dict(sorted(self.utilization.items()))
        if self._util_start is None:
            status = self.run.status()
            self._util_start = float(status.get("started") or status.get("created") or record["time"])
        # Seconds since the run started; a sample of a host whose clock runs behind is put at 0.
        t = max(0.0, float(record["time"]) - self._util_start)
        util.device = record.get("device", "cpu")
        util.device_name = record.get("device_name", "")
        util.gpu_index = record.get("gpu_index")
        util.no_gpu_reason = record.get("no_gpu_reason", "")
        for key in ("cpu_percent", "rss_bytes", "gpu_util", "gpu_mem_bytes", "power_w"):
            if record.get(key) is not None:
                getattr(util, key).append(t, record[key])
        util.gpu_mem_total_bytes = record.get("gpu_mem_total_bytes", util.gpu_mem_total_bytes)
        if record.get("energy_j") is not None:
            _keep_ends(util.energy, (float(record["time"]), float(record["energy_j"])))
        if record.get("cpu_energy_j") is not None:
            _keep_ends(util.cpu_energy, (float(record["time"]), float(record["cpu_energy_j"])))

    # -- derived -------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.steps.step

    @property
    def max_steps(self) -> int | None:
        return planned_steps({"engine": self.engine}, self._run_info)

    @property
    def eta_s(self) -> float | None:
        return self.steps.eta_s(self.max_steps)

    def startup(self) -> Startup | None:
        """Return the run's start-up phase (reads two small files), None once it trains."""
        return read_startup(self.run, self.step)

    @property
    def on_gpu(self) -> bool:
        return any(u.device == "gpu" for u in self.utilization.values())
