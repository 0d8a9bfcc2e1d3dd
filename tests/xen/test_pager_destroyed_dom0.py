"""A guest destroyed while its pager serves it (runs in the nested rig's dom0, patched hypervisor).

The pager maps the guest's ring page, and a mapped page keeps the guest's memory referenced: Xen could not finish
destroying the guest, which stayed a dying ``(null)`` domain for as long as the pager ran (with the pager of
before: still there 10 s after ``xl destroy``). The pager now notices that its domain is gone, lets go of the ring
and forgets the domain's pages in the store.
"""

from __future__ import annotations

import time

import pytest

from xenswap.hv.xen import domain_record, xl

pytestmark = [pytest.mark.dom0, pytest.mark.usefixtures("patched_xen")]


def test_a_destroyed_guest_is_let_go_of_and_its_pages_leave_the_store(pvh_guest, store):
    from xenswap.hv.xen.memory import XenMemory
    from xenswap.hv.xen.pager import DomainPager

    domid = xl.domid(pvh_guest.name)
    pager = DomainPager(domid, store).open()
    try:
        memory = XenMemory(domid, pager)
        memory.accessed_pages_and_clear()  # splits the superpages: the next harvests are exact
        time.sleep(2)
        memory.page_out_cold(2.0)
        stored = len(store.gfns(pager.key))
        assert stored > 1000

        xl.destroy(pvh_guest.name)
        deadline = time.monotonic() + 30
        while domain_record(domid) is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert domain_record(domid) is None, f"domain {domid} still there (dying) with its pager open"
        # the pager lets go of the ring first (that frees the domain), then forgets the pages (seconds for 30,000)
        assert pager.domain_gone.wait(120)
        # what was still out (the guest faulted a few frames back in between)
        assert stored - 1000 < pager.stats.released_pages <= stored
        assert store.gfns(pager.key) == [] and pager.out == set()
        assert store.check() == []
    finally:
        pager.close()  # after the let-go: nothing left to close, and no error
