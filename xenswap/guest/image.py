"""The tiny guest image: Debian's 6.1 kernel plus a busybox-static initramfs, built from Debian packages.

The initramfs holds busybox (with its applet links), ``/init`` (init.sh next to this file), the kernel
modules the guest needs under QEMU (virtio) and under Xen (netfront/blkfront) with their dependencies,
and optionally dropbear. Images are cached in ``cache_dir()/images/<recipe_hash>/``; the hash covers
everything that decides the bytes of the image (package versions, init script, module list, this
builder's source), so a changed recipe builds a new image and an unchanged one is reused. The build is
reproducible: the same recipe gives a byte-identical initramfs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from xenswap import debs
from xenswap.config import cache_dir
from xenswap.errors import XenswapError
from xenswap.guest.cpio import Archive
from xenswap.guest.kmod import ModuleTree

INIT_SCRIPT = Path(__file__).with_name("init.sh")

# Modules loaded at boot, in this order of intent (dependencies are added by ModuleTree.load_order).
GUEST_MODULES = [
    "virtio_pci",  # modular in Debian's kernel; brings virtio and virtio_ring
    "virtio_net",
    "virtio_blk",
    "crc32c_generic",  # ext4 asks the crypto API for crc32c; no modprobe/alias lookups in the guest
    "ext4",
    "xen-netfront",
    "xen-blkfront",
    "sch_netem",  # for network emulation inside guests (later net work)
    "8021q",
    "xen-privcmd",  # /dev/xen/privcmd: xenswap-hcall-probe issues its hypercall through it (tests of patch 0005)
]

# insmod parameters by module name. privcmd in a domU blocks every hypercall unless xenstore names a target
# domain (a guard for device-model stub domains); the probe needs its hypercalls (Xen still checks each one).
GUEST_MODULE_PARAMS = {"xen_privcmd": "unrestricted=1"}

# A static helper compiled into the image (the image has no libc): see hcall_probe.c.
HCALL_PROBE_SOURCE = Path(__file__).with_name("hcall_probe.c")

BUSYBOX_PACKAGE = "busybox-static"
# dropbear-bin is dynamically linked: its libraries come from their own Debian packages, not the host.
DROPBEAR_PACKAGES = ["dropbear-bin", "libc6", "libtomcrypt1", "libtommath1", "zlib1g", "libcrypt1", "libgmp10"]
DROPBEAR_LIBS = [
    "libtomcrypt.so.1", "libtommath.so.1", "libz.so.1", "libcrypt.so.1", "libc.so.6", "libgmp.so.10",
]
LIBDIR = "lib/x86_64-linux-gnu"
LOADER = "lib64/ld-linux-x86-64.so.2"


@dataclass(frozen=True)
class GuestImage:
    kernel: Path  # the Debian bzImage (vmlinuz): what Xen's PV/PVH loaders and a classic boot take
    initrd: Path
    recipe_hash: str
    kernel_version: str
    # The same kernel uncompressed (ELF with a PVH entry note): QEMU boots it directly, skipping the
    # decompressor, which is ~2x faster to the UP marker under TCG and leaves less guest RAM touched.
    vmlinux: Path | None = None

    def to_json(self) -> dict:
        return {k: None if v is None else str(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the image's bytes."""

    packages: dict[str, str]  # name -> exact version
    modules: tuple[str, ...]
    init_script: str
    builder_source: str
    with_dropbear: bool

    def hash(self) -> str:
        blob = json.dumps(
            {
                "packages": sorted(self.packages.items()),
                "modules": list(self.modules),
                "init": self.init_script,
                "builder": self.builder_source,
                "dropbear": self.with_dropbear,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def builder_source() -> str:
    """The code that builds images: a change to it must rebuild them."""
    here = Path(__file__).parent
    return "".join((here / name).read_text() for name in ("image.py", "cpio.py", "kmod.py", HCALL_PROBE_SOURCE.name))


def make_recipe(packages: dict[str, str], with_dropbear: bool = True, modules: list[str] | None = None) -> Recipe:
    return Recipe(
        packages=dict(packages),
        modules=tuple(GUEST_MODULES if modules is None else modules),
        init_script=INIT_SCRIPT.read_text(),
        builder_source=builder_source(),
        with_dropbear=with_dropbear,
    )


def images_dir() -> Path:
    return cache_dir() / "images"


def build_guest_image(with_dropbear: bool = True, force: bool = False) -> GuestImage:
    """The guest image for the current Debian package versions: from the cache, or built now (a few seconds)."""
    # Asking apt for versions costs ~1 s per package; while apt's package lists are unchanged the versions
    # resolved last time still hold, so a cached image is found without running apt at all.
    remembered = _remembered_versions(with_dropbear)
    if remembered is not None and not force:
        target = images_dir() / make_recipe(remembered, with_dropbear).hash()
        if (target / "manifest.json").exists():
            return load_image(target)
    kernel_pkg = debs.kernel_package()
    names = [kernel_pkg, BUSYBOX_PACKAGE] + (DROPBEAR_PACKAGES if with_dropbear else [])
    downloaded = debs.download(names)
    recipe = make_recipe({d.name: d.version for d in downloaded}, with_dropbear)
    _remember_versions(with_dropbear, recipe.packages)
    target = images_dir() / recipe.hash()
    manifest = target / "manifest.json"
    if manifest.exists() and not force:
        return load_image(target)
    trees = {d.name: debs.extract(d) for d in downloaded}
    target.parent.mkdir(parents=True, exist_ok=True)
    # One builder per recipe at a time: a second process waits and then finds the finished image. A finished
    # image is never replaced (force only rebuilds after removing it), since a running QEMU may be using it.
    with open(target.parent / f".{recipe.hash()}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if manifest.exists() and not force:
            return load_image(target)
        _build_cached(target, recipe, trees, kernel_pkg, with_dropbear)
    return load_image(target)


def _build_cached(target: Path, recipe: Recipe, trees: dict[str, Path], kernel_pkg: str, with_dropbear: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix=f".{recipe.hash()}.", dir=target.parent))
    try:
        kernel_version = _build_into(work, recipe, trees, kernel_pkg)
        (work / "manifest.json").write_text(
            json.dumps(
                {
                    "recipe_hash": recipe.hash(),
                    "kernel_version": kernel_version,
                    "packages": recipe.packages,
                    "modules": list(recipe.modules),
                    "dropbear": with_dropbear,
                },
                indent=2,
                sort_keys=True,
            )
        )
        work.chmod(0o755)  # mkdtemp makes it private; images are read by other users (e.g. tests)
        if target.exists():
            # an unfinished leftover, or a forced rebuild: move it aside rather than delete files in use
            target.rename(target.with_name(f".{target.name}.old.{os.getpid()}.{time.monotonic_ns()}"))
        os.rename(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


APT_STATE_PATHS = ("/var/lib/apt/lists", "/etc/apt")


def apt_state_stamp() -> str:
    """Changes whenever apt's answer about candidate versions could change (apt-get update, sources, pins)."""
    digest = hashlib.sha256()
    for root in APT_STATE_PATHS:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "partial")  # apt's downloads in progress
            for name in sorted(f for f in filenames if f != "lock"):  # touched by any apt run
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except OSError:
                    continue
                digest.update(f"{dirpath}/{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _versions_file() -> Path:
    return images_dir() / "resolved-versions.json"


def _remembered_versions(with_dropbear: bool) -> dict[str, str] | None:
    try:
        data = json.loads(_versions_file().read_text())
    except (OSError, ValueError):
        return None
    entry = data.get(f"dropbear={with_dropbear}")
    if not entry or entry.get("apt_state") != apt_state_stamp():
        return None
    return entry["packages"]


def _remember_versions(with_dropbear: bool, packages: dict[str, str]) -> None:
    path = _versions_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[f"dropbear={with_dropbear}"] = {"apt_state": apt_state_stamp(), "packages": packages}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def images_in_use() -> set[str]:
    """Recipe hashes of images some running process (a QEMU, the nested rig) was started with, host-wide."""
    marker = str(images_dir()) + "/"
    used = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        for part in cmdline.split(marker)[1:]:
            used.add(part.split("/", 1)[0])
    return used


def prune_images(keep: set[str]) -> list[str]:
    """Delete cached images except the recipe hashes in ``keep`` and those in use; returns the removed hashes."""
    root = images_dir()
    if not root.is_dir():
        return []
    keep = keep | images_in_use()
    removed = []
    for directory in sorted(root.iterdir()):
        if not directory.is_dir():
            continue
        if directory.name.startswith("."):
            # moved aside by a rebuild (unlinked files stay valid for a QEMU that has them open), or the work
            # folder of a build that died an hour ago or more
            moved_aside = ".old." in directory.name
            if not moved_aside and time.time() - directory.stat().st_mtime < 3600:
                continue
        elif directory.name in keep:
            continue
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory.name)
    return removed


def load_image(directory: Path) -> GuestImage:
    """A built image from its cache folder; a clear error if any part is missing."""
    try:
        meta = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise XenswapError(f"no guest image in {directory}: run 'xenswap guest build'") from exc
    vmlinux = directory / "vmlinux"
    image = GuestImage(directory / "vmlinuz", directory / "initrd.gz", meta["recipe_hash"], meta["kernel_version"],
                       vmlinux if vmlinux.is_file() else None)
    check_image(image)
    return image


def check_image(image: GuestImage) -> None:
    for part, path in (("kernel", image.kernel), ("initramfs", image.initrd)):
        if not Path(path).is_file():
            raise XenswapError(f"guest {part} image {path} is missing: run 'xenswap guest build'")


def _build_into(work: Path, recipe: Recipe, trees: dict[str, Path], kernel_pkg: str) -> str:
    """Kernel (vmlinuz and vmlinux) and initramfs into ``work``; returns the kernel version."""
    modules = ModuleTree(trees[kernel_pkg])
    vmlinuz = trees[kernel_pkg] / "boot" / f"vmlinuz-{modules.version}"
    if not vmlinuz.is_file():
        raise XenswapError(f"{kernel_pkg} has no boot/vmlinuz-{modules.version}")
    shutil.copyfile(vmlinuz, work / "vmlinuz")
    (work / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
    build_initramfs(work / "initrd.gz", recipe, trees, kernel_pkg)
    return modules.version


def build_initramfs(target: Path, recipe: Recipe, trees: dict[str, Path], kernel_pkg: str) -> None:
    """The guest's initramfs (gzip'd newc cpio) from the unpacked packages."""
    modules = ModuleTree(trees[kernel_pkg])
    archive = Archive()
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "root", "etc", "var"):
        archive.directory(directory)
    archive.directory("tmp", 0o1777)
    archive.directory("root", 0o700)
    # The kernel opens /dev/console for init before anything is mounted.
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3, 0o666)
    archive.file("init", recipe.init_script.encode(), 0o755)
    archive.file("etc/passwd", b"root::0:0:root:/root:/bin/sh\n")
    archive.file("etc/group", b"root:x:0:\n")
    archive.file("etc/shells", b"/bin/sh\n")

    busybox = trees[BUSYBOX_PACKAGE] / "bin" / "busybox"
    archive.copy("bin/busybox", busybox, 0o755)
    for applet in _busybox_applets(busybox):
        if applet != "bin/busybox" and applet not in archive:
            archive.symlink(applet, "/bin/busybox")

    with tempfile.TemporaryDirectory(prefix="xenswap-probe-") as work:
        archive.copy("bin/xenswap-hcall-probe", compile_hcall_probe(Path(work)), 0o755)

    load = modules.load_order(list(recipe.modules))
    kmod_dir = f"lib/modules/{modules.version}"
    for module in load:
        archive.copy(f"{kmod_dir}/{module.relpath}", modules.path(module), 0o644)
    archive.file(f"{kmod_dir}/xenswap.load",
                 "".join(f"{m.relpath} {GUEST_MODULE_PARAMS.get(m.name, '')}".rstrip() + "\n" for m in load).encode())
    archive.file(f"{kmod_dir}/modules.dep", modules.modules_dep(load).encode())
    archive.copy(f"{kmod_dir}/modules.builtin", modules.base / "modules.builtin")

    if recipe.with_dropbear:
        archive.copy("usr/sbin/dropbear", trees["dropbear-bin"] / "usr" / "sbin" / "dropbear", 0o755)
        for lib in DROPBEAR_LIBS:
            archive.copy(f"{LIBDIR}/{lib}", _find_lib(trees, lib), 0o644)
        archive.copy(f"{LIBDIR}/ld-linux-x86-64.so.2", _find_lib(trees, "ld-linux-x86-64.so.2"), 0o755)
        archive.symlink(LOADER, f"/{LIBDIR}/ld-linux-x86-64.so.2")

    archive.write_gzip(target)


def compile_hcall_probe(work: Path) -> Path:
    """xenswap-hcall-probe, linked statically (the image has busybox and no libc)."""
    binary = work / "xenswap-hcall-probe"
    proc = subprocess.run(["cc", "-static", "-O2", "-Wall", "-o", str(binary), str(HCALL_PROBE_SOURCE)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise XenswapError(f"compiling {HCALL_PROBE_SOURCE.name} for the guest image failed (gcc and libc6-dev come "
                           f"from setup/apt-xenbuild.txt): {proc.stderr.strip()[-800:]}")
    return binary


# Compressed payloads a bzImage may carry, by magic; Debian's amd64 kernels use XZ.
_PAYLOADS = {b"\xfd7zXZ\x00": "xz", b"\x1f\x8b\x08": "gzip"}


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (what the kernel's scripts/extract-vmlinux does)."""
    for magic, kind in _PAYLOADS.items():
        at = bzimage.find(magic)
        while at >= 0:
            try:
                if kind == "xz":
                    payload = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[at:])
                else:
                    payload = zlib.decompressobj(wbits=31).decompress(bzimage[at:])
            except (lzma.LZMAError, zlib.error):
                payload = b""
            if payload[:4] == b"\x7fELF":
                return payload
            at = bzimage.find(magic, at + 1)
    raise XenswapError("no ELF kernel found inside the bzImage (unsupported compression?)")


def _find_lib(trees: dict[str, Path], soname: str) -> Path:
    """A shared library by soname from the unpacked packages (following the package's own symlinks)."""
    for tree in trees.values():
        for candidate in (tree / LIBDIR / soname, tree / "usr" / LIBDIR / soname):
            # Follow symlinks by hand: an absolute link inside a package points into the package, not the host.
            for _ in range(8):
                if not candidate.is_symlink():
                    break
                link = os.readlink(candidate)
                candidate = tree / link.lstrip("/") if link.startswith("/") else candidate.parent / link
            if candidate.is_file() and not candidate.is_symlink():
                return candidate
    raise XenswapError(f"no {soname} in the unpacked packages {sorted(trees)}")


def _busybox_applets(busybox: Path) -> list[str]:
    """Install paths of busybox's applets (e.g. usr/bin/wget), from the binary itself."""
    proc = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise XenswapError(f"{busybox} --list-full failed: {proc.stderr.strip()}")
    return sorted(line.strip().lstrip("/") for line in proc.stdout.splitlines() if line.strip())
