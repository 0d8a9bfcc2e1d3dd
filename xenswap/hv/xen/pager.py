"""The dom0 pager (replaces xenpaging): evicts guest frames into the page store, serves the guest's vm_event paging
ring (page-in on fault), and answers the event-prefetch hook of our hypervisor patch 0002.

One ``DomainPager`` per guest, serving its ring from a thread. Run standalone (``python3 -m xenswap.hv.xen.pager
DOMAIN``) or inside the manager (xenswap.hv.xen.memory).

Acknowledged = durable. A frame is evicted in this order: ``nominate`` (Xen makes it not-present, so the guest can
no longer change it; a touch turns it "paging in" instead), copy it through a foreign mapping, commit the copy to
the page store (``PageStore.put_pages`` returns after the fsync), and only then ``evict`` (Xen frees the frame).
A page-in loads the stored copies in batches (one store query and one ``load_batch`` hypercall of our hypervisor
patch 0004 per LOAD_BATCH frames; per frame Xen allocates, copies and maps it, exactly like ``mem_paging_load``,
which is the fallback on a hypervisor without the patch) and only then drops the store's entries, only for the
frames Xen reported loaded. At every point a kill -9 leaves each frame either in Xen or in the store.

Restart. The store is the list of what is out (keyed by the domain's UUID, which a pager restart does not
change). A new pager finds the paging ring still enabled by the dead one (EBUSY), disables it (Xen releases any
held events and frees the ring; the requests that were on it are lost) and enables it again; then it answers
once per vCPU with "vCPU paused, page dropped": a vCPU that was paused waiting for the dead pager resumes, touches
its page again and asks again on the new ring (a vCPU that was not paused is left alone: Xen refuses to unpause
below zero). Frames nominated but not yet evicted when the old pager died stay in Xen, not present; the first
touch brings them back through the ring like any other.

A guest destroyed while its pager serves it: the pager's mapping of the ring page holds a reference to the
guest's memory, so Xen cannot finish destroying it: it stayed a dying ``(null)`` domain with its memory for as
long as the pager ran (measured in the rig: still there 10 s after ``xl destroy``, gone right after the pager
closed). The ring thread checks in its idle moments whether its domain is still there; when it is gone (or dying,
or its domid now belongs to another domain) the pager lets go of the ring and forgets the domain's pages in the
store, which nothing can load any more.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import functools
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from xenswap.config import state_dir
from xenswap.core.page_store import PageStore
from xenswap.core.staging import StagedCopies
from xenswap.hv.xen import bindings, domain_record, existing_domain_record, load_xc

MAP_BATCH = 256  # frames per foreign mapping while paging out
# Frames per page-in batch: one store query and one load_batch hypercall (its data is 1 MiB of locked dom0 memory).
LOAD_BATCH = 256
# What a hypervisor without patch 0004 answers to load_batch: Debian's Xen (no xenswap domctl) ENOSYS, ours without
# the sub-op EOPNOTSUPP; EINVAL as well, so that a sub-op refused for any reason degrades to the per-frame load
# (which then raises the real error if there is one).
NO_LOAD_BATCH = (errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
REMOVE_BATCH = 512  # loaded frames forgotten by the store per commit (page_in_all)
# Loaded frames forgotten per idle moment of the ring thread: a fault that arrives meanwhile waits for one such
# commit at most.
IDLE_REMOVE_BATCH = 128
# ... and only once neither the ring nor a load has been busy for this long: a woken guest's faults come in bursts
# with gaps of a few tenths of a second between them (its command runs on), and a fault that found the ring thread
# in a commit waited for it. 0.2 s (the ring wait) was enough within one access, not across a wake.
FLUSH_QUIET_SECONDS = 1.0
# How long close() waits for the ring thread to finish what it is serving before it leaves the ring enabled for a
# successor instead of disabling it under the thread.
THREAD_STOP_SECONDS = 60
# How often the idle ring thread checks that its domain still exists (one getdomaininfo hypercall).
DOMAIN_CHECK_SECONDS = 1.0
# Free heap glibc keeps instead of giving it back to the kernel (mallopt M_TRIM_THRESHOLD). A load batch allocates
# its page copies (256 x 4 KiB) and frees them; given back, the next wake's copies fault their memory in again, and
# in a PV dom0 every such fault is a page-table update through Xen. Measured in the rig's dom0 (600 stored pages
# read warm): 0.09 ms a page, 0.23 ms right after malloc_trim.
KEPT_FREE_HEAP = 32 << 20
# Frames per domain whose paged-out copies the pager keeps in dom0 RAM as well (``stage``): 4 MiB, ~2x a console
# command's working set in the rig (bench/bench_xen.py). The pagers of one process share one budget for all their
# domains (xenswap.core.staging; the manager's: xenswap.hv.xen.memory.STAGE_BUDGET_MIB); a pager made without
# one has a budget of its own of this size.
STAGE_LIMIT_PAGES = 1024
M_TRIM_THRESHOLD = -1


@functools.cache  # a process-wide setting: once, not per pager
def keep_freed_heap() -> bool:
    """Make this process keep KEPT_FREE_HEAP of freed heap (glibc only; False where there is no mallopt)."""
    try:
        return ctypes.CDLL(None).mallopt(M_TRIM_THRESHOLD, KEPT_FREE_HEAP) == 1
    except (OSError, AttributeError):
        return False


def default_store_path() -> Path:
    return state_dir() / "xen-pages.db"


def uuid_text(handle: list[int]) -> str:
    """A domain handle (xc's 16 bytes) as a UUID string: the page store's key (domids are reused, UUIDs are not)."""
    hexed = "".join(f"{b:02x}" for b in handle)
    return f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:]}"


def domain_uuid(domid: int) -> str:
    """The domain's UUID (``uuid_text`` of its handle)."""
    return uuid_text(existing_domain_record(domid)["handle"])


def domain_vcpus(domid: int) -> int:
    return int(existing_domain_record(domid)["max_vcpu_id"]) + 1


@dataclass
class PagerStats:
    evicted: int = 0
    evict_skipped: int = 0  # nominate or evict refused (frame busy, special, already out)
    faults: int = 0  # page-in requests served from the ring
    prefetched: int = 0
    held_events: int = 0
    fault_seconds: list[float] = field(default_factory=list)  # load time per fault (last 1000)
    restarts_recovered: int = 0  # the ring was found enabled by a previous pager
    superpages_split: int = 0
    serve_errors: int = 0  # errors the ring thread reported and went on after (on stderr)
    released_pages: int = 0  # pages of the destroyed domain the store forgot when the pager let it go
    staged_loads: int = 0  # frames loaded from those copies instead of the store
    store_read_seconds: float = 0.0  # page-in time spent reading (and checking) stored copies
    xen_load_seconds: float = 0.0  # ... and handing them to Xen


# Called with the held event's request; returns once what the event needs is loaded (the pager then answers).
EventHook = Callable[["DomainPager", object], None]


class DomainPager:
    """Pages one domain's frames out to and back in from a PageStore, serving its paging ring from a thread."""

    def __init__(self, domid: int, store: PageStore, key: str | None = None, on_event: EventHook | None = None,
                 staging: StagedCopies | None = None):
        keep_freed_heap()
        self.xc = bindings.load()
        self.domid = domid
        self.store = store
        self._xc = load_xc().xc()  # pause/unpause, domain info
        self._handle = list(existing_domain_record(domid, self._xc)["handle"])  # tells a reused domid apart
        self.key = key or uuid_text(self._handle)
        self.on_event = on_event
        self.ctrl = bindings.open_xenctrl()
        self.fmem = self.xc.ForeignMemory()
        self.stats = PagerStats()
        self.domain_gone = threading.Event()  # set once the domain was found destroyed and the pager let go
        self.out: set[int] = set(self.store.gfns(self.key))  # frames this domain has in the store
        self._lock = threading.RLock()  # page-out, page-in and the ring thread, one at a time per frame set
        self._loaded_pending: list[int] = []  # loaded frames the store has not forgotten yet
        # Copies of frames that are out, held in dom0 RAM for the next wake (``stage``); every copy held is of a
        # frame that is out and in the store. Owned by (UUID, domid): an ``xl reboot`` makes a new domain with the
        # same UUID, whose pager may run in this process beside the old one's.
        self.staging = staging if staging is not None else StagedCopies(STAGE_LIMIT_PAGES, STAGE_LIMIT_PAGES)
        self._stage_owner = (self.key, domid)
        self._last_busy = 0.0  # monotonic time of the last ring request or load (FLUSH_QUIET_SECONDS)
        self.batched_load: bool | None = None  # does the hypervisor have load_batch (0004)? None: not tried yet
        self.channel: bindings.VmEventChannel | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # Held events wait here for the event thread, which runs the hook (a prefetch: up to seconds) and then
        # answers; the ring thread meanwhile goes on serving faults (None: stop).
        self._held: queue.SimpleQueue = queue.SimpleQueue()
        self._event_thread: threading.Thread | None = None
        self._answer_lock = threading.Lock()  # the ring's response side: both threads answer

    # -- ring

    def open(self) -> DomainPager:
        """Enable (or take over) the paging ring and start serving it."""
        try:
            self.channel = bindings.VmEventChannel.open(self.ctrl, self.domid)
        except OSError as error:
            if error.errno != errno.EBUSY:
                raise
            # A previous pager died with the ring enabled: take it over (see the module docstring). Paused
            # meanwhile: a fault while no ring is enabled would crash the guest.
            self._xc.domain_pause(self.domid)
            try:
                self.ctrl.mem_paging_disable(self.domid)
                self.channel = bindings.VmEventChannel.open(self.ctrl, self.domid)
            finally:
                self._xc.domain_unpause(self.domid)
            self.stats.restarts_recovered += 1
            self._unpause_all()
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=f"xenswap-pager-{self.domid}", daemon=True)
        self._event_thread = threading.Thread(target=self._serve_held_events, name=f"xenswap-events-{self.domid}",
                                              daemon=True)
        self._event_thread.start()
        self._thread.start()
        return self

    def _unpause_all(self) -> None:
        responses = []
        for vcpu in range(domain_vcpus(self.domid)):
            responses.append(self.xc.VmEvent(reason=self.xc.REASON_MEM_PAGING, vcpu_id=vcpu,
                                             flags=self.xc.FLAG_VCPU_PAUSED, u_flags=self.xc.PAGING_DROP_PAGE))
        self.channel.answer(responses)

    def close(self, page_in_all: bool = False) -> None:
        """Stop serving. With ``page_in_all`` every frame goes back to the guest first and the ring is disabled;
        without, the ring stays as it is for the next pager (frames stay out, the store keeps them)."""
        if page_in_all and self.channel is not None:
            self.page_in_all()
        self._stop.set()
        serving = False
        if self._thread is not None:
            self._thread.join(timeout=THREAD_STOP_SECONDS)
            serving = self._thread.is_alive()  # stuck in a long load: it still owns the ring
            self._thread = None
        if self._event_thread is not None:
            # it answers what the ring thread handed it (its hooks first), then stops
            self._held.put(None)
            self._event_thread.join(timeout=THREAD_STOP_SECONDS)
            serving = serving or self._event_thread.is_alive()  # stuck in a hook: it may still answer
            self._event_thread = None
        self._flush_loaded()
        self.staging.forget(self._stage_owner)  # (a cache: a successor pager stages again)
        if self.channel is not None:
            if (page_in_all or not self.out) and not serving:
                self._disable_ring()
            else:
                self.channel.close_keep_enabled()
            self.channel = None

    def _disable_ring(self) -> None:
        """Answer what is still on the ring, then disable it, with the domain paused.

        Why: a request put after the ring thread's last look (a vCPU that faulted on a frame the page-in was
        loading at that moment) would go with the ring, and its vCPU would stay paused for good: Xen's
        vm_event_disable unblocks only the vCPUs waiting for a free slot, not those paused on a request. Paused,
        no vCPU can put a new one in between. A held event among them is answered without its hook (the event
        thread has stopped): nothing is left to prefetch (or the ring would be kept), and the disable delivers it
        anyway."""
        self._xc.domain_pause(self.domid)
        try:
            left = self.channel.ring.get_requests()
            if left:
                self.handle(left)  # the event thread is gone: held events are answered at once
            with contextlib.suppress(OSError):
                self.channel.close()
        finally:
            self._xc.domain_unpause(self.domid)

    def __enter__(self) -> DomainPager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        checked = time.monotonic()
        while not self._stop.is_set():
            try:
                # Loaded frames are forgotten a few at a time once the ring has been quiet (FLUSH_QUIET_SECONDS):
                # after a 20 ms gap the commits landed between the faults of one guest access (measured in the rig:
                # the md5sum of a paged 2 MiB file took 47 s instead of 6.1 s, 63 instead of 9 ms per fault round
                # trip).
                requests = self.channel.wait(0.2)
            except (OSError, ValueError) as error:
                if self._stop.is_set():
                    return
                # the thread goes on: a ring nobody serves any more hangs the guest at its next fault
                self._serve_error("waiting on the ring", error)
                continue
            try:
                if requests:
                    self._last_busy = time.monotonic()
                    self.handle(requests)
                elif self._loaded_pending:
                    if time.monotonic() - self._last_busy >= FLUSH_QUIET_SECONDS:
                        self._flush_loaded(IDLE_REMOVE_BATCH)
                elif time.monotonic() - checked >= DOMAIN_CHECK_SECONDS:
                    checked = time.monotonic()
                    if self.domain_is_gone():
                        self._let_go_of_destroyed_domain()
                        return
            except Exception as error:
                self._serve_error("serving the ring", error)

    def domain_is_gone(self) -> bool:
        """True once the domain is gone, dying, or its domid belongs to another domain."""
        info = domain_record(self.domid, self._xc)
        return info is None or bool(info.get("dying")) or list(info["handle"]) != self._handle

    def _let_go_of_destroyed_domain(self) -> None:
        """The ring thread, once its domain is gone: unmap the ring and close the event channel (Xen can then
        free the domain), stop the event thread, and forget the domain's pages in the store.

        Unless a live domain has the same UUID (``xl reboot`` makes a new domain with it, and the store's key is
        the UUID): its pager may page out under that key, so the entries are left for it (a later load of one of
        them gets ENOENT from Xen and drops it)."""
        self._stop.set()
        self._held.put(None)  # the event thread answers nothing more: there is no ring to answer on
        with self._answer_lock:
            channel, self.channel = self.channel, None
            if channel is not None:
                with contextlib.suppress(OSError):
                    channel.close_keep_enabled()
        with self._lock:
            try:
                twin = any(list(info["handle"]) == self._handle and not info.get("dying")
                           for info in self._xc.domain_getinfo(0, 1 << 15) if int(info["domid"]) != self.domid)
            except Exception:  # the list could not be read: keeping stale entries is the safe side
                twin = True
            if not twin:
                self.stats.released_pages = self.store.drop_domain(self.key)
                self.out.clear()
                self._loaded_pending.clear()
            self.staging.forget(self._stage_owner)
        self.domain_gone.set()
        print(f"xenswap pager {self.domid}: the domain is gone; let go of its ring"
              f"{'' if twin else f' and forgot its {self.stats.released_pages} stored pages'}",
              file=sys.stderr, flush=True)

    def _serve_error(self, doing: str, error: Exception) -> None:
        with contextlib.suppress(Exception):  # if the lookup fails too, report the error and go on
            if domain_record(self.domid, self._xc) is None:
                self._stop.set()  # the domain is gone, and its ring with it
                return
        self.stats.serve_errors += 1
        print(f"xenswap pager {self.domid}: {doing}: {error!r}", file=sys.stderr, flush=True)
        self._stop.wait(0.1)  # an error that repeats must not spin

    def handle(self, requests: list) -> None:
        """Serve ring requests: page-in faults from the store, answered at once; held events go to the event
        thread, which runs the hook (the prefetch) and then answers them.

        Why two threads: a hook may take seconds (it loads an event's whole predicted working set), and the guest
        keeps running meanwhile (only the held event waits). A fault that came in with a held event used to be
        answered after that event's hook, so the faulting vCPU waited for the whole prefetch. Measured in the rig
        with a hook that sleeps 1 s on every console event: a 2 MiB md5sum (~730 faults) with the hold on took
        5.7-6.3 s, as without the hold."""
        faults = [r for r in requests if r.reason == self.xc.REASON_MEM_PAGING]
        if faults:
            # All the faults on the ring at once: one batch. EVICT_FAIL: touched between nominate and evict; Xen
            # still has the frame, the answer maps it.
            started = time.perf_counter()
            try:
                self._load([r.gfn for r in faults if not r.u_flags & self.xc.PAGING_EVICT_FAIL])
            except Exception as error:  # answer anyway: a vCPU left paused would hang the guest
                # (an unloaded frame faults again and comes back as a new request)
                print(f"xenswap pager {self.domid}: page-in of {len(faults)} faulted frames failed: {error}",
                      file=sys.stderr)
            each = (time.perf_counter() - started) / len(faults)
            self.stats.faults += len(faults)
            self.stats.fault_seconds.extend([each] * len(faults))
            del self.stats.fault_seconds[:-1000]
            self._answer(faults)
        others = []
        for request in requests:
            if request.reason == self.xc.REASON_XENSWAP_EVTCHN:
                self.stats.held_events += 1
                if self.on_event is not None and self._event_thread is not None:
                    self._held.put(request)
                    continue
            if request.reason != self.xc.REASON_MEM_PAGING:
                others.append(request)  # a held event without a hook, or a reason this pager does not serve
        self._answer(others)

    def _answer(self, requests: list) -> None:
        if requests:
            with self._answer_lock:
                if self.channel is not None:  # None: the domain is gone, and its ring with it
                    self.channel.answer([r.response() for r in requests])

    def _serve_held_events(self) -> None:
        """The event thread: the hook, then the answer that lets Xen deliver the event, one held event at a time
        (Xen announces a port once until it is answered, so this queue stays as short as the guest's ports)."""
        while (request := self._held.get()) is not None:
            hook = self.on_event
            try:
                if hook is not None:
                    hook(self, request)
            except Exception as error:  # deliver anyway: a late event beats a lost one
                print(f"xenswap pager {self.domid}: event hook failed: {error!r}", file=sys.stderr, flush=True)
            try:
                self._answer([request])
            except Exception as error:
                self._serve_error("answering a held event", error)

    # -- paging

    def page_out(self, gfns: Iterable[int]) -> int:
        """Evict these frames into the store; returns how many were evicted. Skipped: frames Xen refuses to page
        (special or referenced ones), and frames the guest touched since the last clearing harvest (see
        _page_out_batch)."""
        todo = sorted(set(int(g) for g in gfns) - self.out)
        evicted = 0
        for start in range(0, len(todo), MAP_BATCH):
            evicted += self._page_out_batch(todo[start:start + MAP_BATCH])
        return evicted

    def split_superpages(self, accessed: Iterable[int], limit: int | None = None) -> int:
        """Make the next harvests exact where 2 MiB superpages made them coarse; returns how many were split.

        The NPT harvest reports all 512 frames of a superpage leaf when any was touched, so a fully reported
        aligned 2 MiB run is (almost always) a superpage. Xen splits a superpage when one of its frames changes
        type, and nominating one does that; a nominated frame cannot be un-nominated (mem_paging_load refuses
        it: ENOENT), so the frame is paged out like any other (the guest faults it back if it needs it).
        ``limit`` bounds the run (frames beyond the guest's RAM are never chosen)."""
        hot = set(accessed)
        runs = sorted({gfn >> 9 for gfn in hot})
        split = 0
        for run in runs:
            first = run << 9
            victim = first + 511
            if (limit is not None and victim >= limit) or victim in self.out:
                continue
            if all(first + i in hot for i in range(512)):
                split += self._page_out_batch([victim], keep_touched=False)
        self.stats.superpages_split += split
        return split

    def _page_out_batch(self, gfns: list[int], keep_touched: bool = True) -> int:
        """Evict one batch with the domain paused, keeping the frames whose accessed bit is set.

        Why paused and why the accessed check: Xen copies hypercall arguments from guest memory, and a copy from
        a frame that is being paged out fails with -EFAULT instead of waiting (only hardware accesses fault into
        the ring). A vCPU stopped between writing its arguments and the hypercall instruction would get that
        error (Linux BUG()s on -EFAULT from e.g. VCPUOP_set_singleshot_timer: measured, the guest crashed); its
        argument frame was just written, so its accessed bit is set, and the pause keeps it from writing a new
        frame while the batch is nominated."""
        with self._lock:
            self._xc.domain_pause(self.domid)
            try:
                first = gfns[0]
                touched: set[int] = set()
                if keep_touched:
                    bitmap, _ = self.ctrl.harvest_accessed(self.domid, first, gfns[-1] - first + 1, False)
                    touched = set(bindings.bitmap_to_gfns(bitmap, first))
                nominated = []
                for gfn in gfns:
                    if gfn in touched:
                        self.stats.evict_skipped += 1
                        continue
                    try:
                        self.ctrl.mem_paging_nominate(self.domid, gfn)
                        nominated.append(gfn)
                    except OSError:
                        self.stats.evict_skipped += 1  # EBUSY (referenced, special), EINVAL (not RAM), ...
                if not nominated:
                    return 0
                pages = {}
                with self.fmem.map(self.domid, nominated) as mapping:
                    for index, gfn in enumerate(nominated):
                        if mapping.errors[index] == 0:
                            pages[gfn] = bytes(mapping.page(index))
                self.store.put_pages(self.key, pages)  # durable before Xen drops anything
                self.out.update(pages)
                evicted = 0
                for gfn in pages:
                    try:
                        self.ctrl.mem_paging_evict(self.domid, gfn)
                        evicted += 1
                        # the bytes already copied; asked first, lock-free: a page-out evicts ~32,000 frames
                        # of which a wake set is ~1,000
                        if self.staging.wants(self._stage_owner, gfn):
                            self.staging.hold(self._stage_owner, gfn, pages[gfn])
                    except OSError:
                        # Touched since nominate (Xen keeps the frame; the fault's answer maps it back) or still
                        # referenced: the store's copy is not needed.
                        self.stats.evict_skipped += 1
                        self.out.discard(gfn)
                        self.store.remove_pages(self.key, [gfn])
                self.stats.evicted += evicted
                return evicted
            finally:
                self._xc.domain_unpause(self.domid)

    def _load(self, gfns: Iterable[int]) -> int:
        """Load these frames from the store if they are out, LOAD_BATCH at a time; returns how many were loaded.

        The lock is taken per batch, so the ring thread's faults get in between the batches of a long page-in."""
        wanted = list(dict.fromkeys(int(g) for g in gfns))
        loaded = 0
        for start in range(0, len(wanted), LOAD_BATCH):
            with self._lock:
                loaded += self._load_batch([g for g in wanted[start:start + LOAD_BATCH] if g in self.out])
            self._last_busy = time.monotonic()
        return loaded

    def _load_batch(self, gfns: list[int]) -> int:
        """One batch (the lock held): read the stored copies in one query, hand them to Xen in one hypercall, and
        account for each frame by what Xen said about it."""
        if not gfns:
            return 0
        started = time.perf_counter()
        staged = {g: copy for g in gfns if (copy := self.staging.get(self._stage_owner, g)) is not None}
        pages = self.store.get_pages(self.key, [g for g in gfns if g not in staged])  # (none left: no query)
        pages.update(staged)
        self.stats.staged_loads += len(staged)
        read = time.perf_counter()
        stored = [g for g in gfns if g in pages]
        statuses = self._load_into_xen(stored, pages) if stored else []
        self.stats.store_read_seconds += read - started
        self.stats.xen_load_seconds += time.perf_counter() - read
        loaded = 0
        failed: list[tuple[int, int]] = []
        done = [g for g in gfns if g not in pages]  # out but not in the store: nothing to load
        for gfn, status in zip(stored, statuses, strict=True):
            if status == 0:
                loaded += 1
            elif status != errno.ENOENT:
                # e.g. ENOMEM: the frame stays out and in the store; the others of the batch are accounted for
                failed.append((gfn, status))
                continue
            # ENOENT: the frame is not paged out (never evicted, or loaded before a crash): the stored copy is
            # stale either way.
            done.append(gfn)
        self.out.difference_update(done)
        for gfn in done:  # back in the guest, which may change it: the copy is stale from now on
            self.staging.release(self._stage_owner, gfn)
        # Forgetting loaded frames is only tidying (a stale copy is never loaded: Xen refuses a load into a frame
        # that is not paged out, and a new page-out replaces it), so it is left out of the latency path of a fault
        # or a held event: the ring thread does it in its idle moments, page_in_all and close at their end.
        self._loaded_pending.extend(done)
        if failed:
            gfn, status = failed[0]
            raise OSError(status, f"{os.strerror(status)} (gfn {gfn:#x}, {len(failed)} of {len(stored)} frames of "
                                  "the batch not loaded)", "mem_paging_load")
        return loaded

    def _load_into_xen(self, gfns: list[int], pages: dict[int, bytes]) -> list[int]:
        """Xen's answer per frame (0 or an errno): load_batch (patch 0004) if the hypervisor has it, else one
        mem_paging_load each."""
        if self.batched_load is not False:
            try:
                statuses = self.ctrl.mem_paging_load_batch(self.domid, gfns, [pages[g] for g in gfns])
                self.batched_load = True
                return statuses
            except OSError as error:
                if self.batched_load or error.errno not in NO_LOAD_BATCH:
                    raise
                self.batched_load = False  # a hypervisor without 0004: say so once, then per frame
                print(f"xenswap pager {self.domid}: no batched load in this hypervisor ({error.strerror}), "
                      "loading frame by frame", file=sys.stderr)
        statuses = []
        for gfn in gfns:
            try:
                self.ctrl.mem_paging_load(self.domid, gfn, pages[gfn])
                statuses.append(0)
            except OSError as error:
                statuses.append(error.errno or errno.EIO)
        return statuses

    def _flush_loaded(self, limit: int | None = None) -> None:
        """Make the store forget loaded frames (all, or the first ``limit``), one commit per REMOVE_BATCH."""
        with self._lock:
            todo = self._loaded_pending[:limit] if limit is not None else list(self._loaded_pending)
            for start in range(0, len(todo), REMOVE_BATCH):
                # a frame paged out again since it was loaded is in the store for that page-out: kept
                self.store.remove_pages(self.key, [g for g in todo[start:start + REMOVE_BATCH] if g not in self.out])
            del self._loaded_pending[:len(todo)]

    def prefetch(self, gfns: Iterable[int]) -> int:
        """Load these frames now if they are out (no fault, no vCPU pause); returns how many were loaded."""
        wanted = [g for g in sorted(set(int(g) for g in gfns)) if g in self.out]
        n = self._load(wanted)
        self.stats.prefetched += n
        return n

    def stage(self, gfns: Iterable[int]) -> int:
        """Hold a copy in dom0 RAM of each of these frames while it is out, so that loading it reads no store;
        returns how many frames are held now. The first ``stage_limit`` of them in the given order (most wanted
        first); replaces the previous set. Held within the process's budget (``staging``: a content several
        domains hold is held once, and a full budget drops the copies of the domains that asked longest ago). The
        store keeps its copy as well (the durable one: a pager restart starts with nothing staged).

        Why: the manager stages the predicted working sets of the domain's event types before it pages the domain
        out, so that an event's prefetch is a Xen load only. Measured in the rig's dom0 (bench/bench_xen.py): a
        wake loaded ~430 frames in ~0.11 s, ~80% of it reading and checking them in the store. The copies are the
        bytes the page-out took anyway; a frame already out is read from the store once, here, not on the wake."""
        with self._lock:
            wanted = self.staging.want(self._stage_owner, gfns)
            missing = [g for g in wanted if g in self.out and self.staging.get(self._stage_owner, g) is None]
            if missing:
                stored = self.store.get_pages(self.key, missing)
                for gfn in missing:  # most wanted first: a full budget refuses the least wanted
                    if gfn in stored:
                        self.staging.hold(self._stage_owner, gfn, stored[gfn])
            return self.staging.held_count(self._stage_owner)

    @property
    def stage_limit(self) -> int:
        """At most this many frames of this domain are staged."""
        return self.staging.per_owner

    def staged(self) -> dict[int, bytes]:
        """The copies held now for this domain: gfn -> content."""
        return self.staging.held(self._stage_owner)

    def page_in_all(self) -> int:
        loaded = 0
        todo = sorted(self.out)
        for start in range(0, len(todo), REMOVE_BATCH):
            loaded += self.prefetch(todo[start:start + REMOVE_BATCH])
            self._flush_loaded()
        return loaded

    # -- event prefetch (patch 0002)

    def hold_events(self, enable: bool = True) -> int:
        """Hold event delivery while frames are out, announcing each event on the ring; returns ports held."""
        return self.ctrl.evtchn_prefetch(self.domid, enable)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m xenswap.hv.xen.pager", description=__doc__.splitlines()[0])
    parser.add_argument("domain", help="domain name or id")
    parser.add_argument("--store", type=Path, default=None, help=f"page store (default {default_store_path()})")
    parser.add_argument("--page-out", metavar="FIRST-LAST", default=None,
                        help="evict this gfn range (hex or decimal) after starting, then keep serving")
    parser.add_argument("--page-out-cold", type=float, metavar="SECONDS", default=None,
                        help="evict every frame not accessed during this many seconds (the access-bit harvest)")
    parser.add_argument("--hold-events", action="store_true", help="hold events until the pager answers (0002)")
    parser.add_argument("--page-in-all-on-exit", action="store_true")
    args = parser.parse_args(argv)

    from xenswap.hv.xen import open_hypervisor

    hv = open_hypervisor()
    domid = hv.domid(args.domain)
    hv.close()
    store = PageStore(args.store or default_store_path())
    pager = DomainPager(domid, store).open()
    print(f"pager: domain {domid}, {len(pager.out)} frames out in the store"
          f"{', took over the ring of a previous pager' if pager.stats.restarts_recovered else ''}", flush=True)
    if args.hold_events:
        pager.hold_events(True)
    from xenswap.hv.xen.memory import XenMemory

    memory = XenMemory(domid, pager)
    if args.page_out:
        first, _, last = args.page_out.partition("-")
        gfns = range(int(first, 0), int(last or first, 0) + 1)
        started = time.monotonic()
        n = pager.page_out(gfns)
        print(f"pager: evicted {n} frames in {time.monotonic() - started:.2f} s", flush=True)
    if args.page_out_cold is not None:
        started = time.monotonic()
        n, hot = memory.page_out_cold(args.page_out_cold)
        took = time.monotonic() - started - args.page_out_cold
        print(f"pager: evicted {n} cold frames in {took:.2f} s ({len(hot)} hot)", flush=True)
    print(f"pager: serving; {len(pager.out)} frames out", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    pager.close(page_in_all=args.page_in_all_on_exit)
    print(f"pager: stopped; {pager.stats}", flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
