"""Fast tier: the Cython bindings build and import on this host, and without Xen every entry point fails with the
errno and the name of the C function that failed (no /dev/xen here)."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenswap.hv.xen import XenUnavailable, bindings

PATCHES = Path(__file__).resolve().parents[2] / "hypervisor-patches"
NO_XEN = not Path("/dev/xen/privcmd").exists()

xc = pytest.importorskip("xenswap.hv.xen._xenctrl", reason="built only where libxen-dev is installed")


def test_module_constants_match_the_hypervisor_headers():
    # Xen's public headers: HVM_PARAM_PAGING_RING_PFN 27, VM_EVENT_REASON_MEM_PAGING 3, interface version 7
    assert (xc.PAGING_RING, xc.SHARING_RING) == (27, 29)
    assert (xc.REASON_MEM_PAGING, xc.REASON_MEM_SHARING) == (3, 2)
    assert xc.VM_EVENT_INTERFACE_VERSION == 7


def test_private_abi_matches_our_patches():
    """The binding mirrors numbers the patches define: a renumbering in one must show up in the other."""
    domctl = (PATCHES / "0001-x86-p2m-pt-xenswap-harvest-accessed-domctl.patch").read_text()
    prefetch = (PATCHES / "0002-evtchn-xenswap-event-prefetch-hook.patch").read_text()
    pxd = (Path(xc.__file__).parent / "_xenctrl.pxd").read_text()
    number = re.search(r"^\+#define XEN_DOMCTL_xenswap_op\s+(\d+)", domctl, re.M).group(1)
    assert re.search(rf"#define XS_DOMCTL_xenswap_op {number}\b", pxd)
    reason = re.search(r"^\+#define VM_EVENT_REASON_XENSWAP_EVTCHN\s+(0x[0-9a-f]+)", prefetch, re.M).group(1)
    assert xc.REASON_XENSWAP_EVTCHN == int(reason, 16)
    sub_op = re.search(r"^\+#define XEN_DOMCTL_XENSWAP_evtchn_prefetch\s+(\d+)", prefetch, re.M).group(1)
    assert re.search(rf"#define XS_OP_evtchn_prefetch {sub_op}\b", pxd)
    load_batch = next(PATCHES.glob("0004-*.patch")).read_text()
    sub_op = re.search(r"^\+#define XEN_DOMCTL_XENSWAP_load_batch\s+(\d+)", load_batch, re.M).group(1)
    assert re.search(rf"#define XS_OP_load_batch {sub_op}\b", pxd)
    most = re.search(r"^\+#define XEN_DOMCTL_XENSWAP_LOAD_BATCH_MAX\s+(\d+)", load_batch, re.M).group(1)
    assert xc.LOAD_BATCH_MAX == int(most)
    # the load_batch member's layout: three 64-bit handles, then nr and done (32 bits each)
    member = re.search(r"^\+        struct \{\n(.*?)^\+        \} load_batch;", load_batch, re.M | re.S).group(1)
    fields = re.findall(r"^\+\s+(XEN_GUEST_HANDLE_64\(\w+\)|uint32_t) (\w+);", member, re.M)
    assert [name for _, name in fields] == ["gfns", "data", "status", "nr", "done"]
    assert re.search(r"uint64_t gfns;.*uint64_t data;.*uint64_t status;.*uint32_t nr;.*uint32_t done;.*\} load_batch",
                     pxd, re.S)


@pytest.mark.skipif(not NO_XEN, reason="this host runs Xen")
@pytest.mark.parametrize(("factory", "function"), [
    (lambda: xc.XenCtrl(), "xc_interface_open"),
    (lambda: xc.EventChannel(), "xenevtchn_open"),
    (lambda: xc.ForeignMemory(), "xenforeignmemory_open"),
])
def test_open_without_xen_names_the_call_and_errno(factory, function):
    with pytest.raises(OSError) as caught:
        factory()
    assert caught.value.errno == errno.ENOENT
    assert caught.value.filename == function
    assert str(caught.value) == f"[Errno {errno.ENOENT}] {os.strerror(errno.ENOENT)}: '{function}'"


@pytest.mark.skipif(not NO_XEN, reason="this host runs Xen")
def test_bindings_layer_says_to_run_in_dom0():
    expected = r"no Xen control interface here \(xc_interface_open: .*\): run this in dom0"
    with pytest.raises(XenUnavailable, match=expected):
        bindings.open_xenctrl()


def test_response_echoes_what_xen_matches_on():
    request = xc.VmEvent(reason=xc.REASON_MEM_PAGING, vcpu_id=1, flags=xc.FLAG_VCPU_PAUSED | 2, gfn=0x1234,
                         p2mt=7, u_flags=xc.PAGING_EVICT_FAIL)
    response = request.response()
    assert (response.reason, response.vcpu_id, response.gfn, response.p2mt) == (3, 1, 0x1234, 7)
    assert response.flags == xc.FLAG_VCPU_PAUSED  # only the pause flag goes back: Xen unpauses on it
    assert response.u_flags == xc.PAGING_EVICT_FAIL
    assert "gfn=0x1234" in repr(response)
    held = xc.VmEvent(reason=xc.REASON_XENSWAP_EVTCHN, vcpu_id=0, port=5).response()
    assert (held.reason, held.port, held.flags) == (xc.REASON_XENSWAP_EVTCHN, 5, 0)


@pytest.mark.dom0
def test_paging_load_rejects_a_short_page_before_calling_xen():
    # Reaching the size check needs a handle: in the rig's dom0 (without Xen the open fails first, tested above).
    with bindings.open_xenctrl() as ctrl, pytest.raises(ValueError, match="4096"):
        ctrl.mem_paging_load(0, 0, b"x" * 10)


@pytest.mark.dom0
def test_load_batch_checks_its_arguments_before_calling_xen():
    with bindings.open_xenctrl() as ctrl:
        with pytest.raises(ValueError, match="2 gfns need 2 pages, got 1"):
            ctrl.mem_paging_load_batch(0, [1, 2], [b"x" * 4096])
        with pytest.raises(ValueError, match=r"page 1 \(gfn 0x2\) is 4095 bytes"):
            ctrl.mem_paging_load_batch(0, [1, 2], [b"x" * 4096, b"x" * 4095])
        assert ctrl.mem_paging_load_batch(0, [], []) == []  # nothing to do: no hypercall


@pytest.mark.dom0
def test_calls_on_dom0_fail_with_xens_errno_and_the_function_name():
    """dom0 itself has no paging ring and no NPT: Xen's refusals come back as OSError naming the C call."""
    with bindings.open_xenctrl() as ctrl:
        with pytest.raises(OSError) as caught:
            ctrl.mem_paging_nominate(0, 0x100)
        assert caught.value.filename == "xc_mem_paging_nominate" and caught.value.errno in (errno.EINVAL,
                                                                                            errno.EPERM,
                                                                                            errno.ENODEV,
                                                                                            errno.EOPNOTSUPP,
                                                                                            errno.ENOSYS)
        with pytest.raises(OSError) as caught:
            ctrl.harvest_accessed(0, 0, 64)
        assert caught.value.filename == "XEN_DOMCTL_xenswap_op(harvest_accessed)"
        with pytest.raises(OSError) as caught:  # load_batch refuses the caller's own domain (patch 0004)
            ctrl.mem_paging_load_batch(0, [0x100], [bytes(4096)])
        assert caught.value.filename == "XEN_DOMCTL_xenswap_op(load_batch)" and caught.value.errno == errno.EINVAL
        assert ctrl.domain_maximum_gpfn(0) > 0


@given(st.binary(max_size=64), st.integers(min_value=0, max_value=1 << 40))
def test_bitmap_to_gfns_matches_bit_by_bit(bitmap, first):
    expected = [first + i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]
    assert bindings.bitmap_to_gfns(bitmap, first) == expected
