"""Errors a user can fix: bad settings, and what the machine cannot run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nbtrain.config.keys import locate


@dataclass(frozen=True, init=False)
class Problem:
    """One thing wrong with a run's settings, phrased so that the user can fix it.

    `where` is the text the message names: the flag (`--zero`) when the user set it, else the
    dotted DeepSpeed key (`zero_optimization.stage`). What the problem is about, for code to
    read, is `flag` (the `%%bigtrain` flag it names, or None) and `keys` (every dotted
    DeepSpeed key it is about, `()` for settings that are no DeepSpeed key, such as `--nproc`):
    the config panel shows the problem next to the fields of these, never by reading `where`.
    Left out, they come from `where` through the flag <-> key table (config/keys.py), so a
    call site passes `key=` only to pick one of a flag's keys (`--quant` sets two).
    """

    where: str
    value: Any
    rule: str
    fix: str
    flag: str | None
    keys: tuple[str, ...]

    def __init__(self, where: str, value: Any, rule: str, fix: str, key: str | None = None, *,
                 flag: str | None = None, keys: Iterable[str] = ()):
        named_flag, named_keys = locate(where)
        keys = tuple(dict.fromkeys([key, *keys] if key else keys))
        for name, field_value in (("where", where), ("value", value), ("rule", rule), ("fix", fix),
                                  ("flag", flag or named_flag), ("keys", keys or named_keys)):
            object.__setattr__(self, name, field_value)  # frozen: the dataclass's own __init__ does the same

    @property
    def key(self) -> str | None:
        """The first of `keys` (the one a problem about one DeepSpeed key is about), or None."""
        return self.keys[0] if self.keys else None

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
