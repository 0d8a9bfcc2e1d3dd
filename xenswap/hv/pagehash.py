"""Hash the resident pages of a process's address range (xxh64, seed 0), without faulting others in.

Two mechanisms with identical results, so callers never care which one ran:
- the kernel module kmod/xenswap_pagehash.ko (``/dev/xenswap-pagehash``): one ioctl per range, pages pinned
  with FOLL_NOFAULT and hashed in place;
- user space: /proc/PID/pagemap says which pages are resident, /proc/PID/mem reads just those.
Paged-out pages are reported ABSENT in both: hashing an idle VM for sharing must not undo its page-out.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import xxhash

from xenswap.errors import XenswapError

PAGE = 4096
ABSENT, HASHED, ZERO = 0, 1, 2
DEVICE = Path("/dev/xenswap-pagehash")

# struct xsph_request from kmod/xenswap_pagehash.h: u32 pid, u32 flags, u64 start, npages, hashes, status, hashed
_REQUEST = struct.Struct("=IIQQQQQ")
_IOC_HASH = (3 << 30) | (_REQUEST.size << 16) | (ord("x") << 8) | 0x51  # _IOWR('x', 0x51, struct xsph_request)
_PM_PRESENT = 1 << 63
_ZERO_HASH = xxhash.xxh64_intdigest(bytes(PAGE))


@dataclass
class RangeHashes:
    start: int
    hashes: array.array  # 'Q', one per page; meaningful where status != ABSENT
    status: bytes  # ABSENT / HASHED / ZERO per page

    @property
    def resident(self) -> int:
        return sum(1 for s in self.status if s != ABSENT)


class PageHasher:
    """``PageHasher()`` picks the kernel module when it is loaded; ``PageHasher(use_kmod=False)`` forces user space."""

    def __init__(self, use_kmod: bool | None = None):
        available = DEVICE.exists()
        if use_kmod and not available:
            raise XenswapError(f"{DEVICE} missing: load kmod/xenswap_pagehash.ko (make -C kmod; insmod)")
        self.use_kmod = available if use_kmod is None else use_kmod

    def hash_range(self, pid: int, start: int, npages: int) -> RangeHashes:
        if start % PAGE or npages <= 0:
            raise XenswapError(f"bad range: start {start:#x} must be page-aligned and npages {npages} positive")
        if self.use_kmod:
            return self._kernel(pid, start, npages)
        return self._user(pid, start, npages)

    def _kernel(self, pid: int, start: int, npages: int) -> RangeHashes:
        hashes = array.array("Q", bytes(8 * npages))
        status = ctypes.create_string_buffer(npages)
        hashes_addr, _ = hashes.buffer_info()
        request = bytearray(_REQUEST.pack(pid, 0, start, npages, hashes_addr, ctypes.addressof(status), 0))
        with open(DEVICE, "rb", buffering=0) as dev:
            try:
                fcntl.ioctl(dev, _IOC_HASH, request, True)
            except OSError as exc:
                raise XenswapError(f"page hash of pid {pid} at {start:#x}+{npages} pages: {exc.strerror}") from exc
        return RangeHashes(start, hashes, status.raw)

    def _user(self, pid: int, start: int, npages: int) -> RangeHashes:
        hashes = array.array("Q", bytes(8 * npages))
        status = bytearray(npages)
        try:
            pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
            mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except FileNotFoundError as exc:
            raise XenswapError(f"no process {pid}") from exc
        try:
            entries = array.array("Q", os.pread(pagemap, 8 * npages, (start // PAGE) * 8))
            for i, entry in enumerate(entries):
                if not entry & _PM_PRESENT:
                    continue
                try:
                    data = os.pread(mem, PAGE, start + i * PAGE)
                except OSError:
                    continue  # unmapped between the two reads
                h = xxhash.xxh64_intdigest(data)
                hashes[i] = h
                status[i] = ZERO if h == _ZERO_HASH and data == bytes(PAGE) else HASHED
        finally:
            os.close(pagemap)
            os.close(mem)
        return RangeHashes(start, hashes, bytes(status))
