"""A real IPython kernel for tests: execute cells and see what a notebook would show."""

from __future__ import annotations

import os
import queue
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager


@dataclass
class Message:
    """One output message of a cell, with when it arrived."""

    time: float
    kind: str  # stream, display_data, update_display_data, execute_result, error
    content: dict[str, Any]

    @property
    def text(self) -> str:
        if self.kind == "stream":
            return str(self.content["text"])
        if self.kind == "error":
            return "\n".join(self.content["traceback"])
        data = self.content.get("data", {})
        return str(data.get("text/plain", ""))


@dataclass
class Execution:
    """Everything one cell produced."""

    started: float
    messages: list[Message] = field(default_factory=list)
    status: str = "ok"

    @property
    def text(self) -> str:
        return "".join(m.text + ("" if m.kind == "stream" else "\n") for m in self.messages)

    @property
    def error(self) -> Message | None:
        """The cell's error (a UsageError arrives as stderr text starting with 'UsageError')."""
        return next((m for m in self.messages if m.kind == "error"
                     or (m.kind == "stream" and m.text.startswith("UsageError"))), None)

    def value(self) -> str:
        found = [m for m in self.messages if m.kind == "execute_result"]
        return found[-1].text if found else ""


class Kernel:
    """A kernel started in `cwd`, like the one behind a notebook in that folder."""

    def __init__(self, cwd: Path, env: Mapping[str, str] | None = None):
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(cwd=str(cwd), env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"})
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    @property
    def pid(self) -> int:
        return int(self.manager.provisioner.pid)  # type: ignore[union-attr]

    def execute(self, code: str, timeout: float = 300, interrupt_after: float | Callable[[], bool] | None = None,
                allow_error: bool = False) -> Execution:
        """Run `code` as a cell and collect its outputs until the kernel is idle again.

        `interrupt_after` interrupts the kernel once the cell has run that many seconds, or once
        the callable returns True (e.g. when the cell's run has trained a step).
        """
        msg_id = self.client.execute(code)
        run = Execution(started=time.time())
        deadline = run.started + timeout
        interrupted = False
        while True:
            if not interrupted and (interrupt_after() if callable(interrupt_after) else
                                    interrupt_after is not None and time.time() - run.started > interrupt_after):
                self.manager.interrupt_kernel()
                interrupted = True
            try:
                msg = self.client.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                if time.time() > deadline:
                    raise TimeoutError(f"cell did not finish in {timeout} s; output so far:\n{run.text}") from None
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "status" and msg["content"]["execution_state"] == "idle":
                break
            if kind in ("stream", "display_data", "update_display_data", "execute_result", "error"):
                run.messages.append(Message(time.time(), kind, msg["content"]))
        reply = self.client.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.client.get_shell_msg(timeout=30)
        # A UsageError is shown as stderr text, not as an error message: the reply tells.
        if run.error is not None or reply["content"]["status"] != "ok":
            run.status = "error"
            if not allow_error:
                raise AssertionError(f"cell failed:\n{run.text}")
        return run

    def kill(self) -> None:
        """Kill the kernel process with SIGKILL, as a crash or the OOM killer would."""
        os.kill(self.pid, signal.SIGKILL)

    def shutdown(self) -> None:
        self.client.stop_channels()
        if self.manager.is_alive():
            self.manager.shutdown_kernel(now=True)
