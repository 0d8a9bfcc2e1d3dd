"""A tiny QEMU guest whose virtio disk is a xenswap branch served over NBD: it makes a file system, writes
a file and syncs, the guest is stopped and the server killed with SIGKILL, then a fresh boot on the same
branch (served by a restarted server) reads the file back."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenswap.storage.store import Store

from .conftest import Server

pytestmark = pytest.mark.rig


def test_guest_file_survives_reboot_on_a_branch(tmp_path: Path) -> None:
    from xenswap.hv.qemu.vm import QemuVM

    store = Store(tmp_path / "store")
    store.create_golden("empty", size=64 << 20)
    store.branch("guestdisk", "empty")
    server = Server(store.root, tmp_path / "nbd.sock").start()
    vm = None
    try:
        vm = QemuVM.create("xs-disk-guest", disk=server.uri("guestdisk"), network=False)
        vm.console.run("mke2fs -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt", timeout=120, check=True)
        vm.console.run("echo written-by-the-guest > /mnt/hello.txt && sync && umount /mnt", timeout=60, check=True)
        vm.destroy()
        vm = None
        server.kill9()  # what the guest synced (NBD flush) must survive this
        server.stop()
        server = Server(store.root, tmp_path / "nbd.sock").start()
        vm = QemuVM.create("xs-disk-guest", disk=server.uri("guestdisk"), network=False)
        out = vm.console.run("mkdir -p /mnt && mount /dev/vda /mnt && cat /mnt/hello.txt", timeout=60, check=True)
        assert "written-by-the-guest" in out
        vm.destroy()
        vm = None
    finally:
        if vm is not None:
            vm.destroy()
        server.stop()
    # The file system lives in the branch's delta; the golden image is still all zeroes.
    disk = store.open("guestdisk", writable=False)
    try:
        assert disk.active.cluster_count() > 0
    finally:
        disk.close()
    golden = store.open("empty")
    try:
        assert golden.read(0, 1 << 20) == bytes(1 << 20)
    finally:
        golden.close()
    store.close()
