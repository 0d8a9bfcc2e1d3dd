"""Fixtures for the storage tests: a private store, a golden image with known content, a running server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenswap.storage.store import Store

GOLDEN_SIZE = 16 << 20


class Server:
    """``xenswap disk serve`` as a real child process on a unix socket (optionally TCP too)."""

    def __init__(self, store_dir: Path, sock: Path, tcp_port: int | None = None, autoflush: float = 0) -> None:
        self.autoflush = autoflush
        self.store_dir = store_dir
        self.sock = sock
        self.tcp_port = tcp_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        cmd = [sys.executable, "-m", "xenswap.storage", "serve", "--store", str(self.store_dir),
               "--socket", str(self.sock), "--autoflush", str(self.autoflush), "-v"]
        if self.tcp_port:
            cmd += ["--tcp", f"127.0.0.1:{self.tcp_port}"]
        self.log = open(self.sock.with_suffix(".log"), "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith(b"serving on"):
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}, see {self.log.name}")
        return self

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
    return proc


@pytest.fixture
def golden_image(tmp_path: Path) -> Path:
    """A raw image: first half a 0x5a pattern, second half a hole (zeroes)."""
    path = tmp_path / "golden-src.raw"
    run("qemu-img", "create", "-f", "raw", str(path), str(GOLDEN_SIZE))
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {GOLDEN_SIZE // 2}", str(path))
    return path


@pytest.fixture
def store(tmp_path: Path, golden_image: Path) -> Iterator[Store]:
    st = Store(tmp_path / "store")
    st.create_golden("base", source=str(golden_image))
    yield st
    st.close()


@pytest.fixture
def server(tmp_path: Path, store: Store) -> Iterator[Server]:
    srv = Server(store.root, tmp_path / "nbd.sock").start()
    yield srv
    srv.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


os.environ.setdefault("LIBNBD_DEBUG", "0")
