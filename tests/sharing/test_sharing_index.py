"""The sharing index (pure) and the two real mechanisms it predicts for: the page hasher and KSM."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenswap.core.sharing import ABSENT, HASHED, ZERO, SharingIndex
from xenswap.hv import ksm
from xenswap.hv.pagehash import PageHasher


def test_stats_split_zero_self_and_cross_sharing() -> None:
    index = SharingIndex()
    # vm a: contents 1, 1, zero, 2 ; vm b: contents 1, zero, 3, (absent)
    index.add_vm("a", [1, 1, 9, 2], [HASHED, HASHED, ZERO, HASHED])
    index.add_vm("b", [1, 9, 3, 0], [HASHED, ZERO, HASHED, ABSENT])
    s = index.stats()
    assert (s.vms, s.resident_pages, s.zero_pages, s.unique_contents) == (2, 7, 2, 3)
    # content 1: 3 copies -> 2 freeable (1 within a, 1 across); zero: 2 copies -> 1 across
    assert (s.shareable_pages, s.self_shareable, s.cross_shareable) == (3, 1, 2)
    groups = index.candidates()
    assert [len(g) for g in groups] == [3, 2]
    assert {(r.vm, r.index) for r in groups[0]} == {("a", 0), ("a", 1), ("b", 0)}
    assert len(list(index.candidates(cross_vm_only=True))) == 2


def test_readding_a_vm_replaces_and_removing_forgets() -> None:
    index = SharingIndex()
    index.add_vm("a", [5, 5], [HASHED, HASHED])
    index.add_vm("a", [6, 7], [HASHED, HASHED])
    assert index.stats().shareable_pages == 0
    index.add_vm("b", [6], [HASHED])
    assert index.stats().cross_shareable == 1
    index.remove_vm("a")
    assert index.stats().resident_pages == 1
    assert list(index.candidates()) == []


CHILD = """
import mmap, sys, ctypes
pages = int(sys.argv[1])
region = mmap.mmap(-1, pages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(pages):
    region[i * 4096:(i + 1) * 4096] = bytes([1 + i % 7]) * 4096  # 7 distinct contents
region.madvise(mmap.MADV_MERGEABLE)
print(ctypes.addressof(ctypes.c_char.from_buffer(region)), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def twins() -> Iterator[list[tuple[int, int]]]:
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, "512"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    yield [(p.pid, int(p.stdout.readline())) for p in procs]  # type: ignore[union-attr]
    for p in procs:
        p.communicate(b"")


def test_index_over_real_processes_predicts_what_ksm_merges(twins: list[tuple[int, int]]) -> None:
    """Two processes, 512 pages each of 7 distinct contents: the index predicts 1024 - 7 shareable pages, and KSM,
    scanning only these MADV_MERGEABLE regions, gets to the same number."""
    if not Path("/sys/kernel/mm/ksm/run").exists():
        pytest.skip("kernel without KSM")
    hasher = PageHasher(use_kmod=False)
    index = SharingIndex()
    for n, (pid, address) in enumerate(twins):
        r = hasher.hash_range(pid, address, 512)
        index.add_vm(f"p{n}", r.hashes, r.status)
    predicted = index.stats()
    assert predicted.shareable_pages == 1024 - 7
    assert predicted.cross_shareable == 7

    # Count on our two processes only (/proc/PID/ksm_merging_pages): the machine-wide pages_sharing also moves
    # with other processes' mergeable memory coming and going while we wait.
    def merging_pages() -> int:
        return sum(int(Path(f"/proc/{pid}/ksm_merging_pages").read_text()) for pid, _ in twins)

    resident = predicted.resident_pages
    with ksm.scanning(pages_to_scan=5000, sleep_millisecs=10):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and merging_pages() < resident:
            time.sleep(0.5)
        merged = merging_pages()
    # every resident page ended up on a KSM page; one copy per distinct content stays, the rest is the saving
    assert merged == resident, (merged, predicted)
    assert merged - predicted.unique_contents == predicted.shareable_pages

