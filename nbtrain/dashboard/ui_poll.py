"""Deliver widget messages (a Stop click) to the kernel while a cell keeps its main thread busy.

A running cell blocks the kernel's event loop, so the frontend's comm messages wait in the
socket between ipykernel's shell-channel thread and the main thread until the cell ends.
`UiPoller.poll()`, called between ticks of the cell's own loop, takes the waiting
messages: comm messages are handled at once, exactly as ipykernel would handle them;
anything else (a queued `execute_request`, `kernel_info_request`, ...) is handed back to
the event loop in arrival order, so it runs when the cell ends, as it would have anyway.

This is what the `jupyter-ui-poll` package does. Its 1.1 release calls
`kernel.do_one_iteration()`, which ipykernel 7 no longer has (the error is swallowed and
no message is ever delivered), hence this module. It relies on ipykernel 7 internals
(`shell_channel_thread.manager._shell_channel_to_main`); where they are missing, `poll()`
does nothing and the run is still stopped by interrupting the kernel.
"""

from __future__ import annotations

import threading
from typing import Any

COMM_MESSAGES = frozenset({"comm_open", "comm_msg", "comm_close"})


class UiPoller:
    """Handle the comm messages that wait for the kernel's main thread."""

    def __init__(self, kernel: Any, socket: Any):
        self._kernel, self._socket = kernel, socket

    @classmethod
    def for_this_kernel(cls) -> UiPoller | None:
        """Return a poller for the running IPython kernel, or None outside one (or on an unknown ipykernel)."""
        try:
            from IPython import get_ipython
        except ImportError:
            return None
        kernel = getattr(get_ipython(), "kernel", None)
        socket = _main_shell_socket(kernel) if kernel is not None else None
        return cls(kernel, socket) if socket is not None else None

    def poll(self, limit: int = 100) -> int:
        """Handle up to `limit` waiting comm messages now; return how many were handled."""
        import zmq

        # The socket belongs to the main thread's event loop: never touch it from another thread.
        if threading.current_thread() is not threading.main_thread():
            return 0
        handled = 0
        for _ in range(limit):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            if self._message_type(frames) in COMM_MESSAGES:
                self._handle_comm(frames)
                handled += 1
            else:
                # Back to the event loop, which dispatches it (in order) once the cell is done.
                self._kernel.io_loop.add_callback(self._kernel.shell_main, None, frames)
        return handled

    def _message_type(self, frames: list[Any]) -> str | None:
        try:
            _, parts = self._kernel.session.feed_identities(frames, copy=False)
            header = self._kernel.session.deserialize(parts, content=False, copy=False)["header"]
        except Exception:  # noqa: BLE001 - e.g. ipykernel's one-frame "stop aborting" marker
            return None
        return str(header.get("msg_type"))

    def _handle_comm(self, frames: list[Any]) -> None:
        kernel = self._kernel
        idents, parts = kernel.session.feed_identities(frames, copy=False)
        message = kernel.session.deserialize(parts, content=True, copy=False)
        # The handler's output belongs to the comm message; the cell's output must go on after it.
        saved_ident = kernel._get_shell_context_var(kernel._shell_parent_ident)
        saved_parent = kernel.get_parent("shell")
        kernel.set_parent(idents, message, channel="shell")
        try:
            handler = kernel.shell_handlers.get(message["header"]["msg_type"])
            if handler is not None:
                handler(None, idents, message)  # comm handlers are synchronous and ignore the stream
        except Exception:  # as ipykernel does: a widget's error is logged, the cell goes on
            kernel.log.error("Exception in comm message handler", exc_info=True)
        finally:
            kernel.set_parent(saved_ident, saved_parent, channel="shell")


def _main_shell_socket(kernel: Any) -> Any:
    """Return the socket that the main thread reads shell messages from (ipykernel 7), or None."""
    thread = getattr(kernel, "shell_channel_thread", None)
    if thread is not None:
        pair = getattr(getattr(thread, "manager", None), "_shell_channel_to_main", None)
        return getattr(pair, "to_socket", None)
    if hasattr(kernel, "shell_main") and getattr(kernel, "shell_stream", None) is not None:
        return kernel.shell_stream.socket  # ipykernel 7 without subshells: the main thread owns the shell socket
    return None
