"""The Xen port's ``MemoryMechanism`` (xenswap.core.mechanism): Xen's mem_paging driven by our dom0 pager.

- guest_pages: the guest's RAM frames (its memory size; PVH RAM starts at gfn 0 and, below 3 GiB, is one run);
- resident_pages: the frames that are not paged out (the pager's out-set, which mirrors the page store);
- accessed_pages_and_clear: the hypervisor's access-bit harvest (patch 0001, XEN_DOMCTL_xenswap_op) over the
  guest's NPT: what the guest touched since the previous call, measured by the hardware walker, no faults;
- page_out: nominate, copy into the page store (durable), evict (see xenswap.hv.xen.pager);
- prefetch: load from the store in batches (one store query and one load_batch hypercall of patch 0004 per 256
  frames; per frame Xen allocates, copies and maps it, as mem_paging_load does, the fallback without 0004);
- stage (an optional extra the manager calls before a page-out): the pager keeps copies of a wake's predicted
  frames in dom0 RAM, so that prefetching them reads no store. The pagers of this process share one budget for
  those copies (STAGE_BUDGET_MIB), and a page several domains hold is held once (xenswap.core.staging).

The guest keeps running while it is paged: a touch of an evicted frame pauses the vCPU and puts a request on
the paging ring, which the pager's thread answers from the store. One pager (and ring) per domain and process:
``mechanism_for`` keeps them in a registry shared with the wake source (xenswap.hv.xen.memory_events).

Superpages: the harvest reports every gfn of a 2 MiB leaf as accessed when any was; the first harvest of a fresh
guest is coarse. Nominating a frame splits its superpage, so accessed_pages_and_clear pages out one frame of each
fully reported 2 MiB run, and the harvests after it are exact.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterable

from xenswap.core.mechanism import PAGE_SIZE
from xenswap.core.page_store import PageStore
from xenswap.core.staging import StagedCopies, StagingStats
from xenswap.errors import XenswapError
from xenswap.hv.xen import bindings, existing_domain_record
from xenswap.hv.xen.pager import STAGE_LIMIT_PAGES, DomainPager, default_store_path

# PVH/HVM guests have MMIO and firmware holes from 3 GiB up to 4 GiB: RAM frames above that are remapped
# past 4 GiB. Guests this project pages are far smaller; a bigger one is only paged below the hole.
LOW_RAM_LIMIT_PAGES = (3 << 30) // PAGE_SIZE
# dom0 RAM for the staged copies of all the paged domains together, unless XENSWAP_STAGE_BUDGET_MIB says otherwise:
# the wake sets of ~32 domains at the per-domain limit (STAGE_LIMIT_PAGES, 4 MiB), more where guests of one image
# hold the same pages; beyond it the domains idle longest read their wake from the store.
STAGE_BUDGET_MIB = 128
STAGE_BUDGET_ENV = "XENSWAP_STAGE_BUDGET_MIB"


class XenMemory:
    """MemoryMechanism over one Xen domain through its DomainPager."""

    page_size = PAGE_SIZE

    def __init__(self, domid: int, pager: DomainPager) -> None:
        self.domid = domid
        self.pager = pager
        self.ctrl = pager.ctrl
        info = existing_domain_record(domid)
        self._recent: set[int] = set()  # accessed in the last harvest interval
        self._pages = min(int(info["maxmem_kb"]) // (PAGE_SIZE // 1024), LOW_RAM_LIMIT_PAGES,
                          self.ctrl.domain_maximum_gpfn(domid) + 1)

    def alive(self) -> bool:
        """False once the domain is gone (or its id was reused by another domain)."""
        return not self.pager.domain_is_gone()

    def guest_pages(self) -> int:
        return self._pages

    def resident_pages(self) -> list[int]:
        out = self.pager.out
        return [gfn for gfn in range(self._pages) if gfn not in out]

    def accessed_pages_and_clear(self) -> list[int]:
        """The harvest; superpages it could only report whole are split (one frame each paged out), so the
        following harvests are exact to the 4 KiB frame."""
        accessed = bindings.harvest_working_set(self.ctrl, self.domid, 0, self._pages, clear=True)
        self.pager.split_superpages(accessed, limit=self._pages)
        self._recent = set(accessed)
        return accessed

    def page_out(self, gfns: Iterable[int] | None = None) -> int:
        """Page out these frames, except those touched in the last harvest interval: a frame the guest uses
        now is kept even if asked for (it would fault straight back, and under the emulated NPT a hot frame can
        look cold for one interval: see docs/xen.md)."""
        wanted = range(self._pages) if gfns is None else [g for g in gfns if 0 <= g < self._pages]
        wanted = list(wanted)
        self.pager.page_out(g for g in wanted if g not in self._recent)
        return len(wanted)

    def page_out_cold(self, window: float, intervals: int = 1) -> tuple[int, list[int]]:
        """Measure the working set over ``intervals`` harvest windows of ``window`` seconds and page out every
        other frame; returns (frames evicted, the working set). The clearing harvest that starts the measurement
        also splits a fresh guest's superpages, so the windows after it are exact."""
        self.accessed_pages_and_clear()
        hot: set[int] = set()
        for _ in range(intervals):
            time.sleep(window)
            hot |= set(self.accessed_pages_and_clear())
        before = self.pager.stats.evicted
        self.page_out(g for g in range(self._pages) if g not in hot)
        return self.pager.stats.evicted - before, sorted(hot)

    def prefetch(self, gfns: Iterable[int]) -> int:
        wanted = list(gfns)
        self.pager.prefetch(wanted)
        return len(wanted)

    def stage(self, gfns: Iterable[int]) -> int:
        """Optional mechanism extra: hold these frames' copies in dom0 RAM while they are out (DomainPager.stage)."""
        return self.pager.stage(gfns)

    def close(self) -> None:
        pass  # the pager outlives the mechanism (registry below)


_store: PageStore | None = None
_staging: StagedCopies | None = None
_pagers: dict[int, DomainPager] = {}
_registry_lock = threading.Lock()


def stage_budget_pages() -> int:
    """The process's budget for staged copies, in pages (STAGE_BUDGET_MIB, or the environment's)."""
    text = os.environ.get(STAGE_BUDGET_ENV, str(STAGE_BUDGET_MIB))
    try:
        mib = int(text)
    except ValueError:
        mib = 0
    if mib < 1:
        raise XenswapError(f"{STAGE_BUDGET_ENV}={text!r}: give the dom0 RAM for staged copies as a whole number "
                           "of MiB, at least 1")
    return mib * (1 << 20) // PAGE_SIZE


def staging_stats() -> StagingStats | None:
    """What this process's pagers hold staged (None before the first pager)."""
    return None if _staging is None else _staging.stats()


def pager_for(domid: int) -> DomainPager:
    """This process's pager of a domain (opened, serving), created on first use with the shared page store."""
    global _store, _staging
    with _registry_lock:
        pager = _pagers.get(domid)
        if pager is not None and pager.domain_is_gone():
            pager.close()
            del _pagers[domid]
            pager = None
        if pager is None:
            if _store is None:
                _store = PageStore(default_store_path())
            if _staging is None:
                _staging = StagedCopies(stage_budget_pages(), STAGE_LIMIT_PAGES)
            pager = DomainPager(domid, _store, staging=_staging).open()
            _pagers[domid] = pager
        return pager


def mechanism_for(hv, name: str) -> XenMemory:
    """The manager's factory (xenswap.core.policy.mechanism_factory_for): the mechanism of one domain by name."""
    domid = hv.domid(name)
    if domid == 0:
        # An OSError: the manager's tick skips a domain whose mechanism raises one ("skipped: ...").
        raise OSError(errno.EPERM, "Domain-0 is never paged (it runs the pager)")
    return XenMemory(domid, pager_for(domid))
