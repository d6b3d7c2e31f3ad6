"""Errors a user can fix: bad settings, and what the machine cannot run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a run's settings, phrased so that the user can fix it.

    `where` is what the message names: the flag (`--zero`) when the user set it, else the
    dotted DeepSpeed key (`zero_optimization.stage`). `key` is the DeepSpeed key the problem
    is about either way (None for settings that are no DeepSpeed key, such as `--nproc`): the
    config panel shows the problem next to that key's field (config/keys.py maps them).
    """

    where: str
    value: Any
    rule: str
    fix: str
    key: str | None = None

    @classmethod
    def about(cls, flag_value: Any, flag: str, key: str, value: Any, rule: str, fix: str) -> Problem:
        """Return a problem with `key`, named by `flag` when the user set it (`flag_value`), else by `key`."""
        return cls(flag if flag_value is not None else key, value, rule, fix, key=key)

    def __str__(self) -> str:
        return f"{self.where} = {self.value!r}: {self.rule}. Fix: {self.fix}"


class ConfigError(ValueError):
    """Every problem found in a run's settings, raised before anything starts."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems: tuple[Problem, ...] = tuple(problems)
        count = len(self.problems)
        head = "1 problem" if count == 1 else f"{count} problems"
        lines = [f"{head} in the %%bigtrain settings (nothing was started):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class ShippingError(ValueError):
    """A name the cell needs cannot be sent to the worker processes."""


class RunFailed(RuntimeError):
    """A run ended without success; the run directory keeps what it wrote.

    In IPython it shows the failing rank's traceback (pointing at the cell's line) and the
    reason, not the traceback of nbtrain's own supervising code.
    """

    def __init__(self, message: str, worker_traceback: str = "", result: Any = None):
        super().__init__(message)
        self.worker_traceback = worker_traceback
        self.result = result

    @classmethod
    def from_run(cls, result: Any, rank: int | None) -> RunFailed:
        report = result.errors.get(rank, {}) if rank is not None else {}
        message = f"run {result.run_id} {result.status}: {result.reason}. Metrics and logs: {result.run_dir}"
        return cls(message, report.get("traceback", ""), result)

    def _render_traceback_(self) -> list[str]:
        lines = []
        if self.worker_traceback:
            lines += ["The worker's traceback:", *self.worker_traceback.rstrip().splitlines(), ""]
        return [*lines, f"RunFailed: {self}"]
