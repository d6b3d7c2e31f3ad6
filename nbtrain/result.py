"""`RunResult`: the value a `%%bigtrain` cell returns, read from its run directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtrain.rundir import RunDirectory, read_json

if TYPE_CHECKING:
    import pandas


def metrics_frame(records: list[dict[str, Any]]) -> pandas.DataFrame:
    """Return metric records as one row per (step, rank): step, rank, time, then the scalars."""
    import pandas as pd

    if not records:
        return pd.DataFrame(columns=["step", "rank", "time"])
    frame = pd.DataFrame.from_records(records)
    # Several records can describe one step (the step's LR, then the loss logged after it).
    frame = frame.groupby(["step", "rank"], as_index=False, sort=True).last()
    scalars = [c for c in frame.columns if c not in ("step", "rank", "time")]
    return frame[["step", "rank", "time", *scalars]]


@dataclass
class RunResult:
    """A finished (or running) run: status, metrics, DeepSpeed config and timings.

    >>> result = _                                 # doctest: +SKIP
    >>> result.status, result.metrics.tail()       # doctest: +SKIP
    """

    run_dir: Path
    outputs: tuple[str, ...] = ()
    notices: tuple[str, ...] = field(default=())

    @property
    def _run(self) -> RunDirectory:
        return RunDirectory(self.run_dir)

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    @property
    def status(self) -> str:
        return str(self._run.status().get("state", "unknown"))

    @property
    def reason(self) -> str:
        return str(self._run.status().get("reason", ""))

    @property
    def timings(self) -> dict[str, float]:
        return dict(self._run.status().get("timings", {}))

    @property
    def config(self) -> dict[str, Any]:
        """The DeepSpeed config the engine ran with (the planned one until it started)."""
        effective = read_json(self._run.effective_deepspeed_file)
        return effective["config"] if effective else read_json(self._run.deepspeed_file, {})

    @property
    def metrics(self) -> pandas.DataFrame:
        """Every rank's logged scalars as a DataFrame (re-read on each access)."""
        return metrics_frame(self._run.metric_records())

    @property
    def errors(self) -> dict[int, dict[str, Any]]:
        return self._run.errors()

    def log(self, rank: int = 0) -> str:
        """Return the full log of one rank (DeepSpeed's messages included)."""
        try:
            return self._run.log_file(rank).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def summary(self) -> str:
        status = self._run.status()
        lines = [f"RunResult {self.run_id}: {status.get('state', 'unknown')}"
                 + (f" ({status['reason']})" if status.get("reason") else "")]
        metrics = self.metrics
        if len(metrics):
            main = metrics[metrics["rank"] == 0]
            parts = [f"steps {int(main['step'].max())}"]
            for column, label in (("loss", "final loss"), ("eval_loss", "eval loss")):
                if column in main and main[column].notna().any():
                    parts.append(f"{label} {main[column].dropna().iloc[-1]:.4f}")
            if "samples_per_s" in main and main["samples_per_s"].notna().any():
                parts.append(f"{main['samples_per_s'].dropna().tail(20).median():.1f} samples/s")
            lines.append("  " + ", ".join(parts))
        timings = status.get("timings", {})
        if timings:
            lines.append("  " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in timings.items()
                                          if isinstance(v, (int, float))))
        workers = status.get("workers")
        if workers:
            lines.append(f"  on {workers['note']}")
        if self.outputs:
            lines.append(f"  bound in the notebook: {', '.join(self.outputs)}")
        lines.append(f"  run directory: {self.run_dir}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.summary())
