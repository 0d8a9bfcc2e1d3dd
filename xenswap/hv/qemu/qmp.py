"""Small QMP helpers on top of qemu.qmp's asyncio QMPClient.

Each call opens a connection, runs its commands and closes it again, so command-line tools and the
manager can share one VM's monitor socket without holding it. The sync wrappers work whether or not an
event loop is already running in the calling thread (in that case the call runs on a helper thread).

``QMPConnection`` is the other kind: one synchronous connection kept open (on a VM's second monitor, which
is free for one long-lived client) for latency-critical commands. Resuming a paused, paged-out guest over a
fresh connection took 6-38 ms (asyncio set-up, greeting and capabilities negotiation with a QEMU whose main
loop was paged out); over an open connection ``cont`` is one line each way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import socket
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from xenswap.errors import XenswapError

T = TypeVar("T")

# qemu.qmp logs every connection at INFO/WARNING; a CLI listing dozens of VMs would be flooded.
logging.getLogger("qemu.qmp").setLevel(logging.ERROR)


class QMPFailure(XenswapError):
    """QEMU did not answer on its monitor socket or refused a command."""


async def qmp_session_async(
    socket_path: Path | str, commands: Sequence[tuple[str, dict[str, Any] | None]], timeout: float = 10.0
) -> list[Any]:
    """Run ``commands`` in order over one fresh QMP connection; returns their results."""
    client = QMPClient("xenswap")
    try:
        await asyncio.wait_for(client.connect(str(socket_path)), timeout)
    except (OSError, QMPError, TimeoutError) as exc:
        raise QMPFailure(f"cannot reach QEMU's monitor at {socket_path}: {exc or type(exc).__name__}") from exc
    try:
        results = []
        for command, arguments in commands:
            try:
                results.append(await asyncio.wait_for(client.execute(command, arguments), timeout))
            except (QMPError, TimeoutError) as exc:
                raise QMPFailure(f"QMP {command} at {socket_path} failed: {exc or type(exc).__name__}") from exc
        return results
    finally:
        try:
            await client.disconnect()
        except (EOFError, OSError, QMPError):
            pass  # QEMU hung up first (after "quit", or while exiting): nothing left to close


async def qmp_execute_async(
    socket_path: Path | str, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0
) -> Any:
    return (await qmp_session_async(socket_path, [(command, arguments)], timeout))[0]


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code (also from inside a running event loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def qmp_execute(
    socket_path: Path | str, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0
) -> Any:
    return run_sync(qmp_execute_async(socket_path, command, arguments, timeout))


def qmp_session(
    socket_path: Path | str, commands: Sequence[tuple[str, dict[str, Any] | None]], timeout: float = 10.0
) -> list[Any]:
    return run_sync(qmp_session_async(socket_path, commands, timeout))


class QMPConnection:
    """A synchronous QMP connection kept open (thread-safe: one command at a time). Any error closes it;
    the caller opens a new one (or falls back to a short connection)."""

    def __init__(self, socket_path: Path | str, timeout: float = 2.0) -> None:
        self.socket_path = str(socket_path)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buffer = b""
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(self.socket_path)
            # A monitor that already has a client accepts the connection but never greets: the timeout says so.
            greeting = self._read_message()
            if "QMP" not in greeting:
                raise QMPFailure(f"no QMP greeting at {socket_path}: {greeting!r}")
            self._exchange("qmp_capabilities", None)
        except (OSError, EOFError, ValueError, QMPFailure) as exc:
            self.close()
            raise QMPFailure(f"cannot open a QMP connection at {socket_path}: {exc or type(exc).__name__}") from exc

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        with self._lock:
            if self._sock is None:
                raise QMPFailure(f"QMP connection at {self.socket_path} is closed")
            try:
                self._sock.settimeout(timeout)
                return self._exchange(command, arguments)
            except (OSError, EOFError, ValueError) as exc:
                self.close()
                raise QMPFailure(f"QMP {command} at {self.socket_path} failed: {exc or type(exc).__name__}") from exc

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _exchange(self, command: str, arguments: dict[str, Any] | None) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        assert self._sock is not None
        self._sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._read_message()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QMPFailure(f"QMP {command} at {self.socket_path} refused: {reply['error'].get('desc')}")
            # anything else is an asynchronous event (STOP, RESUME, ...): not ours to handle

    def _read_message(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise EOFError("QEMU closed the monitor connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def __enter__(self) -> QMPConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
