"""The small, hypervisor-neutral contract between the memory engines (xenswap.core) and a port's mechanism.

Pages are guest frame numbers (gfn: guest-physical address // page_size, 4 KiB). A QEMU port implements it
with process_madvise/pagemap on the QEMU process (xenswap.hv.qemu.memory); a Xen port with the paging
interface of libxenctrl. The engines only ever see sorted lists of gfns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

PAGE_SIZE = 4096


@runtime_checkable
class MemoryMechanism(Protocol):
    """Residency, access tracking and paging of one domain's guest RAM."""

    page_size: int

    def guest_pages(self) -> int:
        """Number of guest frames (gfn 0 .. guest_pages()-1)."""

    def resident_pages(self) -> list[int]:
        """Frames currently in host RAM (mapped; not swapped, not yet faulted in)."""

    def accessed_pages_and_clear(self) -> list[int]:
        """Frames the guest touched since the previous call; clears the accessed bits for the next interval."""

    def page_out(self, gfns: Iterable[int] | None = None) -> int:
        """Evict these frames (all when None) to the host's swap; returns how many frames were asked for."""

    def prefetch(self, gfns: Iterable[int]) -> int:
        """Start reading these frames back (asynchronously, no guest stall); returns how many were asked for."""


def to_ranges(gfns: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Coalesce frame numbers into (first, count) runs: few syscalls and compact storage."""
    start = prev = None
    for gfn in sorted(set(gfns)):
        if start is None:
            start = prev = gfn
        elif gfn == prev + 1:
            prev = gfn
        else:
            yield start, prev - start + 1
            start = prev = gfn
    if start is not None:
        yield start, prev - start + 1


def from_ranges(ranges: Iterable[Iterable[int]]) -> list[int]:
    return [gfn for first, count in ranges for gfn in range(first, first + count)]


def pages_to_mib(pages: int, page_size: int = PAGE_SIZE) -> float:
    return pages * page_size / (1024 * 1024)
