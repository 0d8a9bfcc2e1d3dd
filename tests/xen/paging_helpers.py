"""Helpers of the dom0 paging tests (imported by test modules next to it: pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from xenswap.core.page_store import PageStore


@contextlib.contextmanager
def serving(domid: int, store: PageStore, **pager_options) -> Iterator:
    """A pager for one test that gives every frame back at its end, also when the test fails: the module's next
    test then starts from a guest with all its memory, so a failure stays the failing test's."""
    from xenswap.hv.xen.pager import DomainPager

    pager = DomainPager(domid, store, **pager_options).open()
    try:
        yield pager
        assert pager.stats.serve_errors == 0, "the ring thread reported errors (stderr)"
    finally:
        pager.close(page_in_all=True)


@contextlib.contextmanager
def frozen(pager) -> Iterator[None]:
    """The domain paused and the pager's lock held: no fault may page a frame the test chose in meanwhile."""
    pager._xc.domain_pause(pager.domid)
    try:
        with pager._lock:
            yield
    finally:
        pager._xc.domain_unpause(pager.domid)


def page_out_to_working_set(memory, window: float = 3.0) -> tuple[int, list[int]]:
    memory.accessed_pages_and_clear()  # the first is coarse (superpages), and splits them
    time.sleep(window)
    return memory.page_out_cold(window, intervals=2)  # two intervals: what the guest uses now, conservatively


@contextlib.contextmanager
def paged_to_working_set(domid: int, store: PageStore) -> Iterator[tuple]:
    """``serving`` with the guest paged out to its working set first (at least 3/4 of its frames out): yields the
    pager, its XenMemory and the working set."""
    from xenswap.hv.xen.memory import XenMemory

    with serving(domid, store) as pager:
        memory = XenMemory(domid, pager)
        evicted, hot = page_out_to_working_set(memory)
        assert evicted > memory.guest_pages() * 3 // 4
        yield pager, memory, hot
