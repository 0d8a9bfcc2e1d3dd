"""Linux memory mechanisms on another process's memory: the QEMU port's ``MemoryMechanism``.

Works on any process and address range (tests use a child that allocates and checksums memory; the port
passes QEMU's pid and the host range of guest RAM). All from outside the process, no cooperation needed:

- page-out / prefetch: ``process_madvise(pidfd_open(pid), iovecs, MADV_PAGEOUT | MADV_WILLNEED)``;
  zram and zswap need two PAGEOUT passes (the first only moves pages to the swap cache / compressor);
- residency: ``/proc/PID/pagemap`` present (bit 63) and swapped (bit 62) bits, one u64 per 4 KiB page;
- accesses: this kernel has no per-process DAMON, no page_idle, and smaps ``Referenced:`` is only a per-VMA
  total, so the accessed frames of an interval are measured by demand paging: pages out the range ("clear"),
  and the frames found present again at the next call are exactly the ones the guest touched. Without memory
  pressure the evicted pages stay in the swap cache, so a touch costs a minor fault, not disk I/O.

Guest RAM backed by transparent huge pages is split by the first page-out; after that the measurement is at
4 KiB granularity (starting QEMU with THP disabled, ``prctl(PR_SET_THP_DISABLE)`` inherited over exec, avoids
the 2 MiB phase entirely).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import select
import time
from array import array
from collections.abc import Iterable, Iterator

from xenswap.core.mechanism import PAGE_SIZE, to_ranges
from xenswap.errors import XenswapError

# x86_64 syscall numbers and madvise advice values (include/uapi/asm-generic/unistd.h, mman-common.h).
SYS_PIDFD_OPEN = 434
SYS_PROCESS_MADVISE = 440
MADV_WILLNEED = 3
MADV_COLD = 20
MADV_PAGEOUT = 21
IOV_MAX = 1024  # UIO_MAXIOV: iovecs per process_madvise call

PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_EXCLUSIVE = 1 << 56  # mapped by this process only: excludes the shared zero page (read-only faults)
PM_PFN_MASK = (1 << 55) - 1
RESIDENT_MASK = PM_PRESENT | PM_EXCLUSIVE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class MemoryMechanismError(XenswapError):
    pass


def pidfd_open(pid: int) -> int:
    fd = _libc.syscall(SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise ProcessLookupError(err, f"pidfd_open({pid}): {os.strerror(err)}")
    return fd


def process_madvise(pidfd: int, ranges: Iterable[tuple[int, int]], advice: int) -> int:
    """Advise (host_addr, length) ranges of the pidfd's process; returns bytes advised. Batches of IOV_MAX."""
    ranges = list(ranges)
    done = 0
    for i in range(0, len(ranges), IOV_MAX):
        batch = ranges[i : i + IOV_MAX]
        iov = (_IoVec * len(batch))(*[_IoVec(addr, length) for addr, length in batch])
        res = _libc.syscall(SYS_PROCESS_MADVISE, ctypes.c_int(pidfd), iov, ctypes.c_size_t(len(batch)),
                            ctypes.c_int(advice), ctypes.c_uint(0))
        if res < 0:
            err = ctypes.get_errno()
            if err == 3:  # ESRCH: the process is gone
                raise ProcessLookupError(err, "process_madvise: process exited")
            raise MemoryMechanismError(f"process_madvise(advice={advice}) failed: {os.strerror(err)}")
        done += res
    return done


class ProcessMemory:
    """``MemoryMechanism`` over [base, base+length) of process ``pid``: gfn i is the page at base + i*4096."""

    page_size = PAGE_SIZE

    def __init__(self, pid: int, base: int, length: int, pageout_passes: int = 2, trim: bool | None = None) -> None:
        if base % PAGE_SIZE or length % PAGE_SIZE:
            raise MemoryMechanismError(f"range {base:#x}+{length:#x} is not page aligned")
        self.pid, self.base, self.length = pid, base, length
        self.pageout_passes = pageout_passes
        self.pidfd = pidfd_open(pid)
        self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        self._measuring = False
        self.overhead_ws: list[tuple[int, int]] = []  # host (addr, length) runs of QEMU's own working set
        self._overhead_released = False  # the last release_overhead paged QEMU's own memory out
        # Trim the swap cache after page-outs when swap is asynchronous (a file); zram frees pages at once.
        self.trim = swap_is_asynchronous() if trim is None else trim

    def alive(self) -> bool:
        """False once the process exited (its pidfd turns readable); a restarted QEMU needs a new mechanism."""
        if self.pidfd < 0:
            return False
        return not select.select([self.pidfd], [], [], 0)[0]

    def close(self) -> None:
        for fd in (self.pidfd, self._pagemap):
            try:
                os.close(fd)
            except OSError:
                pass
        self.pidfd = self._pagemap = -1

    def __enter__(self) -> ProcessMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "pidfd", -1) >= 0:
            self.close()

    # -- residency

    def guest_pages(self) -> int:
        return self.length // PAGE_SIZE

    def pagemap(self) -> array:
        """One u64 pagemap entry per page of the range."""
        n = self.guest_pages()
        data = os.pread(self._pagemap, n * 8, (self.base // PAGE_SIZE) * 8)
        if len(data) != n * 8:
            raise ProcessLookupError(3, f"pagemap of {self.pid} short read (process gone?)")
        entries = array("Q")
        entries.frombytes(data)
        return entries

    def resident_pages(self) -> list[int]:
        """Present and exclusively mapped: a page only ever read is mapped to the shared zero page, costs nothing
        and cannot be paged out, so it does not count (KSM-merged pages are not exclusive either)."""
        return [i for i, e in enumerate(self.pagemap()) if e & RESIDENT_MASK == RESIDENT_MASK]

    def swapped_pages(self) -> list[int]:
        return [i for i, e in enumerate(self.pagemap()) if e & PM_SWAPPED]

    def counts(self) -> dict[str, int]:
        entries = self.pagemap()
        resident = sum(1 for e in entries if e & RESIDENT_MASK == RESIDENT_MASK)
        shared = sum(1 for e in entries if e & RESIDENT_MASK == PM_PRESENT)
        swapped = sum(1 for e in entries if e & PM_SWAPPED)
        return {"pages": len(entries), "resident": resident, "shared": shared, "swapped": swapped,
                "untouched": len(entries) - resident - shared - swapped}

    # -- paging

    def _advise(self, gfns: Iterable[int] | None, advice: int) -> int:
        if gfns is None:
            runs = [(0, self.guest_pages())]
        else:
            runs = list(to_ranges(gfns))
        n = self.guest_pages()
        ranges = [(self.base + first * PAGE_SIZE, count * PAGE_SIZE) for first, count in runs
                  if 0 <= first and first + count <= n]
        process_madvise(self.pidfd, ranges, advice)
        return sum(count for _, count in runs)

    def page_out(self, gfns: Iterable[int] | None = None) -> int:
        gfns = None if gfns is None else list(gfns)
        # Only the frames mapped now go to the swap cache by this page-out: those are the ones to trim. (Trimming
        # the whole range read every frame already on disk back in, a full swap-in of the guest on every
        # page-out, and swap readahead left part of it in the swap cache.)
        to_trim = self._present(gfns) if self.trim else []
        pages = 0
        # Pages faulted in moments ago sit in the faulting CPU's LRU batch, where reclaim cannot isolate them;
        # MADV_PAGEOUT drains only the *calling* CPU's batch, so run one pass on each CPU (zram/zswap want two
        # passes anyway: the first only moves pages to the swap cache).
        with _rotating_cpus() as cpus:
            for i in range(max(self.pageout_passes, len(cpus))):
                if cpus:
                    os.sched_setaffinity(0, {cpus[i % len(cpus)]})
                pages = self._advise(gfns, MADV_PAGEOUT)
        if to_trim:
            self.trim_swap_cache(to_trim)
        return pages

    def _present(self, gfns: list[int] | None) -> list[int]:
        """Those of ``gfns`` (all when None) that are mapped (present, this process's own or shared)."""
        entries = self.pagemap()
        if gfns is None:
            return [i for i, e in enumerate(entries) if e & PM_PRESENT]
        n = len(entries)
        return [g for g in gfns if 0 <= g < n and entries[g] & PM_PRESENT]

    def release_overhead(self, keep_working_set: bool = False) -> int:
        """Page out the hypervisor process's own memory outside guest RAM (QEMU's heap, TCG code buffer, its
        private copies of .data/.bss): ~40 MiB per TCG guest that an idle guest rarely needs. The pages that
        were resident are remembered as QEMU's working set, for ``prefetch_overhead`` on wake-up (without
        it, a woken guest waits on demand faults of QEMU itself). Returns bytes advised."""
        ranges = [(s, n) for s, n in anonymous_ranges(self.pid) if s + n <= self.base or s >= self.base + self.length]
        present = self._resident_runs(ranges)
        if keep_working_set and self.overhead_ws:
            # What QEMU faulted back since the previous release is its own idle working set: keep it
            # (a few MiB) so that a paused guest's wake-up does not wait on QEMU's main loop paging in.
            self._overhead_released = False
            return 0
        if present:
            self.overhead_ws = present
        self._overhead_released = True
        with _rotating_cpus() as cpus:
            for cpu in cpus[:2] or [None]:
                if cpu is not None:
                    os.sched_setaffinity(0, {cpu})
                done = process_madvise(self.pidfd, present, MADV_PAGEOUT)
        if self.trim:
            self._trim_ranges(present)
        return done

    def prefetch_overhead(self) -> int:
        """Start reading back what ``release_overhead`` paged out of QEMU itself; returns bytes advised. Nothing
        when the last release kept QEMU's idle working set: reading back all it had resident when it was last
        released (tens of MiB after boot) cost a kept-resident wake-up ~4 ms for pages it mostly does not need."""
        if not self.overhead_ws or not self._overhead_released:
            return 0
        try:
            return process_madvise(self.pidfd, self.overhead_ws, MADV_WILLNEED)
        except MemoryMechanismError:  # a mapping went away since (QEMU freed it): advise what still exists
            valid = {(s, n) for s, n in anonymous_ranges(self.pid)}
            keep = [(a, n) for a, n in self.overhead_ws if any(s <= a and a + n <= s + m for s, m in valid)]
            return process_madvise(self.pidfd, keep, MADV_WILLNEED)

    def _resident_runs(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """(addr, length) runs of the pages in ``ranges`` resident for this process alone."""
        runs: list[tuple[int, int]] = []
        for addr, length in ranges:
            n = length // PAGE_SIZE
            data = os.pread(self._pagemap, n * 8, (addr // PAGE_SIZE) * 8)
            entries = array("Q")
            entries.frombytes(data[: len(data) // 8 * 8])
            idx = [i for i, e in enumerate(entries) if e & RESIDENT_MASK == RESIDENT_MASK]
            runs += [(addr + first * PAGE_SIZE, count * PAGE_SIZE) for first, count in to_ranges(idx)]
        return runs

    def trim_swap_cache(self, gfns: Iterable[int] | None = None, timeout: float = 5.0) -> None:
        """Free the RAM that just-paged-out frames still hold as swap cache.

        With a swap *file* the write-out is asynchronous: reclaim cannot free a page under writeback, so after
        MADV_PAGEOUT most pages linger, unmapped, in the swap cache until memory pressure (zram is synchronous
        and has no such tail). Once writeback is done we map the pages back without I/O (a read through
        /proc/PID/mem takes a minor fault on each swap-cache page) and page them out again: now they are
        clean, already on disk, and reclaim frees them at once."""
        runs = [(0, self.guest_pages())] if gfns is None else list(to_ranges(gfns))
        self._trim_ranges([(self.base + first * PAGE_SIZE, count * PAGE_SIZE) for first, count in runs], timeout)

    def _trim_ranges(self, ranges: list[tuple[int, int]], timeout: float = 5.0) -> None:
        wait_for_writeback(timeout)
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as mem:
            for addr, length in ranges:
                for off in range(0, length, 8 << 20):
                    with contextlib.suppress(OSError):  # a mapping that went away meanwhile
                        os.preadv(mem.fileno(), [bytearray(min(8 << 20, length - off))], addr + off)
        process_madvise(self.pidfd, ranges, MADV_PAGEOUT)

    def prefetch(self, gfns: Iterable[int]) -> int:
        return self._advise(list(gfns), MADV_WILLNEED)

    def accessed_pages_and_clear(self) -> list[int]:
        """Frames touched since the previous call (see the module doc); the first call only clears."""
        touched = self.resident_pages() if self._measuring else []
        self.page_out(None)
        # Reclaim may briefly fail to isolate a page touched moments ago (locked, or still in an LRU batch);
        # retry those few, so that the next interval does not report them as touched again.
        for delay in (0.001, 0.005, 0.02):
            left = self.resident_pages()
            if not left:
                break
            time.sleep(delay)
            self.page_out(left)
        self._measuring = True
        return touched


def swap_is_asynchronous() -> bool:
    """True when the highest-priority active swap is a file or disk (not zram)."""
    try:
        with open("/proc/swaps") as f:
            devices = [line.split() for line in list(f)[1:]]
    except OSError:
        return False
    if not devices:
        return False
    best = max(devices, key=lambda d: int(d[4]))
    return not best[0].startswith("/dev/zram")


def wait_for_writeback(timeout: float = 5.0) -> None:
    """Until the host has no pages under writeback (or timeout): page-outs to a swap file are asynchronous."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/meminfo") as f:
            writeback = next((int(line.split()[1]) for line in f if line.startswith("Writeback:")), 0)
        if writeback < 64:
            return
        time.sleep(0.01)


@contextlib.contextmanager
def _rotating_cpus() -> Iterator[list[int]]:
    """The CPUs this thread may run on; the thread's affinity is restored afterwards."""
    allowed = os.sched_getaffinity(0)
    try:
        yield sorted(allowed)
    finally:
        os.sched_setaffinity(0, allowed)


def parse_maps(pid: int) -> list[tuple[int, int, str, str]]:
    """(start, end, perms, path) of each mapping of ``pid``."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return out


def anonymous_ranges(pid: int) -> list[tuple[int, int]]:
    """Every private mapping that can hold the process's own anonymous pages: anonymous maps, heap and stack,
    and the copied-on-write pages of private file maps (.data, .bss, RELRO). Pages of a file map shared with
    other processes (library text) are skipped by the kernel itself, so other processes are not hurt."""
    out = []
    for start, end, perms, path in parse_maps(pid):
        if not perms.endswith("p") or perms.startswith("---"):
            continue
        if path.startswith("[") and path not in ("[heap]", "[stack]"):
            continue  # [vdso], [vvar], [vsyscall]: special mappings madvise refuses
        out.append((start, end - start))
    return out


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in KiB (Rss, Pss, Swap, SwapPss, ...)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """CPU time of one thread in seconds from schedstat (ns resolution; stat's utime is 10 ms ticks)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except FileNotFoundError:
        raise ProcessLookupError(3, f"thread {tid} of {pid} is gone") from None


def page_out_process(pid: int, passes: int = 2) -> int:
    """Page out every anonymous mapping of a process (guest RAM plus QEMU's own); returns bytes advised."""
    fd = pidfd_open(pid)
    try:
        total = 0
        for _ in range(passes):
            total = process_madvise(fd, anonymous_ranges(pid), MADV_PAGEOUT)
        return total
    finally:
        os.close(fd)


_swap_checked = False


def mechanism_for(hv: object, name: str) -> ProcessMemory:
    """The QEMU port's mechanism for one guest: its QEMU process and the host range of its RAM. The first
    call makes sure the host has swap (any active swap, else the project's default swap file)."""
    from xenswap.hv.qemu.memory_swap import ensure_swap
    from xenswap.hv.qemu.vm import QemuVM

    global _swap_checked
    if not _swap_checked:
        ensure_swap()
        _swap_checked = True

    vm = QemuVM.open(name)
    start, length = vm.ram_region()
    return ProcessMemory(vm.pid, start, length)


def range_digest(pid: int, base: int, length: int) -> str:
    """sha256 of [base, base+length) of another process (guest RAM of a paused QEMU), read via /proc/PID/mem.
    Reading faults swapped pages back in: compare digests taken before and after a page-out."""
    digest = hashlib.sha256()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        offset = 0
        while offset < length:
            chunk = os.pread(mem.fileno(), min(8 << 20, length - offset), base + offset)
            if not chunk:
                raise MemoryMechanismError(f"short read of /proc/{pid}/mem at {base + offset:#x}")
            digest.update(chunk)
            offset += len(chunk)
    return digest.hexdigest()
