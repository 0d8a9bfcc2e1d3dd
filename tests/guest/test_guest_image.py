"""Fast tier: the guest image recipe, its initramfs, modules and init script (no VM is booted here)."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xenswap import debs
from xenswap.config import cache_dir
from xenswap.errors import XenswapError
from xenswap.guest import image as guest_image
from xenswap.guest.cpio import Archive
from xenswap.guest.image import GuestImage, build_guest_image, check_image, make_recipe
from xenswap.guest.kmod import ModuleTree, module_name, read_modinfo


@pytest.fixture(scope="module")
def built() -> GuestImage:
    """The real image (downloaded and built once per machine into the shared cache)."""
    return build_guest_image()


@pytest.fixture(scope="module")
def kernel_tree() -> ModuleTree:
    pkg = debs.kernel_package()
    return ModuleTree(debs.fetch_tree([pkg])[pkg])


def _cpio_list(initrd: Path) -> list[str]:
    raw = gzip.decompress(initrd.read_bytes())
    proc = subprocess.run(["cpio", "-t", "--quiet"], input=raw, capture_output=True, check=True)
    return proc.stdout.decode().split()


def _cpio_read(initrd: Path, member: str) -> bytes:
    raw = gzip.decompress(initrd.read_bytes())
    proc = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", member], input=raw, capture_output=True, check=True)
    return proc.stdout


def test_recipe_hash_is_stable_and_covers_every_input() -> None:
    packages = {"linux-image-6.1.0-1-amd64": "6.1.1-1", "busybox-static": "1:1.35.0-4"}
    base = make_recipe(packages)
    assert base.hash() == make_recipe(dict(packages)).hash()
    assert len(base.hash()) == 16
    changed = [
        make_recipe({**packages, "busybox-static": "1:1.35.0-5"}),
        make_recipe(packages, with_dropbear=False),
        make_recipe(packages, modules=["virtio_net"]),
    ]
    hashes = {base.hash()} | {r.hash() for r in changed}
    assert len(hashes) == 1 + len(changed)


def test_recipe_hash_follows_init_script_and_builder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    packages = {"busybox-static": "1"}
    before = make_recipe(packages).hash()
    edited = tmp_path / "init.sh"
    edited.write_text(guest_image.INIT_SCRIPT.read_text() + "\n# edited\n")
    monkeypatch.setattr(guest_image, "INIT_SCRIPT", edited)
    assert make_recipe(packages).hash() != before
    monkeypatch.undo()
    monkeypatch.setattr(guest_image, "builder_source", lambda: "another builder")
    assert make_recipe(packages).hash() != before


def test_init_script_parses_with_busybox_sh() -> None:
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is a set-up dependency"
    proc = subprocess.run([busybox, "sh", "-n", str(guest_image.INIT_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cpio_archive_is_reproducible_and_readable_by_cpio(tmp_path: Path) -> None:
    def make() -> Archive:
        archive = Archive()
        archive.file("etc/motd", b"hello\n")
        archive.file("init", b"#!/bin/sh\n", 0o755)
        archive.symlink("bin/sh", "/bin/busybox")
        archive.char_device("dev/console", 5, 1)
        return archive

    first, second = tmp_path / "a.cpio.gz", tmp_path / "b.cpio.gz"
    make().write_gzip(first)
    make().write_gzip(second)
    assert first.read_bytes() == second.read_bytes()
    raw = gzip.decompress(first.read_bytes())
    proc = subprocess.run(["cpio", "-tv", "--quiet"], input=raw, capture_output=True, check=True)
    listing = proc.stdout.decode()
    assert "dev/console" in listing and listing.count("\n") == 7  # 4 entries + 3 parent dirs
    console_line = next(line for line in listing.splitlines() if line.endswith("dev/console"))
    assert console_line.startswith("c") and "5," in console_line


def test_module_dependencies_come_first(kernel_tree: ModuleTree) -> None:
    order = [m.name for m in kernel_tree.load_order(["ext4", "virtio_net", "xen-netfront", "8021q"])]
    for module, needs in (("ext4", "jbd2"), ("ext4", "mbcache"), ("virtio_net", "virtio_ring"), ("8021q", "garp")):
        assert order.index(needs) < order.index(module)
    assert "xen_netfront" in order
    assert len(order) == len(set(order))


def test_modinfo_reads_depends_from_the_elf(kernel_tree: ModuleTree) -> None:
    info = read_modinfo(kernel_tree.path(kernel_tree.module("ext4")).read_bytes())
    assert set(info["depends"][0].split(",")) >= {"jbd2", "mbcache"}
    with pytest.raises(XenswapError):
        read_modinfo(b"not an elf file at all")
    with pytest.raises(XenswapError, match="no module"):
        kernel_tree.module("no_such_module_xyz")
    assert module_name("kernel/drivers/net/xen-netfront.ko") == "xen_netfront"


def test_built_image_holds_init_busybox_modules(built: GuestImage) -> None:
    assert built.kernel.stat().st_size > 4 << 20
    names = set(_cpio_list(built.initrd))
    kmods = f"lib/modules/{built.kernel_version}"
    for expected in ("init", "bin/busybox", "bin/sh", "sbin/insmod", "dev/console", f"{kmods}/xenswap.load",
                     f"{kmods}/modules.dep", "usr/sbin/dropbear", "lib64/ld-linux-x86-64.so.2"):
        assert expected in names, expected
    for ko in ("virtio_net.ko", "virtio_blk.ko", "virtio_pci.ko", "ext4.ko", "xen-netfront.ko", "xen-blkfront.ko",
               "xen-privcmd.ko"):
        assert any(n.endswith("/" + ko) for n in names), ko
    # the hypercall probe of the patch-0005 test, and privcmd loaded so that a domU may use it
    assert "bin/xenswap-hcall-probe" in names
    load = _cpio_read(built.initrd, f"{kmods}/xenswap.load").decode().splitlines()
    assert any(line.endswith("xen-privcmd.ko unrestricted=1") for line in load), load


def test_vmlinux_is_the_uncompressed_kernel_with_a_pvh_entry(built: GuestImage) -> None:
    assert built.vmlinux is not None
    elf = built.vmlinux.read_bytes()
    assert elf[:4] == b"\x7fELF" and len(elf) > built.kernel.stat().st_size
    # XEN_ELFNOTE_PHYS32_ENTRY (18) in a "Xen" note: what QEMU's -kernel needs to boot it the PVH way
    proc = subprocess.run(["readelf", "-n", str(built.vmlinux)], capture_output=True, text=True)
    if proc.returncode == 0:
        assert "0x00000012" in proc.stdout
    assert elf.find(b"Linux version " + built.kernel_version.encode()) > 0
    with pytest.raises(XenswapError, match="no ELF kernel"):
        guest_image.extract_vmlinux(b"MZ" + b"\0" * 4096)


def test_build_is_cached_by_recipe(built: GuestImage) -> None:
    again = build_guest_image()
    assert again == built
    assert built.initrd.parent.name == built.recipe_hash


def test_initramfs_is_reproducible(built: GuestImage, tmp_path: Path) -> None:
    """Rebuilding the same recipe from the same packages gives a byte-identical initramfs."""
    import json

    # the exact package versions of the built image (from its manifest: no apt queries needed)
    packages = json.loads((built.initrd.parent / "manifest.json").read_text())["packages"]
    debs_dir = cache_dir() / "debs"
    trees = {}
    for name, version in packages.items():
        (deb_file,) = debs_dir.glob(f"{name}_{version.replace(':', '%3a')}_*.deb")
        trees[name] = debs.extract(debs.Deb(name, version, deb_file))
    recipe = make_recipe(packages)
    assert recipe.hash() == built.recipe_hash
    kernel_pkg = next(name for name in packages if name.startswith("linux-image-"))
    guest_image.build_initramfs(tmp_path / "initrd.gz", recipe, trees, kernel_pkg)
    assert (tmp_path / "initrd.gz").read_bytes() == built.initrd.read_bytes()


def test_prune_keeps_current_and_in_use_images(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XENSWAP_CACHE", str(tmp_path))
    images = tmp_path / "images"
    for name in ("aaaa", "bbbb", "cccc", ".partial", ".dddd.old.1.2"):
        (images / name).mkdir(parents=True)
    (images / ".aaaa.lock").touch()
    # a real process whose command line names image cccc (as a QEMU's -kernel would)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(images / "cccc" / "vmlinux")])
    try:
        for _ in range(100):  # until the child has exec'd (its command line names the image)
            if b"cccc" in Path(f"/proc/{holder.pid}/cmdline").read_bytes():
                break
            time.sleep(0.01)
        assert guest_image.images_in_use() >= {"cccc"}
        assert guest_image.prune_images({"aaaa"}) == [".dddd.old.1.2", "bbbb"]
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in images.iterdir()) == [".aaaa.lock", ".partial", "aaaa", "cccc"]


def test_missing_kernel_image_is_a_clear_error(tmp_path: Path) -> None:
    image = GuestImage(tmp_path / "vmlinuz", tmp_path / "initrd.gz", "0" * 16, "6.1.0-0-amd64")
    with pytest.raises(XenswapError, match=r"guest kernel image .*vmlinuz is missing"):
        check_image(image)
    with pytest.raises(XenswapError, match="no guest image"):
        guest_image.load_image(tmp_path)


def test_cli_guest_build_json(built: GuestImage, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from xenswap.cli import main

    assert main(["guest", "build", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == built.to_json()
