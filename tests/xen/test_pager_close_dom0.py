"""Closing the pager while a vCPU waits on the ring (runs in the nested rig's dom0, patched hypervisor).

Xen's vm_event_disable unblocks only the vCPUs waiting for a free ring slot, not a vCPU paused on a request it put
on the ring: a request the ring thread never saw (put after its last look) would leave that vCPU paused for good
once the ring is disabled. The pager's close answers what is left on the ring, with the domain paused, before it
disables the ring. The test makes that moment last: the ring thread is stopped, the guest faults on a paged-out
file and waits on the ring, and only then is the pager closed.
"""

from __future__ import annotations

import time

import pytest

from xenswap.core.page_store import PageStore
from xenswap.hv.xen import xl

pytestmark = [pytest.mark.dom0, pytest.mark.usefixtures("patched_xen")]


def test_close_answers_a_request_its_ring_thread_never_saw(pvh_guest, tmp_path):
    from xenswap.hv.xen.memory import XenMemory
    from xenswap.hv.xen.pager import DomainPager

    xl.console_command(pvh_guest.name, "dd if=/dev/urandom of=/tmp/blob bs=64k count=4 2>/dev/null; echo ok")
    expected = xl.console_command(pvh_guest.name, "md5sum /tmp/blob")[0].split()[0]
    domid = xl.domid(pvh_guest.name)

    with PageStore(tmp_path / "pages.db") as store:
        pager = DomainPager(domid, store).open()
        memory = XenMemory(domid, pager)
        memory.accessed_pages_and_clear()  # splits the superpages: the next harvests are exact
        time.sleep(2)
        memory.page_out_cold(2.0)
        assert len(pager.out) > 1000

        pager._stop.set()  # the ring thread stops serving: what the guest asks for now waits on the ring
        pager._thread.join()
        pager._thread = None
        xl.type_on_console(pvh_guest.name, "md5sum /tmp/blob > /tmp/sum.txt")
        deadline = time.monotonic() + 60
        while not pager.channel.ring.pending() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pager.channel.ring.pending(), "the guest did not fault on its paged-out file"

        pager.close(page_in_all=True)  # loads every frame, then answers the waiting request and disables the ring
        assert pager.out == set() and store.gfns(pager.key) == []
        # the vCPU that waited on the ring runs again: the md5sum it was computing finishes and is right
        assert xl.console_command(pvh_guest.name, "cat /tmp/sum.txt", timeout=60)[0].split()[0] == expected
