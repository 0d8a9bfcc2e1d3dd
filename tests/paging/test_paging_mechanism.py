"""The Linux mechanisms on a real child process: page-out, residency, access measurement, prefetch."""

import time
from pathlib import Path

from xenswap.hv.qemu.memory import ProcessMemory, page_out_process, rss_kib


def rss_anon_kib(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("RssAnon:"))
    return int(line.split()[1])


def test_page_out_keeps_content_and_frees_memory(memchild):
    child = memchild(4096)
    before = child.checksum()
    mech = child.mechanism()
    counts = mech.counts()
    assert counts["resident"] == 3072 and counts["shared"] == 1024  # zero pages map the shared zero page
    rss = rss_kib(child.pid)
    mech.page_out()
    after = mech.counts()
    # A handful of just-written pages can still sit in a per-CPU LRU batch the reclaim cannot isolate.
    assert after["resident"] <= 32 and after["swapped"] >= 3072 - 32
    assert rss - rss_kib(child.pid) >= 3072 * 4 * 0.9
    assert child.checksum() == before
    assert mech.counts()["resident"] == 3072  # reading it all faulted everything back


def test_page_out_of_a_subset(memchild):
    child = memchild(1024)
    mech = child.mechanism()
    keep = set(range(0, 1024, 2))
    mech.page_out(gfn for gfn in range(1024) if gfn not in keep)
    resident = set(mech.resident_pages())
    assert len(resident - keep) <= 32  # the last-written pages may still be in a per-CPU LRU batch
    assert len(resident) >= len({g for g in keep if g % 4}) - 16  # every even non-zero page stays


def test_accessed_pages_are_exactly_the_touched_ones(memchild):
    child = memchild(2048)
    mech = child.mechanism()
    assert mech.accessed_pages_and_clear() == []  # first call only clears
    child.touch(100, 8)
    child.touch(1500, 2)
    touched = mech.accessed_pages_and_clear()
    assert touched == [101, 102, 103, 105, 106, 107, 1501]  # 100, 104, 1500 are zero pages: not resident
    assert mech.accessed_pages_and_clear() == []  # nothing touched since


def test_prefetch_brings_pages_to_swap_cache_without_mapping(memchild):
    child = memchild(2048)
    mech = child.mechanism()
    before = child.checksum()
    mech.page_out()
    t0 = time.monotonic()
    mech.prefetch(range(2048))
    assert time.monotonic() - t0 < 5
    # WILLNEED reads into the swap cache only: pages stay unmapped until touched (minor faults then).
    assert mech.counts()["resident"] <= 32
    assert child.checksum() == before


def test_whole_process_page_out(memchild):
    child = memchild(2048)
    before = child.checksum()
    anon = rss_anon_kib(child.pid)
    page_out_process(child.pid)
    assert rss_anon_kib(child.pid) < anon / 4  # the child's heap, stack and the block itself
    assert child.checksum() == before


def test_gone_process_is_reported(memchild):
    child = memchild(256)
    mech = ProcessMemory(child.pid, child.address, child.size)
    child.stop()
    try:
        mech.page_out()
    except ProcessLookupError:
        pass
    else:
        raise AssertionError("page-out of an exited process did not fail")
