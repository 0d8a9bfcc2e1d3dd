"""The page hasher: kernel module built against Debian's headers here, loaded and compared with the user-space
path inside the nested Xen dom0 (our Debian kernel; modules cannot be loaded on this host)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from xenswap.hv.pagehash import ABSENT, HASHED, PAGE, ZERO, PageHasher

KMOD = Path(__file__).resolve().parents[2] / "kmod"


@pytest.fixture
def child() -> Iterator[tuple[int, int]]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("memchild.py"))], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    address = int(proc.stdout.readline())
    yield proc.pid, address
    proc.communicate(b"")


def pagemap_present(pid: int, address: int, npages: int) -> list[bool]:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(address // PAGE * 8)
        data = f.read(8 * npages)
    return [bool(int.from_bytes(data[i * 8 : i * 8 + 8], "little") >> 63) for i in range(npages)]


def check_layout(pid: int, address: int, hasher: PageHasher) -> None:
    result = hasher.hash_range(pid, address, 64)
    for i in range(0, 32, 2):
        assert result.status[i] == HASHED, i
        assert result.hashes[i] == xxhash.xxh64_intdigest(bytes([i + 1]) * PAGE)
    assert result.status[1] == ZERO
    assert result.hashes[1] == xxhash.xxh64_intdigest(bytes(PAGE))
    assert all(s == ABSENT for s in result.status[32:])
    # hashing must not have faulted the untouched pages in
    assert not any(pagemap_present(pid, address, 64)[32:])


def test_user_space_hasher_matches_content_and_leaves_absent_pages_alone(child: tuple[int, int]) -> None:
    check_layout(*child, PageHasher(use_kmod=False))


def test_bad_range_is_one_clear_error() -> None:
    from xenswap.errors import XenswapError

    with pytest.raises(XenswapError, match="page-aligned"):
        PageHasher(use_kmod=False).hash_range(os.getpid(), 123, 1)


def _kernel_version_of_guests() -> str:
    from xenswap.debs import kernel_package

    return kernel_package().removeprefix("linux-image-")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_module_builds_cleanly_against_the_guest_kernel_headers() -> None:
    """Compile with W=1 -Werror and sparse; the module's vermagic must match the dom0/guest kernel."""
    subprocess.run(["make", "-C", str(KMOD), "clean"], check=True, capture_output=True)
    build = subprocess.run(["make", "-C", str(KMOD), "check"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "warning" not in (build.stdout + build.stderr).lower()
    info = subprocess.run(["modinfo", "-F", "vermagic", str(KMOD / "xenswap_pagehash.ko")], capture_output=True,
                          text=True, check=True).stdout
    assert info.split()[0] == _kernel_version_of_guests()


@pytest.mark.dom0
def test_module_loads_hashes_like_user_space_and_unloads(child: tuple[int, int]) -> None:
    ko = KMOD / "xenswap_pagehash.ko"
    assert ko.exists(), "the host-side rig test builds kmod/ before running dom0 tests"
    subprocess.run(["insmod", str(ko)], check=True)
    try:
        assert Path("/dev/xenswap-pagehash").exists()
        pid, address = child
        check_layout(pid, address, PageHasher(use_kmod=True))
        kernel = PageHasher(use_kmod=True).hash_range(pid, address, 64)
        user = PageHasher(use_kmod=False).hash_range(pid, address, 64)
        assert kernel.status == user.status
        assert list(kernel.hashes) == list(user.hashes)
    finally:
        subprocess.run(["rmmod", "xenswap_pagehash"], check=True)
    assert not Path("/dev/xenswap-pagehash").exists()
