"""Fixtures for the paging tests: host swap, and plain child processes with a known block of memory.

The fast tier drives the real Linux mechanisms (process_madvise, pagemap) on a child process instead of a
guest; ``ChildPort`` is a real (if tiny) hypervisor port whose "domains" are such children: pause is
SIGSTOP, vCPU time is the child's CPU time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from xenswap.hv.base import DomainInfo, Hypervisor
from xenswap.hv.qemu.memory import ProcessMemory
from xenswap.hv.qemu.memory_swap import setup_swap_file, swap_devices, teardown_swap

MEMCHILD = Path(__file__).parent / "memchild.py"


@pytest.fixture(scope="session")
def host_swap(tmp_path_factory):
    """Any active swap, or a 512 MiB swap file of our own for the session (removed afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("paging needs root (swapon, process_madvise on another process)")
    if swap_devices():
        yield swap_devices()[0]
        return
    path = tmp_path_factory.mktemp("swap") / "swapfile"
    dev = setup_swap_file(path, size_mib=512)
    yield dev
    teardown_swap(path)


class MemChild:
    """A child process holding ``pages`` pages of pseudo-random data (every 4th page left zero)."""

    def __init__(self, pages: int = 4096) -> None:
        self.proc = subprocess.Popen([sys.executable, str(MEMCHILD), str(pages)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.address, self.size = map(int, self.proc.stdout.readline().split())
        self.pid = self.proc.pid

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def checksum(self) -> str:
        return self.ask("sum")

    def touch(self, first: int, count: int) -> None:
        self.ask(f"touch {first} {count}")

    def mechanism(self) -> ProcessMemory:
        return ProcessMemory(self.pid, self.address, self.size)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def memchild(host_swap):
    children: list[MemChild] = []

    def spawn(pages: int = 4096) -> MemChild:
        children.append(MemChild(pages))
        return children[-1]

    yield spawn
    for child in children:
        child.stop()


class ChildPort(Hypervisor):
    """Domains are child processes: enough of a port for the manager's fast-tier tests."""

    name = "children"

    def __init__(self, children: dict[str, MemChild]) -> None:
        self.children = children

    def list_domains(self) -> list[DomainInfo]:
        return [DomainInfo(name, c.pid, c.size >> 20, 1, "-b----", self.vcpu_times(name)[0])
                for name, c in self.children.items()]

    def pause(self, ref: str | int) -> None:
        os.kill(self.children[str(ref)].pid, signal.SIGSTOP)

    def unpause(self, ref: str | int) -> None:
        os.kill(self.children[str(ref)].pid, signal.SIGCONT)

    def vcpu_times(self, ref: str | int) -> list[float]:
        with open(f"/proc/{self.children[str(ref)].pid}/schedstat") as f:
            return [int(f.read().split()[0]) / 1e9]


@pytest.fixture
def child_port():
    return ChildPort
