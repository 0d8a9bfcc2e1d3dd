"""Small QMP helpers on top of qemu.qmp's asyncio QMPClient.

Each call opens a connection, runs its commands and closes it again, so command-line tools and the
manager can share one VM's monitor socket without holding it. The sync wrappers work whether or not an
event loop is already running in the calling thread (in that case the call runs on a helper thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
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
