"""A thin Python layer over the Cython bindings in ``_xenctrl`` (libxenctrl, libxenevtchn, libxenforeignmemory and the
xenswap hypervisor patches' domctl).

The C-level calls raise ``OSError(errno, strerror, "<function>")``. This layer adds what every caller would otherwise
repeat: a clear XenswapError when the extension was not built or there is no Xen here, the working set as a list of
gfns, and the dom0 end of a vm_event ring (map, bind its event channel, wait, take requests, answer, notify).
"""

from __future__ import annotations

import errno
import select
from collections.abc import Iterable
from types import ModuleType

from xenswap.hv.xen import XenUnavailable

PAGE_SIZE = 4096


def load() -> ModuleType:
    """The compiled extension, or XenUnavailable saying why it is missing."""
    try:
        from xenswap.hv.xen import _xenctrl
    except ImportError as error:
        raise XenUnavailable(
            f"the Xen bindings (xenswap.hv.xen._xenctrl) are not built: {error}; install libxen-dev and re-run "
            "'pip install -e .' (make setup)"
        ) from error
    return _xenctrl


def _no_xen(error: OSError) -> XenUnavailable:
    return XenUnavailable(
        f"no Xen control interface here ({error.filename}: {error.strerror}): run this in dom0 of a Xen host"
    )


def open_xenctrl():
    """A _xenctrl.XenCtrl handle; XenUnavailable when this is not a Xen dom0."""
    xc = load()
    try:
        return xc.XenCtrl()
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.EACCES, errno.ENXIO):
            raise _no_xen(error) from error
        raise


def bitmap_to_gfns(bitmap: bytes, first_gfn: int = 0) -> list[int]:
    """The gfns whose bits are set in a harvest bitmap (bit i of byte i // 8, LSB first = first_gfn + i)."""
    gfns = []
    for index, byte in enumerate(bitmap):
        while byte:
            low = byte & -byte
            gfns.append(first_gfn + index * 8 + low.bit_length() - 1)
            byte ^= low
    return gfns


def harvest_working_set(ctrl, domid: int, first_gfn: int = 0, nr_gfns: int | None = None,
                        clear: bool = True) -> list[int]:
    """The gfns the guest touched since the previous clearing harvest (the whole guest by default)."""
    if nr_gfns is None:
        nr_gfns = ctrl.domain_maximum_gpfn(domid) + 1 - first_gfn
    bitmap, _ = ctrl.harvest_accessed(domid, first_gfn, nr_gfns, clear)
    return bitmap_to_gfns(bitmap, first_gfn)


class VmEventChannel:
    """The dom0 end of a guest's vm_event ring: the mapped ring plus its bound event channel.

    ``open(ctrl, domid)`` enables the paging ring (xc_vm_event_enable maps and, if needed, populates its page;
    the binding then initialises the shared ring, which Xen leaves to the helper), binds the ring's port, and
    unmasks it. ``wait(timeout)`` returns the requests on the ring (an empty list on
    timeout); ``answer(responses)`` puts responses on the ring and notifies Xen. ``close()`` disables the ring."""

    def __init__(self, ctrl, domid: int, ring, events, local_port: int, disable) -> None:
        self.ctrl = ctrl
        self.domid = domid
        self.ring = ring
        self.events = events
        self.local_port = local_port
        self._disable = disable

    @classmethod
    def open(cls, ctrl, domid: int, param: int | None = None) -> VmEventChannel:
        xc = load()
        param = xc.PAGING_RING if param is None else param
        ring = ctrl.vm_event_enable(domid, param)
        disable = ctrl.mem_paging_disable if param == xc.PAGING_RING else None
        try:
            events = xc.EventChannel()
            local_port = events.bind_interdomain(domid, ring.port)
        except BaseException:
            if disable is not None:
                disable(domid)
            ring.close()
            raise
        return cls(ctrl, domid, ring, events, local_port, disable)

    def fileno(self) -> int:
        return self.events.fd()

    def wait(self, timeout: float | None = None) -> list:
        """Requests on the ring, waiting up to timeout seconds for the event channel if there are none yet."""
        requests = self.ring.get_requests()
        if requests:
            return requests
        readable, _, _ = select.select([self.events.fd()], [], [], timeout)
        if readable:
            port = self.events.pending()
            self.events.unmask(port)
        return self.ring.get_requests()

    def answer(self, responses: Iterable) -> int:
        count = 0
        for response in responses:
            self.ring.put_response(response)
            count += 1
        if count:
            self.events.notify(self.local_port)
        return count

    def close_keep_enabled(self) -> None:
        """Let go of the ring (unbind, unmap) but leave it enabled in Xen: requests wait on it for the next pager,
        which takes it over (a paging ring must not be disabled while frames are out: a fault would crash the
        guest)."""
        self._disable = None
        self.close()

    def close(self) -> None:
        try:
            if self._disable is not None:
                self._disable(self.domid)
        finally:
            self._disable = None
            try:
                self.events.unbind(self.local_port)
            except OSError:
                pass  # the ring's disable already closed Xen's end
            self.events.close()
            self.ring.close()

    def __enter__(self) -> VmEventChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
