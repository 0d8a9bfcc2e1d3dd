# C declarations for _xenctrl.pyx: libxenctrl (mem_paging, mem_sharing, vm_event), libxenevtchn,
# libxenforeignmemory, libxencall (for the xenswap domctl, which libxenctrl does not know), and the vm_event ring
# helpers, which are C macros (xen/io/ring.h) and so are wrapped by small static C functions below.

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<xenctrl.h>" nogil:
    ctypedef struct xc_interface:
        pass
    ctypedef unsigned long xen_pfn_t
    ctypedef uint32_t evtchn_port_t

    xc_interface *xc_interface_open(void *logger, void *dombuild_logger, unsigned open_flags)
    int xc_interface_close(xc_interface *xch)

    int xc_mem_paging_enable(xc_interface *xch, uint32_t domain_id, uint32_t *port)
    int xc_mem_paging_disable(xc_interface *xch, uint32_t domain_id)
    int xc_mem_paging_resume(xc_interface *xch, uint32_t domain_id)
    int xc_mem_paging_nominate(xc_interface *xch, uint32_t domain_id, uint64_t gfn)
    int xc_mem_paging_evict(xc_interface *xch, uint32_t domain_id, uint64_t gfn)
    int xc_mem_paging_prep(xc_interface *xch, uint32_t domain_id, uint64_t gfn)
    int xc_mem_paging_load(xc_interface *xch, uint32_t domain_id, uint64_t gfn, void *buffer)

    int xc_memshr_control(xc_interface *xch, uint32_t domid, int enable)
    int xc_memshr_nominate_gfn(xc_interface *xch, uint32_t domid, unsigned long gfn, uint64_t *handle)
    int xc_memshr_share_gfns(xc_interface *xch, uint32_t source_domain, unsigned long source_gfn,
                             uint64_t source_handle, uint32_t client_domain, unsigned long client_gfn,
                             uint64_t client_handle)
    int xc_memshr_range_share(xc_interface *xch, uint32_t source_domain, uint32_t client_domain,
                              uint64_t first_gfn, uint64_t last_gfn)
    int xc_memshr_audit(xc_interface *xch)
    long xc_sharing_freed_pages(xc_interface *xch)
    long xc_sharing_used_frames(xc_interface *xch)

    int xc_domain_maximum_gpfn(xc_interface *xch, uint32_t domid, xen_pfn_t *gpfns)
    int xc_domain_pause(xc_interface *xch, uint32_t domid)
    int xc_domain_unpause(xc_interface *xch, uint32_t domid)
    int xc_hvm_param_get(xc_interface *xch, uint32_t domid, uint32_t param, uint64_t *value)

    int HVM_PARAM_PAGING_RING_PFN
    int HVM_PARAM_SHARING_RING_PFN
    int XC_PAGE_SIZE


cdef extern from "<xenevtchn.h>" nogil:
    ctypedef struct xenevtchn_handle:
        pass
    xenevtchn_handle *xenevtchn_open(void *logger, unsigned open_flags)
    int xenevtchn_close(xenevtchn_handle *xce)
    int xenevtchn_fd(xenevtchn_handle *xce)
    int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port)
    int xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid, evtchn_port_t remote_port)
    int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port)
    int xenevtchn_pending(xenevtchn_handle *xce)
    int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port)


cdef extern from "<xenforeignmemory.h>" nogil:
    ctypedef struct xenforeignmemory_handle:
        pass
    xenforeignmemory_handle *xenforeignmemory_open(void *logger, unsigned open_flags)
    int xenforeignmemory_close(xenforeignmemory_handle *fmem)
    void *xenforeignmemory_map(xenforeignmemory_handle *fmem, uint32_t dom, int prot, size_t pages,
                               const xen_pfn_t *arr, int *err)
    int xenforeignmemory_unmap(xenforeignmemory_handle *fmem, void *addr, size_t pages)


cdef extern from "<xencall.h>" nogil:
    ctypedef struct xencall_handle:
        pass
    xencall_handle *xencall_open(void *logger, unsigned open_flags)
    int xencall_close(xencall_handle *xcall)
    void *xencall_alloc_buffer_pages(xencall_handle *xcall, size_t nr_pages)
    void xencall_free_buffer_pages(xencall_handle *xcall, void *p, size_t nr_pages)


cdef extern from "<sys/mman.h>" nogil:
    int munmap(void *addr, size_t length)
    int PROT_READ
    int PROT_WRITE


# The vm_event ring (a back ring: Xen produces requests, we consume them and produce responses) and the xenswap
# domctl (patches 0001/0002/0004 in hypervisor-patches/), written in C because the ring is all macros and barriers.
cdef extern from *:
    """
    #include <string.h>
    #include <errno.h>
    #include <xenctrl.h>
    #include <xencall.h>
    #include <xen/domctl.h>
    #include <xen/vm_event.h>

    /* Exported by libxenctrl 4.17 (VERS_4.17.0) but declared only in its private header: maps (populating it if
     * needed) the ring page named by the HVM param, enables the ring, returns the page and the event port. */
    void *xc_vm_event_enable(xc_interface *xch, uint32_t domain_id, int param, uint32_t *port);

    /* hypervisor-patches/0001: XEN_DOMCTL_xenswap_op, mirrored here (the host's headers are stock). */
    #define XS_DOMCTL_xenswap_op 2000
    #define XS_OP_harvest_accessed 0
    #define XS_OP_evtchn_prefetch 1
    #define XS_OP_load_batch 2
    #define XS_LOAD_BATCH_MAX 1024
    #define XS_HARVEST_CLEAR 1u
    /* hypervisor-patches/0002: the new vm_event reason. */
    #define XS_VM_EVENT_REASON_XENSWAP_EVTCHN 0x7800

    struct xs_domctl_xenswap_op {
        uint32_t op;
        uint32_t flags;
        union {
            struct {
                uint64_t first_gfn;
                uint64_t nr_gfns;
                uint64_t nr_accessed;
                uint64_t bitmap;     /* XEN_GUEST_HANDLE_64(uint8) */
            } harvest;
            struct {
                uint32_t enable;
                uint32_t nr_held;
            } prefetch;
            struct {
                uint64_t gfns;       /* XEN_GUEST_HANDLE_64(const_uint64) */
                uint64_t data;       /* XEN_GUEST_HANDLE_64(const_uint8): nr * 4096 bytes */
                uint64_t status;     /* XEN_GUEST_HANDLE_64(int) */
                uint32_t nr;
                uint32_t done;
            } load_batch;
            uint8_t pad[64];
        } u;
    };

    static int xs_domctl_xenswap(xencall_handle *xcall, uint32_t domid, struct xs_domctl_xenswap_op *op)
    {
        struct xen_domctl *domctl = xencall_alloc_buffer(xcall, sizeof(*domctl));
        int rc, saved;

        if ( !domctl )
            return -1;
        memset(domctl, 0, sizeof(*domctl));
        domctl->cmd = XS_DOMCTL_xenswap_op;
        domctl->interface_version = XEN_DOMCTL_INTERFACE_VERSION;
        domctl->domain = domid;
        memcpy(&domctl->u, op, sizeof(*op));
        rc = xencall1(xcall, __HYPERVISOR_domctl, (uint64_t)(uintptr_t)domctl);
        saved = errno;
        memcpy(op, &domctl->u, sizeof(*op));
        xencall_free_buffer(xcall, domctl);
        errno = saved;
        return rc;
    }

    /* Harvest [first, first + nr) into out ((nr + 7) / 8 bytes); loops while Xen stops early to stay preemptible. */
    static int xs_harvest_accessed(xencall_handle *xcall, uint32_t domid, uint64_t first, uint64_t nr, int clear,
                                   uint8_t *out, uint64_t *nr_accessed)
    {
        size_t bytes = (nr + 7) / 8;
        uint8_t *bitmap = xencall_alloc_buffer(xcall, bytes ? bytes : 1);
        uint64_t done = 0;
        int rc = 0, saved;

        *nr_accessed = 0;
        if ( !bitmap )
            return -1;
        memset(bitmap, 0, bytes ? bytes : 1);
        while ( done < nr )
        {
            struct xs_domctl_xenswap_op op;

            memset(&op, 0, sizeof(op));
            op.op = XS_OP_harvest_accessed;
            op.flags = clear ? XS_HARVEST_CLEAR : 0;
            op.u.harvest.first_gfn = first + done;
            op.u.harvest.nr_gfns = nr - done;
            /* done is a multiple of 8 until the last, ragged, batch */
            op.u.harvest.bitmap = (uint64_t)(uintptr_t)(bitmap + done / 8);
            rc = xs_domctl_xenswap(xcall, domid, &op);
            if ( rc < 0 )
                break;
            *nr_accessed += op.u.harvest.nr_accessed;
            if ( op.u.harvest.nr_gfns == 0 )
            {
                errno = EIO;     /* no progress: never loop forever */
                rc = -1;
                break;
            }
            done += op.u.harvest.nr_gfns;
        }
        saved = errno;
        memcpy(out, bitmap, bytes);
        xencall_free_buffer(xcall, bitmap);
        errno = saved;
        return rc < 0 ? -1 : 0;
    }

    static int xs_evtchn_prefetch(xencall_handle *xcall, uint32_t domid, int enable, uint32_t *nr_held)
    {
        struct xs_domctl_xenswap_op op;
        int rc;

        memset(&op, 0, sizeof(op));
        op.op = XS_OP_evtchn_prefetch;
        op.u.prefetch.enable = enable ? 1 : 0;
        rc = xs_domctl_xenswap(xcall, domid, &op);
        *nr_held = op.u.prefetch.nr_held;
        return rc < 0 ? -1 : 0;
    }

    /* hypervisor-patches/0004: page nr (<= XS_LOAD_BATCH_MAX) frames back in with one domctl (again while Xen
     * stops early to stay preemptible). buffer is a hypercall buffer laid out as xs_load_batch_layout says: the
     * data (nr * 4096 bytes), then the gfns (uint64), then the per-gfn results (0 or -errno, int32). */
    static size_t xs_load_batch_pages(uint32_t nr)
    {
        return nr + (nr * (sizeof(uint64_t) + sizeof(int32_t)) + XC_PAGE_SIZE - 1) / XC_PAGE_SIZE;
    }

    static uint64_t *xs_load_batch_gfns(void *buffer, uint32_t nr)
    {
        return (uint64_t *)((uint8_t *)buffer + (size_t)nr * XC_PAGE_SIZE);
    }

    static int32_t *xs_load_batch_status(void *buffer, uint32_t nr)
    {
        return (int32_t *)(xs_load_batch_gfns(buffer, nr) + nr);
    }

    static int xs_load_batch(xencall_handle *xcall, uint32_t domid, uint32_t nr, void *buffer)
    {
        uint32_t done = 0;

        while ( done < nr )
        {
            struct xs_domctl_xenswap_op op;

            memset(&op, 0, sizeof(op));
            op.op = XS_OP_load_batch;
            op.u.load_batch.gfns = (uint64_t)(uintptr_t)xs_load_batch_gfns(buffer, nr);
            op.u.load_batch.data = (uint64_t)(uintptr_t)buffer;
            op.u.load_batch.status = (uint64_t)(uintptr_t)xs_load_batch_status(buffer, nr);
            op.u.load_batch.nr = nr;
            op.u.load_batch.done = done;
            if ( xs_domctl_xenswap(xcall, domid, &op) < 0 )
                return -1;
            if ( op.u.load_batch.done <= done )
            {
                errno = EIO;     /* no progress: never loop forever */
                return -1;
            }
            done = op.u.load_batch.done;
        }
        return 0;
    }

    /* A flat copy of one ring slot, so Python never holds a pointer into the shared page. */
    typedef struct {
        uint32_t version, flags, reason, vcpu_id;
        uint64_t gfn;            /* mem_paging / mem_sharing */
        uint32_t p2mt, u_flags;  /* mem_paging.p2mt, mem_paging.flags */
        uint32_t port, state, virq, remote_domid;  /* xenswap_evtchn */
    } xs_vm_event;

    static void xs_ring_init(vm_event_back_ring_t *back, void *page)
    {
        /*
         * The helper initialises the shared ring, not Xen: vm_event_enable()
         * only sets up its private front end (req_prod_pvt = rsp_cons = 0),
         * exactly as xenpaging and xen-access do SHARED_RING_INIT themselves.
         * A ring enabled for the second time in a domain is a recycled page
         * whose req_prod/rsp_prod still hold the last ring's indices (or any
         * old data): without this the pager read stale slots as requests and
         * Xen read stale slots as responses (seen in the rig: 70,000 to
         * 1.5 million "faults" on frames that were resident, a guest that
         * stopped answering).  The caller keeps the domain paused from the
         * enable until here, so no request is put before the indices are 0.
         */
        SHARED_RING_INIT((vm_event_sring_t *)page);
        BACK_RING_INIT(back, (vm_event_sring_t *)page, XC_PAGE_SIZE);
    }

    static int xs_ring_get_request(vm_event_back_ring_t *back, xs_vm_event *out)
    {
        vm_event_request_t req;
        RING_IDX cons = back->req_cons;

        if ( !RING_HAS_UNCONSUMED_REQUESTS(back) )
            return 0;
        memcpy(&req, RING_GET_REQUEST(back, cons), sizeof(req));
        back->req_cons = cons + 1;
        back->sring->req_event = cons + 2;   /* ask to be notified of the next request */
        memset(out, 0, sizeof(*out));
        out->version = req.version;
        out->flags = req.flags;
        out->reason = req.reason;
        out->vcpu_id = req.vcpu_id;
        switch ( req.reason )
        {
        case VM_EVENT_REASON_MEM_PAGING:
            out->gfn = req.u.mem_paging.gfn;
            out->p2mt = req.u.mem_paging.p2mt;
            out->u_flags = req.u.mem_paging.flags;
            break;
        case VM_EVENT_REASON_MEM_SHARING:
            out->gfn = req.u.mem_sharing.gfn;
            out->p2mt = req.u.mem_sharing.p2mt;
            break;
        case XS_VM_EVENT_REASON_XENSWAP_EVTCHN:
        {
            const uint32_t *words = (const uint32_t *)&req.u;
            out->port = words[0];
            out->state = words[1];
            out->virq = words[2];
            out->remote_domid = words[3];
            break;
        }
        }
        return 1;
    }

    static void xs_ring_put_response(vm_event_back_ring_t *back, const xs_vm_event *in)
    {
        vm_event_response_t rsp;
        RING_IDX prod = back->rsp_prod_pvt;

        memset(&rsp, 0, sizeof(rsp));
        rsp.version = VM_EVENT_INTERFACE_VERSION;
        rsp.flags = in->flags;
        rsp.reason = in->reason;
        rsp.vcpu_id = in->vcpu_id;
        if ( in->reason == XS_VM_EVENT_REASON_XENSWAP_EVTCHN )
            ((uint32_t *)&rsp.u)[0] = in->port;
        else
        {
            rsp.u.mem_paging.gfn = in->gfn;
            rsp.u.mem_paging.p2mt = in->p2mt;
            rsp.u.mem_paging.flags = in->u_flags;
        }
        memcpy(RING_GET_RESPONSE(back, prod), &rsp, sizeof(rsp));
        back->rsp_prod_pvt = prod + 1;
        RING_PUSH_RESPONSES(back);
    }

    static unsigned int xs_ring_unconsumed(vm_event_back_ring_t *back)
    {
        return RING_HAS_UNCONSUMED_REQUESTS(back);
    }

    #define XS_VM_EVENT_INTERFACE_VERSION VM_EVENT_INTERFACE_VERSION
    """
    ctypedef struct vm_event_back_ring_t:
        pass
    ctypedef struct xs_vm_event:
        uint32_t version, flags, reason, vcpu_id
        uint64_t gfn
        uint32_t p2mt, u_flags
        uint32_t port, state, virq, remote_domid

    void *xc_vm_event_enable(xc_interface *xch, uint32_t domain_id, int param, uint32_t *port)
    int xs_harvest_accessed(xencall_handle *xcall, uint32_t domid, uint64_t first, uint64_t nr, int clear,
                            uint8_t *out, uint64_t *nr_accessed) nogil
    int xs_evtchn_prefetch(xencall_handle *xcall, uint32_t domid, int enable, uint32_t *nr_held) nogil
    size_t xs_load_batch_pages(uint32_t nr)
    uint64_t *xs_load_batch_gfns(void *buffer, uint32_t nr)
    int32_t *xs_load_batch_status(void *buffer, uint32_t nr)
    int xs_load_batch(xencall_handle *xcall, uint32_t domid, uint32_t nr, void *buffer) nogil
    int XS_LOAD_BATCH_MAX
    void xs_ring_init(vm_event_back_ring_t *back, void *page)
    int xs_ring_get_request(vm_event_back_ring_t *back, xs_vm_event *out)
    void xs_ring_put_response(vm_event_back_ring_t *back, const xs_vm_event *rsp)
    unsigned int xs_ring_unconsumed(vm_event_back_ring_t *back)

    int XS_VM_EVENT_REASON_XENSWAP_EVTCHN
    int XS_VM_EVENT_INTERFACE_VERSION
    int VM_EVENT_REASON_MEM_PAGING
    int VM_EVENT_REASON_MEM_SHARING
    int VM_EVENT_FLAG_VCPU_PAUSED
    int MEM_PAGING_DROP_PAGE
    int MEM_PAGING_EVICT_FAIL
