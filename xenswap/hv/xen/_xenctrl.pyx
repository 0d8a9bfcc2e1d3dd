# xenswap: requires-header = /usr/include/xenctrl.h
# distutils: libraries = xenctrl xenevtchn xenforeignmemory xencall
# cython: language_level=3
"""What xen.lowlevel.xc lacks: mem_paging, mem_sharing, the vm_event ring and its event channel, foreign mapping of
guest frames, and the xenswap hypervisor patches' domctl (access-bit harvest, event-prefetch hold).

Every failing call raises OSError(errno, strerror, "<C function name>"), e.g.
``[Errno 38] Function not implemented: 'xc_memshr_control'``. Handles are closed by ``close()`` or on garbage
collection; all objects are usable as context managers.
"""

cimport cython
from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo
from libc.errno cimport errno
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import os

PAGE_SIZE = 4096
PAGING_RING = HVM_PARAM_PAGING_RING_PFN
SHARING_RING = HVM_PARAM_SHARING_RING_PFN
REASON_MEM_PAGING = VM_EVENT_REASON_MEM_PAGING
REASON_MEM_SHARING = VM_EVENT_REASON_MEM_SHARING
REASON_XENSWAP_EVTCHN = XS_VM_EVENT_REASON_XENSWAP_EVTCHN
FLAG_VCPU_PAUSED = VM_EVENT_FLAG_VCPU_PAUSED
PAGING_DROP_PAGE = MEM_PAGING_DROP_PAGE
PAGING_EVICT_FAIL = MEM_PAGING_EVICT_FAIL
VM_EVENT_INTERFACE_VERSION = XS_VM_EVENT_INTERFACE_VERSION
# Frames per XEN_DOMCTL_xenswap_op load_batch hypercall (patch 0004): mem_paging_load_batch splits longer lists.
LOAD_BATCH_MAX = XS_LOAD_BATCH_MAX
# Channel states in REASON_XENSWAP_EVTCHN requests (Xen's ECS_*).
EVTCHN_STATE_NAMES = {3: "interdomain", 4: "pirq", 5: "virq", 6: "ipi"}


cdef raise_errno(str function, int err=0):
    if err == 0:
        err = errno
    if err == 0:
        err = 5  # EIO: the library failed without saying why
    raise OSError(err, os.strerror(err), function)


cdef class XenCtrl:
    """A libxenctrl handle (plus a libxencall one for the xenswap domctl, opened on first use)."""

    cdef xc_interface *xch
    cdef xencall_handle *xcall

    def __cinit__(self):
        self.xch = xc_interface_open(NULL, NULL, 0)
        if self.xch == NULL:
            raise_errno("xc_interface_open")

    def close(self):
        if self.xcall != NULL:
            xencall_close(self.xcall)
            self.xcall = NULL
        if self.xch != NULL:
            xc_interface_close(self.xch)
            self.xch = NULL

    def __dealloc__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef xc_interface *_handle(self) except NULL:
        if self.xch == NULL:
            raise ValueError("XenCtrl handle is closed")
        return self.xch

    cdef xencall_handle *_xencall(self) except NULL:
        self._handle()
        if self.xcall == NULL:
            self.xcall = xencall_open(NULL, 0)
            if self.xcall == NULL:
                raise_errno("xencall_open")
        return self.xcall

    # ------------------------------------------------------------------ mem_paging

    def mem_paging_enable(self, uint32_t domid):
        """Enable the paging ring (its page must already be populated); returns the ring's event port in Xen."""
        cdef uint32_t port = 0
        if xc_mem_paging_enable(self._handle(), domid, &port) < 0:
            raise_errno("xc_mem_paging_enable")
        return port

    def mem_paging_disable(self, uint32_t domid):
        if xc_mem_paging_disable(self._handle(), domid) < 0:
            raise_errno("xc_mem_paging_disable")

    def mem_paging_resume(self, uint32_t domid):
        """Tell Xen responses are on the ring (the event channel notify does the same)."""
        if xc_mem_paging_resume(self._handle(), domid) < 0:
            raise_errno("xc_mem_paging_resume")

    def mem_paging_nominate(self, uint32_t domid, uint64_t gfn):
        if xc_mem_paging_nominate(self._handle(), domid, gfn) < 0:
            raise_errno("xc_mem_paging_nominate")

    def mem_paging_evict(self, uint32_t domid, uint64_t gfn):
        if xc_mem_paging_evict(self._handle(), domid, gfn) < 0:
            raise_errno("xc_mem_paging_evict")

    def mem_paging_prep(self, uint32_t domid, uint64_t gfn):
        if xc_mem_paging_prep(self._handle(), domid, gfn) < 0:
            raise_errno("xc_mem_paging_prep")

    def mem_paging_load(self, uint32_t domid, uint64_t gfn, const unsigned char[::1] page):
        """Page gfn back in with these 4096 bytes (allocates the frame: no prep needed)."""
        if page.shape[0] != PAGE_SIZE:
            raise ValueError(f"a page is {PAGE_SIZE} bytes, got {page.shape[0]}")
        if xc_mem_paging_load(self._handle(), domid, gfn, <void *>&page[0]) < 0:
            raise_errno("xc_mem_paging_load")

    def mem_paging_load_batch(self, uint32_t domid, gfns, pages):
        """Page these gfns back in, gfns[i] with pages[i] (4096 bytes each), in one hypercall per LOAD_BATCH_MAX
        frames (patch 0004; per frame exactly what mem_paging_load does).

        Returns one status per gfn: 0 = loaded, else its errno (ENOENT: not paged out, the stored copy is stale);
        one frame's failure does not stop the others. OSError when the call itself fails (ENOSYS/EOPNOTSUPP: the
        hypervisor has no load_batch; ENODEV: no paging ring); then frames of this call may or may not be loaded.

        One buffer per page, copied straight into the hypercall buffer (locked dom0 memory, allocated per call:
        measured in the nested rig, allocating it costs no more than keeping one). A caller joining the pages
        into one buffer first paid a whole extra copy: under nested TCG about 0.05 ms per page, a quarter of a
        prefetch's time."""
        cdef list gfn_list = [int(g) for g in gfns]
        cdef list page_list = list(pages)
        cdef size_t n = len(gfn_list)
        cdef size_t start, i, npages
        cdef size_t page_bytes = PAGE_SIZE
        cdef uint32_t count
        cdef int rc
        cdef void *buffer
        cdef unsigned char *target
        cdef const unsigned char[::1] page
        cdef uint64_t *gfn_array
        cdef int32_t *status
        cdef xencall_handle *xcall
        if len(page_list) != n:
            raise ValueError(f"{n} gfns need {n} pages, got {len(page_list)}")
        for i in range(n):
            if len(page_list[i]) != PAGE_SIZE:
                raise ValueError(f"page {i} (gfn {gfn_list[i]:#x}) is {len(page_list[i])} bytes, not {PAGE_SIZE}")
        statuses = []
        if n == 0:
            return statuses
        xcall = self._xencall()
        for start in range(0, n, XS_LOAD_BATCH_MAX):
            count = <uint32_t>min(<size_t>XS_LOAD_BATCH_MAX, n - start)
            npages = xs_load_batch_pages(count)
            buffer = xencall_alloc_buffer_pages(xcall, npages)
            if buffer == NULL:
                raise_errno("xencall_alloc_buffer_pages")
            try:
                target = <unsigned char *>buffer
                gfn_array = xs_load_batch_gfns(buffer, count)
                status = xs_load_batch_status(buffer, count)
                for i in range(count):
                    page = page_list[start + i]
                    memcpy(target + i * page_bytes, &page[0], page_bytes)
                    gfn_array[i] = gfn_list[start + i]
                    status[i] = -5  # EIO unless Xen says otherwise
                with nogil:
                    rc = xs_load_batch(xcall, domid, count, buffer)
                if rc < 0:
                    raise_errno("XEN_DOMCTL_xenswap_op(load_batch)")
                statuses.extend([-status[i] for i in range(count)])
            finally:
                xencall_free_buffer_pages(xcall, buffer, npages)
        return statuses

    def vm_event_enable(self, uint32_t domid, int param=HVM_PARAM_PAGING_RING_PFN):
        """Map (populating it if needed) and enable a vm_event ring: PAGING_RING or SHARING_RING.

        Returns a VmEventRing; bind its ``port`` with EventChannel.bind_interdomain(domid, port).

        The domain stays paused from before the enable until the shared ring is initialised (xs_ring_init): a
        request Xen put in between would be lost when the indices are reset."""
        cdef uint32_t port = 0
        cdef void *page = NULL
        cdef int saved_errno = 0
        cdef xc_interface *xch = self._handle()
        if xc_domain_pause(xch, domid) < 0:
            raise_errno("xc_domain_pause")
        try:
            page = xc_vm_event_enable(xch, domid, param, &port)
            saved_errno = errno  # before the unpause can change it
            if page == NULL:
                raise_errno("xc_vm_event_enable", saved_errno)
            ring = VmEventRing.__new__(VmEventRing)
            (<VmEventRing>ring)._attach(page, domid, port)
        finally:
            xc_domain_unpause(xch, domid)
        return ring

    # ------------------------------------------------------------------ mem_sharing

    def memshr_control(self, uint32_t domid, bint enable):
        if xc_memshr_control(self._handle(), domid, enable) < 0:
            raise_errno("xc_memshr_control")

    def memshr_nominate_gfn(self, uint32_t domid, unsigned long gfn):
        """Nominate a page for sharing; returns its handle (valid until the page is written)."""
        cdef uint64_t handle = 0
        if xc_memshr_nominate_gfn(self._handle(), domid, gfn, &handle) < 0:
            raise_errno("xc_memshr_nominate_gfn")
        return handle

    def memshr_share_gfns(self, uint32_t source_domid, unsigned long source_gfn, uint64_t source_handle,
                          uint32_t client_domid, unsigned long client_gfn, uint64_t client_handle):
        if xc_memshr_share_gfns(self._handle(), source_domid, source_gfn, source_handle,
                                client_domid, client_gfn, client_handle) < 0:
            raise_errno("xc_memshr_share_gfns")

    def memshr_range_share(self, uint32_t source_domid, uint32_t client_domid, uint64_t first_gfn,
                           uint64_t last_gfn):
        if xc_memshr_range_share(self._handle(), source_domid, client_domid, first_gfn, last_gfn) < 0:
            raise_errno("xc_memshr_range_share")

    def memshr_audit(self):
        """Xen's consistency audit of the sharing state; returns the number of errors it found (0 = consistent)."""
        cdef int rc = xc_memshr_audit(self._handle())
        if rc < 0:
            raise_errno("xc_memshr_audit")
        return rc

    def sharing_freed_pages(self):
        cdef long n = xc_sharing_freed_pages(self._handle())
        if n < 0:
            raise_errno("xc_sharing_freed_pages")
        return n

    def sharing_used_frames(self):
        cdef long n = xc_sharing_used_frames(self._handle())
        if n < 0:
            raise_errno("xc_sharing_used_frames")
        return n

    # ------------------------------------------------------------------ domains

    def domain_maximum_gpfn(self, uint32_t domid):
        cdef xen_pfn_t gpfns = 0
        if xc_domain_maximum_gpfn(self._handle(), domid, &gpfns) < 0:
            raise_errno("xc_domain_maximum_gpfn")
        return gpfns

    def hvm_param_get(self, uint32_t domid, uint32_t param):
        cdef uint64_t value = 0
        if xc_hvm_param_get(self._handle(), domid, param, &value) < 0:
            raise_errno("xc_hvm_param_get")
        return value

    # ------------------------------------------------------------------ xenswap hypervisor patches

    def harvest_accessed(self, uint32_t domid, uint64_t first_gfn, uint64_t nr_gfns, bint clear=True):
        """Accessed bits of the guest's NPT leaf entries over [first_gfn, first_gfn + nr_gfns) (patch 0001).

        Returns (bitmap, nr_accessed): bit i of the bytes (LSB first) is gfn first_gfn + i. With clear, the next
        call reports only what the guest touched in between."""
        cdef uint64_t nbytes = (nr_gfns + 7) // 8
        cdef uint64_t accessed = 0
        cdef int rc
        cdef xencall_handle *xcall = self._xencall()
        cdef bytearray out = bytearray(nbytes)
        cdef uint8_t *buffer = <uint8_t *>(<char *>out) if nbytes else NULL
        cdef uint8_t dummy = 0
        if buffer == NULL:
            buffer = &dummy
        with nogil:
            rc = xs_harvest_accessed(xcall, domid, first_gfn, nr_gfns, clear, buffer, &accessed)
        if rc < 0:
            raise_errno("XEN_DOMCTL_xenswap_op(harvest_accessed)")
        return bytes(out), accessed

    def evtchn_prefetch(self, uint32_t domid, bint enable):
        """Hold (enable) or stop holding event delivery for a paged guest until the pager answers (patch 0002).

        Returns how many ports were held when called (disabling delivers them)."""
        cdef uint32_t held = 0
        cdef int rc
        cdef xencall_handle *xcall = self._xencall()
        with nogil:
            rc = xs_evtchn_prefetch(xcall, domid, enable, &held)
        if rc < 0:
            raise_errno("XEN_DOMCTL_xenswap_op(evtchn_prefetch)")
        return held


cdef class VmEvent:
    """One request taken off a vm_event ring (a copy: the ring slot is already free), or a response to put."""

    cdef public uint32_t version, flags, reason, vcpu_id
    cdef public uint64_t gfn
    cdef public uint32_t p2mt, u_flags, port, state, virq, remote_domid

    def __init__(self, uint32_t reason=0, uint32_t vcpu_id=0, uint32_t flags=0, uint64_t gfn=0, uint32_t p2mt=0,
                 uint32_t u_flags=0, uint32_t port=0):
        self.version = XS_VM_EVENT_INTERFACE_VERSION
        self.reason, self.vcpu_id, self.flags = reason, vcpu_id, flags
        self.gfn, self.p2mt, self.u_flags, self.port = gfn, p2mt, u_flags, port

    def response(self):
        """The response Xen expects for this request: same reason, vCPU, gfn/port and pause flag."""
        return VmEvent(self.reason, self.vcpu_id, self.flags & VM_EVENT_FLAG_VCPU_PAUSED, self.gfn, self.p2mt,
                       self.u_flags, self.port)

    def __repr__(self):
        if self.reason == XS_VM_EVENT_REASON_XENSWAP_EVTCHN:
            what = (f"port={self.port} {EVTCHN_STATE_NAMES.get(self.state, self.state)} virq={self.virq} "
                    f"remote={self.remote_domid}")
        else:
            what = f"gfn={self.gfn:#x} p2mt={self.p2mt} u_flags={self.u_flags:#x}"
        return f"VmEvent(reason={self.reason} vcpu={self.vcpu_id} flags={self.flags:#x} {what})"


cdef class VmEventRing:
    """The dom0 (back) end of a vm_event ring page returned by XenCtrl.vm_event_enable."""

    cdef void *page
    cdef vm_event_back_ring_t back
    cdef readonly uint32_t domid
    cdef readonly uint32_t port

    cdef _attach(self, void *page, uint32_t domid, uint32_t port):
        self.page = page
        self.domid = domid
        self.port = port
        xs_ring_init(&self.back, page)

    cdef _check(self):
        if self.page == NULL:
            raise ValueError("vm_event ring is unmapped")

    def get_requests(self):
        """Take every pending request off the ring."""
        cdef xs_vm_event raw
        self._check()
        requests = []
        while xs_ring_get_request(&self.back, &raw):
            event = VmEvent.__new__(VmEvent)
            (<VmEvent>event).version = raw.version
            (<VmEvent>event).flags = raw.flags
            (<VmEvent>event).reason = raw.reason
            (<VmEvent>event).vcpu_id = raw.vcpu_id
            (<VmEvent>event).gfn = raw.gfn
            (<VmEvent>event).p2mt = raw.p2mt
            (<VmEvent>event).u_flags = raw.u_flags
            (<VmEvent>event).port = raw.port
            (<VmEvent>event).state = raw.state
            (<VmEvent>event).virq = raw.virq
            (<VmEvent>event).remote_domid = raw.remote_domid
            requests.append(event)
        return requests

    def put_response(self, VmEvent response):
        """Put a response on the ring (then notify the ring's event channel, or call mem_paging_resume)."""
        cdef xs_vm_event raw
        self._check()
        memset(&raw, 0, sizeof(raw))
        raw.flags, raw.reason, raw.vcpu_id = response.flags, response.reason, response.vcpu_id
        raw.gfn, raw.p2mt, raw.u_flags, raw.port = response.gfn, response.p2mt, response.u_flags, response.port
        xs_ring_put_response(&self.back, &raw)

    def pending(self):
        self._check()
        return xs_ring_unconsumed(&self.back)

    def close(self):
        """Unmap the ring page (disable the ring itself with XenCtrl.mem_paging_disable first)."""
        if self.page != NULL:
            munmap(self.page, XC_PAGE_SIZE)
            self.page = NULL

    def __dealloc__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


cdef class EventChannel:
    """A libxenevtchn handle: bind to a ring's port, wait (poll fd()), read pending ports, unmask, notify."""

    cdef xenevtchn_handle *xce

    def __cinit__(self):
        self.xce = xenevtchn_open(NULL, 0)
        if self.xce == NULL:
            raise_errno("xenevtchn_open")

    cdef xenevtchn_handle *_handle(self) except NULL:
        if self.xce == NULL:
            raise ValueError("EventChannel handle is closed")
        return self.xce

    def fd(self):
        cdef int fd = xenevtchn_fd(self._handle())
        if fd < 0:
            raise_errno("xenevtchn_fd")
        return fd

    def bind_interdomain(self, uint32_t domid, uint32_t remote_port):
        """Returns the local port."""
        cdef int port = xenevtchn_bind_interdomain(self._handle(), domid, remote_port)
        if port < 0:
            raise_errno("xenevtchn_bind_interdomain")
        return port

    def unbind(self, uint32_t port):
        if xenevtchn_unbind(self._handle(), port) < 0:
            raise_errno("xenevtchn_unbind")

    def notify(self, uint32_t port):
        if xenevtchn_notify(self._handle(), port) < 0:
            raise_errno("xenevtchn_notify")

    def pending(self):
        """The next port that fired (blocks unless fd() is readable: poll first); unmask it when done."""
        cdef int port
        with nogil:
            port = xenevtchn_pending(self.xce)
        if port < 0:
            raise_errno("xenevtchn_pending")
        return port

    def unmask(self, uint32_t port):
        if xenevtchn_unmask(self._handle(), port) < 0:
            raise_errno("xenevtchn_unmask")

    def close(self):
        if self.xce != NULL:
            xenevtchn_close(self.xce)
            self.xce = NULL

    def __dealloc__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@cython.no_gc_clear
cdef class ForeignMapping:
    """Guest frames mapped into this process; a read-only (or writable) buffer of len(gfns) * 4096 bytes.

    ``errors[i]`` is 0 for a mapped frame, else the errno Xen gave for gfns[i] (e.g. ENOENT: paged out);
    such pages read as unmapped memory, so check before hashing them."""

    cdef ForeignMemory owner
    cdef void *addr
    cdef size_t pages
    cdef bint writable
    cdef readonly list errors
    cdef readonly list gfns

    def __getbuffer__(self, Py_buffer *view, int flags):
        if self.addr == NULL:
            raise ValueError("foreign mapping is unmapped")
        if (flags & PyBUF_WRITABLE) and not self.writable:
            raise BufferError("foreign mapping is read-only")
        PyBuffer_FillInfo(view, self, self.addr, self.pages * PAGE_SIZE, not self.writable, flags)

    def __len__(self):
        return self.pages * PAGE_SIZE

    def page(self, Py_ssize_t index):
        """A memoryview of the index-th mapped page."""
        if not 0 <= index < <Py_ssize_t>self.pages:
            raise IndexError(index)
        return memoryview(self)[index * PAGE_SIZE:(index + 1) * PAGE_SIZE]

    def unmap(self):
        if self.addr != NULL and self.owner is not None and self.owner.fmem != NULL:
            if xenforeignmemory_unmap(self.owner.fmem, self.addr, self.pages) < 0:
                raise_errno("xenforeignmemory_unmap")
        self.addr = NULL

    def __dealloc__(self):
        if self.addr != NULL and self.owner is not None and self.owner.fmem != NULL:
            xenforeignmemory_unmap(self.owner.fmem, self.addr, self.pages)
            self.addr = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unmap()


cdef class ForeignMemory:
    """A libxenforeignmemory handle: map a guest's frames (dom0 only), e.g. to hash them for sharing."""

    cdef xenforeignmemory_handle *fmem

    def __cinit__(self):
        self.fmem = xenforeignmemory_open(NULL, 0)
        if self.fmem == NULL:
            raise_errno("xenforeignmemory_open")

    def map(self, uint32_t domid, gfns, bint writable=False):
        """Map the given gfns (any iterable of ints) contiguously; returns a ForeignMapping."""
        cdef list gfn_list = [int(g) for g in gfns]
        cdef size_t n = len(gfn_list)
        cdef size_t i
        cdef xen_pfn_t *arr
        cdef int *err
        cdef void *addr
        if self.fmem == NULL:
            raise ValueError("ForeignMemory handle is closed")
        if n == 0:
            raise ValueError("no gfns to map")
        arr = <xen_pfn_t *>malloc(n * sizeof(xen_pfn_t))
        err = <int *>malloc(n * sizeof(int))
        if arr == NULL or err == NULL:
            free(arr)
            free(err)
            raise MemoryError()
        try:
            for i in range(n):
                arr[i] = gfn_list[i]
                err[i] = 0
            addr = xenforeignmemory_map(self.fmem, domid, PROT_READ | (PROT_WRITE if writable else 0), n, arr, err)
            if addr == NULL:
                raise_errno("xenforeignmemory_map")
            mapping = ForeignMapping.__new__(ForeignMapping)
            (<ForeignMapping>mapping).owner = self
            (<ForeignMapping>mapping).addr = addr
            (<ForeignMapping>mapping).pages = n
            (<ForeignMapping>mapping).writable = writable
            (<ForeignMapping>mapping).gfns = gfn_list
            (<ForeignMapping>mapping).errors = [-err[i] if err[i] < 0 else err[i] for i in range(n)]
            return mapping
        finally:
            free(arr)
            free(err)

    def close(self):
        if self.fmem != NULL:
            xenforeignmemory_close(self.fmem)
            self.fmem = NULL

    def __dealloc__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
