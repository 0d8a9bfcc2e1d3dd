"""Build the nested Xen rig's boot files from Debian packages: the hypervisor as a multiboot ELF, the dom0
kernel, and a dom0 initramfs (busybox, bash for Xen's hotplug scripts, Xen's toolstack and libraries, python3.11
with the test dependencies, the dom0 kernel modules, the command agent).

Everything is cached under ``cache_dir()/rig`` keyed by a hash of the recipe (package versions, the
builder's own source, the agent, the Python packages copied in), so a rebuild happens only when one of
those changes. Measured: the build takes a few seconds once the packages are downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from xenswap import debs
from xenswap.config import cache_dir
from xenswap.errors import MissingTool, XenswapError

RECIPE_VERSION = 3  # bump when the initramfs layout changes in a way the hashed inputs would not show

XEN_PACKAGES = [
    "xen-hypervisor-4.17-amd64",
    "xen-utils-4.17",
    "xen-utils-common",
    "xenstore-utils",
    "libxenmisc4.17",
    "libxenstore4",
    "libxencall1",
    "libxenevtchn1",
    "libxenforeignmemory1",
    "libxengnttab1",
    "libxentoollog1",
    "libxendevicemodel1",
    "libxenhypfs1",
    "libxentoolcore1",
    "libyajl2",
]

# dom0 kernel modules, loaded in this order (dependencies are resolved from each module's modinfo and
# loaded first). Xen backends and devices, the virtio devices of the command channel and the 9p share, and
# the networking bits later issues test in dom0 (bridge, tun, netem, VLANs).
DOM0_MODULES = [
    "xen-evtchn", "xen-privcmd", "xenfs", "xen-gntdev", "xen-gntalloc", "xen-blkback", "xen-netback",
    "virtio_pci", "virtio_console", "9pnet_virtio", "9p",
    "bridge", "veth", "tun", "sch_netem", "sch_tbf", "8021q", "loop",
]

# Host libraries found through readelf that the dom0 binaries need, plus the ones loaded with dlopen that
# readelf cannot see: without libgcc_s.so.1, glibc's pthread_cancel aborts `xl create` once the domain is
# built ("libgcc_s.so.1 must be installed for pthread_cancel to work").
DLOPENED_LIBS = ["libgcc_s.so.1", "libnss_files.so.2"]

HOST_BASH = Path("/usr/bin/bash")  # for Xen's hotplug scripts (Dom0Root._bash)

HOST_LIB_DIRS = [Path("/usr/lib/x86_64-linux-gnu"), Path("/lib/x86_64-linux-gnu"), Path("/usr/lib64"), Path("/lib64")]

# Not needed in dom0 and large: stdlib test suites, GUI, build tooling.
PYTHON_STDLIB_SKIP = {
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "venv",
    "config-3.11-x86_64-linux-gnu", "distutils", "unittest/test", "ctypes/test", "sqlite3/test",
}
# Python distributions dom0 gets (with their dependencies, followed through the installed metadata): the
# project's own runtime dependencies (so `xenswap` runs there) and the test runner. Anything else in the venv
# (benchmark plotting, build tools) stays out of the initramfs.
DOM0_EXTRA_DISTRIBUTIONS = ["pytest", "pytest-timeout", "hypothesis"]  # hypothesis: test modules import it

XEN_BIN = "/usr/lib/xen-4.17/bin"
DOM0_LD_PATH = "/usr/lib/x86_64-linux-gnu:/usr/lib/xen-4.17/lib/x86_64-linux-gnu"
DOM0_PATH = f"{XEN_BIN}:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# dom0 mount points of the host's 9p shares (read-only): the checkout and the xenswap cache.
DOM0_CHECKOUT = "/mnt/checkout"
DOM0_CACHE = "/mnt/cache"


@dataclass(frozen=True)
class RigImage:
    xen: Path  # the hypervisor, gunzipped to the multiboot ELF QEMU's -kernel loads
    kernel: Path  # dom0 kernel (Debian's vmlinuz)
    initrd: Path  # dom0 initramfs (uncompressed newc cpio: faster to unpack under TCG than a compressed one)
    recipe_hash: str
    kernel_version: str
    xen_version: str


def _require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise MissingTool(tool, package)


def hypervisor_elf(tree: Path, version: str) -> Path:
    """Gunzip Debian's xen-4.17-amd64.gz (a 32-bit multiboot ELF inside) into the cache, once."""
    candidates = sorted((tree / "boot").glob("xen-*-amd64.gz"))
    if not candidates:
        raise XenswapError(f"no hypervisor image (boot/xen-*-amd64.gz) in {tree}: the xen-hypervisor deb changed?")
    target = cache_dir() / "rig" / f"xen-{version.replace(':', '%3a')}" / "xen.elf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with gzip.open(candidates[0], "rb") as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst)
    partial.rename(target)
    return target


def _requirement_name(spec: str) -> str | None:
    """Distribution name of a Requires-Dist line, None if its marker excludes it here (an extra, an older
    Python)."""
    from packaging.requirements import Requirement  # pytest's own dependency, so always in the venv

    requirement = Requirement(spec)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        return None
    return requirement.name


def dom0_distributions() -> list[importlib.metadata.Distribution]:
    """The installed distributions dom0 needs: xenswap's runtime requirements plus the test runner, and
    everything they require in turn (sorted by name, each once)."""
    wanted = [n for n in (_requirement_name(r) for r in (importlib.metadata.requires("xenswap") or [])) if n]
    wanted += DOM0_EXTRA_DISTRIBUTIONS
    found: dict[str, importlib.metadata.Distribution] = {}
    while wanted:
        name = wanted.pop()
        key = name.lower().replace("-", "_").replace(".", "_")
        if key in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise XenswapError(f"Python package {name} (needed in the rig's dom0) is not installed: run make setup"
                               ) from None
        found[key] = dist
        wanted += [n for n in (_requirement_name(r) for r in (dist.requires or [])) if n]
    return [found[k] for k in sorted(found)]


def site_packages() -> Path:
    """The site-packages of the interpreter running xenswap (the project venv): the Python dependencies the
    dom0 tests need are copied from there, so dom0 runs the same versions as the host."""
    return Path(sysconfig.get_paths()["purelib"])


def _source_digest(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def recipe(pkg_versions: dict[str, str]) -> dict:
    """Everything the initramfs content depends on; its hash names the cache entry."""
    here = Path(__file__).parent
    return {
        "recipe_version": RECIPE_VERSION,
        "packages": pkg_versions,
        "modules": DOM0_MODULES,
        "sources": _source_digest([here / "image.py", here / "agent.py", here / "framing.py"]),
        "python": sys.version,
        "python_stat": _stat_key(Path("/usr/bin/python3.11")),
        "busybox": _stat_key(Path("/bin/busybox")),
        "bash": _stat_key(HOST_BASH),
        "distributions": [f"{d.metadata['Name']}=={d.version}" for d in dom0_distributions()],
        "libc": os.confstr("CS_GNU_LIBC_VERSION"),
    }


def _stat_key(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}:{int(st.st_mtime)}"


def build_rig_image(force: bool = False) -> RigImage:
    """Download (once) and assemble the rig's boot files; cached by recipe hash."""
    for tool, package in [("cpio", "cpio"), ("readelf", "binutils"), ("modinfo", "kmod"), ("ldconfig", "libc-bin")]:
        _require(tool, package)
    if not Path("/bin/busybox").exists():
        raise MissingTool("/bin/busybox", "busybox-static")
    if not Path("/usr/bin/python3.11").exists():
        raise MissingTool("/usr/bin/python3.11", "python3.11")
    if not HOST_BASH.exists():
        raise MissingTool(str(HOST_BASH), "bash")
    kernel_pkg = debs.kernel_package()
    fetched = _cached_debs([*XEN_PACKAGES, kernel_pkg]) or debs.download([*XEN_PACKAGES, kernel_pkg])
    trees = {deb.name: debs.extract(deb) for deb in fetched}
    versions = {deb.name: deb.version for deb in fetched}
    xen_version = versions["xen-hypervisor-4.17-amd64"]
    xen = hypervisor_elf(trees["xen-hypervisor-4.17-amd64"], xen_version)
    kernel_tree = trees[kernel_pkg]
    kernel_version = kernel_pkg.removeprefix("linux-image-")
    kernel = kernel_tree / "boot" / f"vmlinuz-{kernel_version}"
    if not kernel.exists():
        raise XenswapError(f"kernel image {kernel} missing from {kernel_pkg}")

    rec = recipe(versions)
    recipe_hash = hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]
    out_dir = cache_dir() / "rig" / f"dom0-{recipe_hash}"
    initrd = out_dir / "dom0.cpio"
    if force or not initrd.exists():
        partial = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        root = partial / "root"
        root.mkdir(parents=True)
        Dom0Root(root, trees, kernel_tree, kernel_version).populate()
        _write_cpio(root, partial / "dom0.cpio")
        shutil.rmtree(root)
        (partial / "recipe.json").write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        partial.rename(out_dir)
        _prune_old_images(keep=3)
    return RigImage(xen, kernel, initrd, recipe_hash, kernel_version, xen_version)


def _prune_old_images(keep: int) -> None:
    """Drop all but the ``keep`` newest dom0 images (~80 MB each; a running rig has its copy in QEMU's memory
    already, so removing the file under it is harmless)."""
    images = sorted((cache_dir() / "rig").glob("dom0-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[keep:]:
        if not old.name.endswith(".partial"):
            shutil.rmtree(old, ignore_errors=True)


def candidate_versions(packages: list[str]) -> dict[str, str]:
    """Candidate versions of many packages from one ``apt-cache policy`` call (one call per package costs
    ~0.5 s each on a busy machine, which every rig boot would pay)."""
    proc = subprocess.run(["apt-cache", "policy", *packages], capture_output=True, text=True)
    versions: dict[str, str] = {}
    current = None
    for line in proc.stdout.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                versions[current] = version
    return versions


def _cached_debs(packages: list[str]) -> list[debs.Deb] | None:
    """The packages' candidate .debs if all are already in the download cache, else None (then
    debs.download fetches what is missing)."""
    versions = candidate_versions(packages)
    found = []
    for name in packages:
        if name not in versions:
            return None
        version = versions[name]
        matches = sorted((cache_dir() / "debs").glob(f"{name}_{version.replace(':', '%3a')}_*.deb"))
        if not matches:
            return None
        found.append(debs.Deb(name, version, matches[0]))
    return found


def fetch_trees(packages: list[str]) -> dict[str, Path]:
    """Like debs.fetch_tree, but one apt-cache call when everything is cached already."""
    fetched = _cached_debs(packages) or debs.download(packages)
    return {deb.name: debs.extract(deb) for deb in fetched}


def _write_cpio(root: Path, target: Path) -> None:
    # sorted names and fixed owner: the same tree gives the same archive
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    listing = "\0".join([".", *names]).encode() + b"\0"
    with open(target, "wb") as out:
        proc = subprocess.run(
            ["cpio", "--null", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
            input=listing, stdout=out, stderr=subprocess.PIPE, cwd=root,
        )
    if proc.returncode != 0:
        raise XenswapError(f"cpio failed: {proc.stderr.decode(errors='replace')[-400:]}")


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def needed_libs(path: Path) -> list[str]:
    """DT_NEEDED entries of an ELF file (readelf -d)."""
    proc = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True)
    libs = []
    for line in proc.stdout.splitlines():
        if "(NEEDED)" in line and "[" in line:
            libs.append(line.split("[", 1)[1].rstrip("]").strip())
    return libs


def module_dependencies(modules: list[str], kernel_tree: Path, kernel_version: str) -> list[Path]:
    """Module files for ``modules`` plus everything they depend on, dependencies first (from modinfo)."""
    base = kernel_tree / "lib" / "modules" / kernel_version
    by_name = {p.name.split(".ko")[0].replace("-", "_"): p for p in base.rglob("*.ko*")}
    ordered: list[Path] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if key not in by_name:
            builtin = (base / "modules.builtin").read_text() if (base / "modules.builtin").exists() else ""
            if f"/{name}.ko" in builtin or f"/{key}.ko" in builtin:
                return  # compiled into the kernel
            raise XenswapError(f"kernel module {name} not found in {base} (needed by {' <- '.join(chain) or 'rig'})")
        path = by_name[key]
        if path in ordered:
            return
        deps = subprocess.run(["modinfo", "-F", "depends", str(path)], capture_output=True, text=True).stdout
        for dep in filter(None, deps.strip().split(",")):
            visit(dep, (*chain, name))
        if path not in ordered:
            ordered.append(path)

    for module in modules:
        visit(module, ())
    return ordered


class Dom0Root:
    """Populates the dom0 root tree (merged /usr: /lib, /lib64 point into /usr)."""

    def __init__(self, root: Path, trees: dict[str, Path], kernel_tree: Path, kernel_version: str):
        self.root = root
        self.trees = trees
        self.kernel_tree = kernel_tree
        self.kernel_version = kernel_version

    def populate(self) -> None:
        self._skeleton()
        self._xen_tools()
        self._python()
        self._modules()
        self._agent()
        self._bash()
        self._libraries()
        self._busybox()
        self._config_files()
        self._init()

    # -- parts ------------------------------------------------------------------------------------------
    def _skeleton(self) -> None:
        for d in ["usr/bin", "usr/sbin", "usr/lib/x86_64-linux-gnu", "usr/lib64", "bin", "sbin", "etc", "proc",
                  "sys", "dev", "run", "tmp", "root", "var/lib/xen", "var/lib/xenstored", "var/log/xen/console",
                  "mnt/checkout", "mnt/cache"]:
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "lib").symlink_to("usr/lib")
        (self.root / "lib64").symlink_to("usr/lib64")
        (self.root / "var/run").symlink_to("../run")

    def _copy_tree(self, src: Path, skip: Iterable[str] = ()) -> None:
        skip_set = {s.rstrip("/") for s in skip}

        def ignore(directory: str, names: list[str]) -> list[str]:
            rel = Path(directory).relative_to(src)
            return [n for n in names if str(rel / n) in skip_set or n == ".complete"]

        shutil.copytree(src, self.root, symlinks=True, dirs_exist_ok=True, ignore=ignore)

    def _xen_tools(self) -> None:
        for name, tree in self.trees.items():
            if name.startswith("linux-image") or name.startswith("xen-hypervisor"):
                continue
            # docs, man pages and the HVM firmware/shim are not needed to run PV/PVH guests
            self._copy_tree(tree, skip=["usr/share", "usr/lib/xen-4.17/boot", "etc/init.d"])

    def _python(self) -> None:
        src = Path("/usr/lib/python3.11")
        dst = self.root / "usr/lib/python3.11"

        def ignore(directory: str, names: list[str]) -> list[str]:
            rel = Path(directory).relative_to(src)
            skipped = [n for n in names if str(rel / n).removeprefix("./") in PYTHON_STDLIB_SKIP]
            if rel == Path("lib-dynload"):
                skipped += [n for n in names if n.startswith(("_test", "xxlimited", "_xxtest", "_ctypes_test"))]
            return skipped

        shutil.copytree(src, dst, symlinks=False, ignore=ignore, ignore_dangling_symlinks=True)
        shutil.copy2("/usr/bin/python3.11", self.root / "usr/bin/python3.11")
        (self.root / "usr/bin/python3").symlink_to("python3.11")
        site_dst = self.root / "usr/lib/python3/dist-packages"
        site_dst.mkdir(parents=True)
        for dist in dom0_distributions():
            for rel in dist.files or []:
                if rel.parts[0] == ".." or rel.suffix == ".pth":
                    continue  # console scripts outside site-packages, editable-install hooks
                src = Path(dist.locate_file(rel))
                if src.is_file():
                    target = site_dst / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target)

    def _modules(self) -> None:
        base = self.kernel_tree / "lib" / "modules" / self.kernel_version
        order = []
        for path in module_dependencies(DOM0_MODULES, self.kernel_tree, self.kernel_version):
            rel = path.relative_to(base)
            target = self.root / "usr/lib/modules" / self.kernel_version / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            order.append(str(rel))
        conf = self.root / "etc/xenswap-rig"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "modules").write_text("\n".join(order) + "\n")
        (conf / "kernel-version").write_text(self.kernel_version + "\n")

    def _agent(self) -> None:
        here = Path(__file__).parent
        dst = self.root / "usr/lib/xenswap-rig"
        dst.mkdir(parents=True)
        for name in ["agent.py", "framing.py"]:
            shutil.copy2(here / name, dst / name)

    def _bash(self) -> None:
        """The host's bash (its libraries follow in _libraries): libxl runs the vif hotplug script
        /etc/xen/scripts/vif-bridge, a #!/bin/bash script using bash only syntax (``trap ... ERR``, ``>&/dev/null``);
        without bash every ``xl create`` of a guest with a vif failed with "cannot execute
        /etc/xen/scripts/vif-bridge: No such file or directory". The rest it runs (ip, brctl, awk, which, logger)
        is busybox's."""
        shutil.copy2(HOST_BASH, self.root / "usr/bin/bash")
        (self.root / "bin/bash").symlink_to("../usr/bin/bash")

    def _busybox(self) -> None:
        shutil.copy2("/bin/busybox", self.root / "bin/busybox")
        applets = subprocess.run(["/bin/busybox", "--list-full"], capture_output=True, text=True).stdout.split()
        for applet in applets:
            link = self.root / applet
            if link.exists() or link.is_symlink() or applet == "bin/busybox":
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(self.root / "bin/busybox", link.parent))

    def _libraries(self) -> None:
        """Copy the host libraries every ELF in the tree needs (transitively), the dynamic loader, and the
        dlopen()ed ones readelf cannot see."""
        local_dirs = [self.root / "usr/lib/x86_64-linux-gnu", self.root / "usr/lib/xen-4.17/lib/x86_64-linux-gnu"]
        present: set[str] = set()
        for d in local_dirs:
            if d.is_dir():
                present.update(p.name for p in d.iterdir())
        # libraries vendored in wheels (pkg.libs/, found through the extension's RUNPATH)
        present.update(p.name for p in (self.root / "usr/lib/python3/dist-packages").rglob("*.so*"))
        pending = [p for p in self.root.rglob("*") if p.is_file() and not p.is_symlink() and is_elf(p)]
        pending += [self._copy_host_lib(name) for name in DLOPENED_LIBS if name not in present]
        present.update(DLOPENED_LIBS)
        seen: set[Path] = set()
        while pending:
            elf = pending.pop()
            if elf in seen or elf.suffix == ".ko":
                continue
            seen.add(elf)
            for lib in needed_libs(elf):
                if lib in present:
                    continue
                present.add(lib)
                pending.append(self._copy_host_lib(lib))
        loader = Path("/lib64/ld-linux-x86-64.so.2").resolve()
        shutil.copy2(loader, self.root / "usr/lib64/ld-linux-x86-64.so.2")

    def _copy_host_lib(self, name: str) -> Path:
        for d in HOST_LIB_DIRS:
            candidate = d / name
            if candidate.exists():
                target = self.root / "usr/lib/x86_64-linux-gnu" / name
                shutil.copy2(candidate.resolve(), target)
                return target
        raise XenswapError(f"library {name} needed by the rig's dom0 not found on this host (looked in "
                           f"{', '.join(map(str, HOST_LIB_DIRS))})")

    def _config_files(self) -> None:
        etc = self.root / "etc"
        (etc / "ld.so.conf").write_text("/usr/lib/x86_64-linux-gnu\n/usr/lib/xen-4.17/lib/x86_64-linux-gnu\n")
        subprocess.run(["ldconfig", "-r", str(self.root)], check=False, capture_output=True)
        (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (etc / "group").write_text("root:x:0:\n")
        (etc / "hostname").write_text("dom0\n")
        (etc / "hosts").write_text("127.0.0.1 localhost dom0\n")
        (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files\n")
        # `xenswap` on PATH, running the checkout's package from the 9p share
        launcher = self.root / "usr/local/bin/xenswap"
        launcher.parent.mkdir(parents=True, exist_ok=True)
        launcher.write_text("#!/usr/bin/python3.11\nfrom xenswap.cli import main\nraise SystemExit(main())\n")
        launcher.chmod(0o755)

    def _init(self) -> None:
        init = self.root / "init"
        init.write_text(INIT_SCRIPT.format(
            path=DOM0_PATH, ld_path=DOM0_LD_PATH, kver=self.kernel_version,
            checkout=DOM0_CHECKOUT, cache=DOM0_CACHE,
        ))
        init.chmod(0o755)


# The dom0 init. Markers on the console (XENSWAP_RIG ...) are what the host's serial-log tail shows when the
# boot goes wrong; the command channel's first answer is what says dom0 is ready.
INIT_SCRIPT = """#!/bin/sh
export PATH={path}
export LD_LIBRARY_PATH={ld_path}
export HOME=/root PYTHONDONTWRITEBYTECODE=1 PYTHONPATH={checkout}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/xen /run/xenstored /run/lock /var/log/xen/console /var/lib/xen /var/lib/xenstored
hostname dom0
ip link set lo up
echo "XENSWAP_RIG modules"
while read m; do
  insmod /lib/modules/{kver}/$m || echo "XENSWAP_RIG insmod $m failed"
done < /etc/xenswap-rig/modules
mount -t xenfs xenfs /proc/xen || echo "XENSWAP_RIG xenfs mount failed"
echo "XENSWAP_RIG xenstored"
xenstored --pid-file /run/xenstored.pid || echo "XENSWAP_RIG xenstored failed"
xen-init-dom0 || echo "XENSWAP_RIG xen-init-dom0 failed"
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest || echo "XENSWAP_RIG xenconsoled failed"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose checkout {checkout} \\
  || echo "XENSWAP_RIG checkout share not mounted"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose cache {cache} 2>/dev/null \\
  || echo "XENSWAP_RIG cache share not mounted"
echo "XENSWAP_RIG dom0 up $(cut -d' ' -f1 /proc/uptime)"
while true; do
  python3 /usr/lib/xenswap-rig/agent.py
  echo "XENSWAP_RIG agent exited ($?), restarting"
  sleep 1
done
"""
