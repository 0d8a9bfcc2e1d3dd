"""Fixtures for the tests that run inside the nested Xen rig's dom0 (``@pytest.mark.dom0``).

The host-side rig test (tests/rig/test_nested_xen.py) exports where dom0 sees the tiny guest image:
XENSWAP_GUEST_KERNEL and XENSWAP_GUEST_INITRD (paths on the rig's read-only cache share).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xenswap.core.page_store import PageStore
from xenswap.errors import XenswapError
from xenswap.hv.xen import xl
from xenswap.hv.xen.xenstore import XenStore


def guest_files() -> tuple[Path, Path]:
    kernel, initrd = os.environ.get("XENSWAP_GUEST_KERNEL"), os.environ.get("XENSWAP_GUEST_INITRD")
    if not kernel or not initrd:
        pytest.fail("XENSWAP_GUEST_KERNEL/XENSWAP_GUEST_INITRD not set: run these tests through the rig "
                    "(tests/rig/test_nested_xen.py or 'xenswap rig boot --guest-image')")
    paths = Path(kernel), Path(initrd)
    for path in paths:
        if not path.is_file():
            pytest.fail(f"guest image file {path} not visible in dom0")
    return paths


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and "dom0" in item.keywords and Path("/proc/xen/capabilities").exists():
        report.sections.append(("xen state after the failure", xl.state_report()))


@pytest.fixture(scope="module")
def patched_xen() -> None:
    """Fails the test unless dom0 runs our patched hypervisor (paging, sharing, the xenswap domctl)."""
    info = subprocess.run(["xl", "info"], capture_output=True, text=True).stdout
    if "xenswap" not in info:
        pytest.fail("these tests need the patched hypervisor (xenswap rig boot --xen patched); "
                    "xl info does not say -xenswap")


@pytest.fixture(scope="session")
def guest_image() -> tuple[Path, Path]:
    """The tiny guest's kernel and initrd as dom0 sees them, for tests that create their own guests."""
    return guest_files()


@pytest.fixture
def hv():
    from xenswap.hv.xen import open_hypervisor

    port = open_hypervisor()
    yield port
    port.close()


def _guest(kind: str, memory_mib: int = 128, cmdline: str = "",
           extra: dict[str, str] | None = None) -> Iterator[xl.GuestSpec]:
    kernel, initrd = guest_files()
    # on_reboot preserve: a guest that crashes (a triple fault is a "reboot" to Xen) stays for inspection (xenctx)
    # instead of coming back as a fresh guest under the same name that the test would take for the old one
    spec = xl.GuestSpec(name=f"t{kind}-{secrets.token_hex(3)}", kernel=kernel, initrd=initrd, kind=kind,
                        memory_mib=memory_mib, cmdline=cmdline, extra={"on_reboot": '"preserve"', **(extra or {})})
    try:
        _create_and_wait_up(spec)
        yield spec
    finally:
        xl.destroy(spec.name)


def _create_and_wait_up(spec: xl.GuestSpec) -> None:
    """Create the guest and wait for its boot marker; a guest that triple-faults while booting is created once more.

    Why: in the nested rig (QEMU's TCG emulating SVM and NPT) the stock guest kernel now and then triple-faults
    during boot, before any xenswap part has touched the domain (seen in a dom0 suite: "d3v0 Triple fault" 7 s
    into boot, no pager ever opened for it). That is the rig failing, not the test; a triple fault after boot
    still fails the test that caused it."""
    for attempt in (1, 2):
        xl.create(spec)
        try:
            xl.wait_for_console(spec.name, xl.GUEST_UP_MARKER, timeout=180)
            return
        except XenswapError:
            if attempt == 2 or not _triple_faulted(spec.name):
                raise
            print(f"\n{spec.name} triple-faulted while booting (nested TCG): creating it again", file=sys.stderr)
            xl.destroy(spec.name)


def _triple_faulted(name: str) -> bool:
    try:
        domid = xl.domid(name)
    except XenswapError:
        return False
    dmesg = subprocess.run(["xl", "dmesg"], capture_output=True, text=True, timeout=60).stdout
    return f"d{domid}v0 Triple fault" in dmesg


@pytest.fixture(scope="module")
def pv_guest() -> Iterator[xl.GuestSpec]:
    """A 128 MiB PV guest from the tiny image, booted (its boot marker seen) once per module, destroyed at its end."""
    yield from _guest("pv")


@pytest.fixture(scope="module")
def pvh_guest() -> Iterator[xl.GuestSpec]:
    """The same as a PVH guest."""
    yield from _guest("pvh")


@pytest.fixture(scope="module")
def pvh_twin() -> Iterator[xl.GuestSpec]:
    """A second PVH guest of the same image as ``pvh_guest``, for tests of two guests."""
    yield from _guest("pvh")


# The network of the guest with a vif: a bridge of its own in dom0 (dom0's address on it), the guest's eth0 on it.
GUEST_NET_DOM0_IP = "10.231.0.1"
GUEST_NET_GUEST_IP = "10.231.0.2"
GUEST_NET_PREFIX = 24


@dataclass(frozen=True)
class NetGuest:
    spec: xl.GuestSpec
    bridge: str  # dom0's bridge the guest's vif (vif<domid>.0) is a port of
    ip: str  # the guest's address (dom0 reaches it over the bridge)


@pytest.fixture(scope="module")
def guest_bridge() -> Iterator[str]:
    """A Linux bridge in dom0 with GUEST_NET_DOM0_IP on it, for the vif of a guest (``vif = ['bridge=NAME']``: libxl's
    vif-bridge hotplug script makes the vif a port of it); removed at the module's end."""
    name = f"xsbr{secrets.token_hex(3)}"  # interface names are at most 15 characters

    def ip(*args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            pytest.fail(f"ip {' '.join(args)}: {done.stderr.strip()}")

    ip("link", "add", "name", name, "type", "bridge")
    try:
        ip("addr", "add", f"{GUEST_NET_DOM0_IP}/{GUEST_NET_PREFIX}", "dev", name)
        ip("link", "set", name, "up")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pvh_guest_with_vif(guest_bridge: str) -> Iterator[NetGuest]:
    """A 128 MiB PVH guest like ``pvh_guest`` with one vif (netback in dom0, netfront in the guest) on
    ``guest_bridge``; its eth0 has GUEST_NET_GUEST_IP (the image's init configures it before the boot marker)."""
    cmdline = f"xenswap.ip={GUEST_NET_GUEST_IP}/{GUEST_NET_PREFIX} xenswap.ssh=0"
    for spec in _guest("pvh", cmdline=cmdline, extra={"vif": f'["bridge={guest_bridge}"]'}):
        yield NetGuest(spec, guest_bridge, GUEST_NET_GUEST_IP)


@pytest.fixture
def store(tmp_path) -> Iterator[PageStore]:
    """A page store on dom0's /tmp (tmpfs: RAM), deleted after the test (a 128 MiB guest's pages each)."""
    with PageStore(tmp_path / "pages.db") as page_store:
        yield page_store
    for path in tmp_path.glob("pages.db*"):
        path.unlink()


@pytest.fixture
def scratch() -> Iterator[str]:
    """A fresh xenstore subtree for one test, removed afterwards (with everything a test wrote under it)."""
    path = f"/xenswap-test/{secrets.token_hex(4)}"
    yield path
    with XenStore() as store:
        store.remove(path)
