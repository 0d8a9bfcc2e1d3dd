"""A small xenstore helper over pyxs: read, write, list, remove, and watches with a timeout.

It talks to xenstored's unix socket (/run/xenstored/socket): watches work there, while over /dev/xen/xenbus
pyxs refuses them. Paths and values are str here (pyxs speaks bytes). Later layers use the watches for
xenstore-triggered automation (e.g. react when a guest writes a key).
"""

from __future__ import annotations

import errno
import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path

from xenswap.errors import XenswapError

DEFAULT_SOCKET = Path("/run/xenstored/socket")


class XenStoreError(XenswapError):
    pass


def socket_path() -> Path:
    """xenstored's socket: $XENSTORED_PATH, else $XENSTORED_RUNDIR/socket, else /run/xenstored/socket."""
    if os.environ.get("XENSTORED_PATH"):
        return Path(os.environ["XENSTORED_PATH"])
    if os.environ.get("XENSTORED_RUNDIR"):
        return Path(os.environ["XENSTORED_RUNDIR"]) / "socket"
    return DEFAULT_SOCKET


def _b(text: str) -> bytes:
    return text.encode()


class XenStore:
    """One connection to xenstored. A context manager; also usable long-lived (call close())."""

    def __init__(self, path: Path | str | None = None):
        import pyxs

        self.path = Path(path) if path else socket_path()
        if not self.path.exists():
            raise XenStoreError(f"xenstored socket {self.path} does not exist: is this a Xen dom0 with xenstored up?")
        self._pyxs = pyxs
        self.client = pyxs.Client(unix_socket_path=str(self.path))
        try:
            self.client.connect()
        except pyxs.PyXSError as exc:
            raise XenStoreError(f"cannot connect to xenstored at {self.path}: {exc}") from None

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> XenStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read(self, path: str, default: str | None = None) -> str | None:
        try:
            value = self.client.read(_b(path))
        except self._pyxs.PyXSError as exc:
            if exc.args and exc.args[0] == errno.ENOENT:
                return default
            raise XenStoreError(f"xenstore read {path} failed: {exc}") from None
        return value.decode(errors="replace")

    def write(self, path: str, value: str) -> None:
        self.client.write(_b(path), _b(value))

    def list(self, path: str) -> list[str]:
        try:
            return [name.decode() for name in self.client.list(_b(path))]
        except self._pyxs.PyXSError:
            return []

    def exists(self, path: str) -> bool:
        return bool(self.client.exists(_b(path)))

    def remove(self, path: str) -> None:
        try:
            self.client.delete(_b(path))
        except self._pyxs.PyXSError:
            pass  # already gone

    def domain_path(self, domid: int) -> str:
        return f"/local/domain/{domid}"

    def watch(self, path: str, token: str = "xenswap") -> Watch:
        """A watch on ``path`` (and everything below it). Note xenstored fires each new watch once right away
        (the path itself, token) so a watcher never misses the current state; ``Watch.skip_initial()``
        consumes that first event."""
        return Watch(self, path, token)


class Watch:
    """Events of one xenstore watch: ``next(timeout)`` gives (changed path, token) or raises TimeoutError."""

    def __init__(self, store: XenStore, path: str, token: str):
        self.store = store
        self.path = path
        self.token = token
        self.monitor = store.client.monitor()
        self._paths: dict[str, str] = {}  # token -> watched path
        self.add(path, token)

    def add(self, path: str, token: str) -> None:
        """Watch one more path on the same connection (its own token; ``next`` returns events of all)."""
        if token in self._paths:
            raise XenStoreError(f"token {token!r} already watches {self._paths[token]}")
        self._paths[token] = path
        self.monitor.watch(_b(path), _b(token))

    def next(self, timeout: float | None = None) -> tuple[str, str]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = self.monitor.events.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError(f"no xenstore event on {self.path} within {timeout:g} s") from None
            changed, token = event.path.decode(errors="replace"), event.token.decode(errors="replace")
            watched = self._paths.get(token)
            if watched is not None and (changed == watched or changed.startswith(watched.rstrip("/") + "/")):
                return changed, token

    def skip_initial(self, timeout: float = 5.0) -> None:
        self.next(timeout)

    def events(self, timeout: float | None = None) -> Iterator[tuple[str, str]]:
        """Events until one does not arrive within ``timeout``."""
        while True:
            try:
                yield self.next(timeout)
            except TimeoutError:
                return

    def close(self) -> None:
        try:
            self.monitor.close()
        except self.store._pyxs.PyXSError:
            pass

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
