"""Hypervisor patch 0005 in the nested rig's dom0: a hypercall whose argument frame is paged out is re-executed
once the pager has loaded the frame, instead of failing with -EFAULT (which guests take as their own bug: Linux
BUG()s on it in its timer path, the guest crash of docs/xen.md).

The guest's ``xenswap-hcall-probe`` (xenswap/guest/hcall_probe.c) writes a hypercall's argument into a page of its
own, reports the page's frame and sleeps; the test pages exactly that frame out; the probe then issues the
hypercall, so Xen's read of its argument meets the paged-out frame. On stock Xen (or without 0005) the probe
prints errno=14 (EFAULT).
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from xenswap.core.page_store import PageStore
from xenswap.hv.xen import xl

pytestmark = [pytest.mark.dom0, pytest.mark.usefixtures("patched_xen")]

PROBE_SLEEP = 20  # seconds the probe leaves its argument page alone: time for the test to page it out


def restarts_logged() -> int:
    dmesg = subprocess.run(["xl", "dmesg"], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"xenswap: hypercall \d+ restarted", dmesg))


def test_hypercall_with_a_paged_out_argument_is_restarted_not_failed(pvh_guest, tmp_path):
    from xenswap.hv.xen.memory import XenMemory
    from xenswap.hv.xen.pager import DomainPager

    domid = xl.domid(pvh_guest.name)
    # the hypercall works while its argument is resident (the probe and the guest's privcmd are fine)
    resident = xl.console_command(pvh_guest.name, "xenswap-hcall-probe 0")
    assert any(line.startswith("rc=0 errno=0") for line in resident), resident
    started = xl.console_command(pvh_guest.name, f"xenswap-hcall-probe {PROBE_SLEEP} >/tmp/probe.out 2>&1 & "
                                 "sleep 1; cat /tmp/probe.out")
    match = re.search(r"pfn=(0x[0-9a-f]+)", "\n".join(started))
    assert match, f"the probe did not start: {started}"
    gfn = int(match.group(1), 16)

    with PageStore(tmp_path / "pages.db") as store, DomainPager(domid, store).open() as pager:
        memory = XenMemory(domid, pager)
        memory.accessed_pages_and_clear()  # splits a superpage around the frame, so the next harvest is exact
        memory.accessed_pages_and_clear()  # forgets the probe's write of its argument
        restarts_before, faults_before = restarts_logged(), pager.stats.faults
        assert pager.page_out([gfn]) == 1, "the probe's argument frame was not paged out (touched? busy?)"
        assert gfn in pager.out

        deadline = time.monotonic() + PROBE_SLEEP + 120
        result: list[str] = []
        while time.monotonic() < deadline and not any(line.startswith("rc=") for line in result):
            time.sleep(2)
            result = xl.console_command(pvh_guest.name, "cat /tmp/probe.out")
        outcome = next((line for line in result if line.startswith("rc=")), None)
        assert outcome is not None, f"the probe did not finish: {result}"
        # EVTCHNOP_status of the guest's own port 1 succeeds once Xen can read the argument
        assert outcome.startswith("rc=0 errno=0"), f"the hypercall failed instead of being restarted: {outcome}"
        assert gfn not in pager.out, "the argument frame came back some other way than the pager"
        assert pager.stats.faults > faults_before
        assert restarts_logged() > restarts_before, "xl dmesg does not show the restart"
        pager.close(page_in_all=True)
