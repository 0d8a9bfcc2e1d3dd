"""One guest under ``qemu-system-x86_64 -accel tcg``: start, stop, pause, resume, console, facts.

Every VM has a state directory ``state_dir()/qemu/<name>/`` holding:

- ``vm.json``      its configuration and domain id (written before QEMU starts, updated with the pid)
- ``qemu.pid``     QEMU's pid file
- ``qmp.sock``     QMP monitor for short connections (CLI, listing); ``qmp-long.sock`` a second monitor
                   for one long-lived client (e.g. a paging daemon) so it never blocks the first
- ``console.sock`` the guest's serial port (ttyS0); ``serial.log`` everything the guest printed
- ``qemu.log``     QEMU's own stderr after it daemonised (``-D``)

QEMU daemonises (``-daemonize``), so a VM outlives the process that created it, and start-up errors
arrive on our stderr before ``create`` returns.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xenswap.config import state_dir
from xenswap.errors import MissingTool, UnknownDomain, XenswapError
from xenswap.guest.image import GuestImage, build_guest_image, check_image
from xenswap.hv.qemu import tap as taps
from xenswap.hv.qemu.console import SerialConsole
from xenswap.hv.qemu.qmp import QMPConnection, QMPFailure, qmp_execute

QEMU_BINARY = "qemu-system-x86_64"
UP_MARKER = "XENSWAP_GUEST_UP"
RAM_BACKEND_ID = "xenswap-ram"
MIN_MEM_MIB = 96  # measured: at 88 MiB the kernel panics unpacking this initramfs (OOM in populate_rootfs)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
UNIX_PATH_MAX = 107


class DuplicateName(XenswapError):
    def __init__(self, name: str):
        super().__init__(f"a VM named {name!r} already exists ('xenswap destroy {name}' first)")


class GuestBootTimeout(XenswapError):
    def __init__(self, name: str, timeout: float, tail: str):
        super().__init__(
            f"guest {name!r} did not print {UP_MARKER} within {timeout:.0f}s; serial log tail: "
            + " | ".join(line.strip() for line in tail.splitlines() if line.strip())[-800:]
        )


def qemu_root() -> Path:
    return state_dir() / "qemu"


def qemu_binary() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise MissingTool(QEMU_BINARY, "qemu-system-x86")
    return path


@dataclass
class VMConfig:
    """What ``vm.json`` records: enough to rebuild the command line and to clean up after a crash."""

    name: str
    domid: int
    mem_mib: int
    vcpus: int
    kernel: str
    initrd: str
    ip: str | None = None  # guest address with prefix, e.g. 10.0.0.2/24
    gateway: str | None = None
    bridge: str | None = None
    disk: str | None = None
    tap: str | None = None
    mac: str | None = None
    host_address: str | None = None  # host end of a routed tap
    mem_backend: str = "ram"
    recipe_hash: str | None = None
    created: float = field(default_factory=time.time)
    pid: int | None = None
    extra_append: str = ""
    up_s: float | None = None  # seconds from create to the guest's UP marker


def kernel_cmdline(config: VMConfig) -> str:
    """The guest kernel's command line: console on ttyS0 plus the parameters the guest's /init reads."""
    parts = ["console=ttyS0", f"xenswap.hostname={config.name}"]
    if config.ip:
        parts.append(f"xenswap.ip={config.ip}")
    gateway = config.gateway or config.host_address
    if config.ip and gateway:
        parts.append(f"xenswap.gw={gateway}")
    if config.extra_append:
        parts.append(config.extra_append)
    return " ".join(parts)


def _qemu_escape(value: str) -> str:
    """QEMU option values double commas to keep them literal."""
    return value.replace(",", ",,")


def qemu_argv(config: VMConfig, vm_dir: Path) -> list[str]:
    """The full QEMU command line of a VM (pure: no side effects, for tests and ``xenswap create --dry-run``)."""
    mem = f"{config.mem_mib}M"
    if config.mem_backend == "ram":
        backend = f"memory-backend-ram,id={RAM_BACKEND_ID},size={mem}"
    elif config.mem_backend == "memfd":
        # Shows up as /memfd:memory-backend-memfd in /proc/PID/maps; share=off keeps KSM usable.
        backend = f"memory-backend-memfd,id={RAM_BACKEND_ID},size={mem},share=off"
    else:
        raise XenswapError(f"unknown memory backend {config.mem_backend!r} (ram or memfd)")
    argv = [
        QEMU_BINARY,
        "-name", f"guest={_qemu_escape(config.name)},debug-threads=on",
        # tb-size=16: a 16 MiB translation cache instead of 1 GiB cuts ~40 MiB of RSS per guest.
        "-accel", "tcg,tb-size=16",
        "-machine", f"pc,memory-backend={RAM_BACKEND_ID}",
        "-m", mem,
        "-object", backend,
        "-smp", str(config.vcpus),
        "-nodefaults", "-no-user-config", "-vga", "none", "-display", "none",
        "-kernel", _qemu_escape(config.kernel),
        "-initrd", _qemu_escape(config.initrd),
        "-append", kernel_cmdline(config),
        "-chardev", f"socket,id=console0,path={vm_dir / 'console.sock'},server=on,wait=off,"
                    f"logfile={vm_dir / 'serial.log'},logappend=on",
        "-serial", "chardev:console0",
        "-qmp", f"unix:{vm_dir / 'qmp.sock'},server=on,wait=off",
        "-qmp", f"unix:{vm_dir / 'qmp-long.sock'},server=on,wait=off",
        "-pidfile", str(vm_dir / "qemu.pid"),
        # -D: once daemonised, QEMU's stderr (warnings, "terminating on signal") goes here, not to /dev/null
        "-D", str(vm_dir / "qemu.log"),
        "-daemonize",
    ]
    if config.tap:
        argv += [
            "-netdev", f"tap,id=net0,ifname={config.tap},script=no,downscript=no",
            # romfile=: no iPXE option ROM (direct kernel boot does not need it)
            "-device", f"virtio-net-pci,netdev=net0,mac={config.mac},romfile=",
        ]
    if config.disk:
        argv += [
            "-drive", f"file={_qemu_escape(config.disk)},if=none,id=disk0,format={disk_format(config.disk)}",
            "-device", "virtio-blk-pci,drive=disk0",
        ]
    return argv


def disk_format(spec: str) -> str:
    """qcow2 for a qcow2 file, raw for anything else (a URI such as nbd+unix:// serves raw blocks). Naming the
    format keeps QEMU from probing, which is unsafe for raw images and warns on every start."""
    if "://" in spec or spec.startswith("nbd:"):
        return "raw"
    try:
        with open(spec, "rb") as fh:
            return "qcow2" if fh.read(4) == b"QFI\xfb" else "raw"
    except OSError as exc:
        raise XenswapError(f"disk {spec!r} cannot be read: {exc.strerror}") from exc


def _boot_kernel(image: GuestImage, boot: str) -> Path:
    if boot == "pvh" and image.vmlinux is not None:
        return image.vmlinux
    return image.kernel


def _pid_is_qemu_of(pid: int, vm_dir: Path) -> bool:
    """True if ``pid`` is alive and is the QEMU of this VM (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(vm_dir / "qmp.sock").encode() in cmdline


def _proc_cpu_seconds(stat_path: Path) -> float:
    """utime + stime of a /proc stat file, in seconds."""
    text = stat_path.read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _registry_lock() -> Iterator[None]:
    """Serialises id allocation and name checks between concurrent ``create`` calls."""
    root = qemu_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# Open connections to VMs' second monitors, per (socket, QEMU pid), shared by every QemuVM object of this
# process (the port opens a new QemuVM for each call). Off by default: a short-lived process (the CLI) gains
# nothing from keeping one and would only find the monitor taken by the daemon; a long-lived manager turns it
# on (``use_persistent_monitors``).
PERSISTENT_MONITOR = False
_monitors: dict[tuple[str, int], QMPConnection] = {}
_monitor_refused: dict[tuple[str, int], float] = {}  # when the second monitor was found taken
MONITOR_RETRY_S = 60.0


def use_persistent_monitors(on: bool = True) -> None:
    """Pause and resume VMs over connections this process keeps open (for a long-lived manager)."""
    global PERSISTENT_MONITOR
    PERSISTENT_MONITOR = on
    if not on:
        for key in list(_monitors):
            _monitors.pop(key).close()


class QemuVM:
    """A guest managed by the QEMU port. Get one with ``QemuVM.create`` or ``QemuVM.open``."""

    def __init__(self, vm_dir: Path, config: VMConfig):
        self._dir = vm_dir
        self.config = config
        self.console = SerialConsole(vm_dir / "console.sock", vm_dir / "serial.log", vm_dir / "console.lock")

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    def create(
        cls,
        name: str,
        image: GuestImage | None = None,
        mem_mib: int = 128,
        ip: str | None = None,
        gateway: str | None = None,
        bridge: str | None = None,
        disk: str | None = None,
        wait_up: bool = True,
        timeout: float = 120,
        network: bool = True,
        mem_backend: str = "ram",
        vcpus: int = 1,
        extra_append: str = "",
        boot: str = "pvh",
    ) -> QemuVM:
        """Start a guest and (by default) wait for its ``XENSWAP_GUEST_UP`` line.

        ``ip`` is the guest's address with prefix (10.0.0.2/24). Without ``bridge`` the host end of the tap
        is routed: it gets ``gateway`` (default: the subnet's first other address) with the guest as its
        /32 peer. ``disk`` is a QEMU drive spec (file or URI, e.g. nbd+unix:///x?socket=/path) attached as
        virtio-blk (/dev/vda). ``network=False`` starts the guest without a NIC. ``boot="pvh"`` starts the
        uncompressed kernel at its PVH entry (fast); ``boot="bzimage"`` goes through the kernel's decompressor.
        """
        if boot not in ("pvh", "bzimage"):
            raise XenswapError(f"unknown boot mode {boot!r} (pvh or bzimage)")
        if mem_backend not in ("ram", "memfd"):
            raise XenswapError(f"unknown memory backend {mem_backend!r} (ram or memfd)")
        if not NAME_RE.match(name):
            raise XenswapError(f"invalid VM name {name!r}: 1-32 of A-Z a-z 0-9 _ . - (not starting with . or -)")
        if name.isdigit():
            raise XenswapError(f"invalid VM name {name!r}: a number would be confused with a domain id")
        if mem_mib < MIN_MEM_MIB:
            raise XenswapError(f"{mem_mib} MiB is too little: Debian's kernel needs at least {MIN_MEM_MIB} MiB")
        if ip is not None:
            try:
                iface = ipaddress.ip_interface(ip)
            except ValueError as exc:
                raise XenswapError(f"invalid guest address {ip!r}: {exc}") from exc
            if "/" not in ip:
                raise XenswapError(f"guest address {ip!r} needs a prefix length, e.g. {iface.ip}/24")
        if gateway is not None:
            try:
                ipaddress.ip_address(gateway)
            except ValueError as exc:
                raise XenswapError(f"invalid gateway {gateway!r}: {exc}") from exc
        qemu_binary()
        image = image or build_guest_image()
        check_image(image)

        with _registry_lock():
            vm_dir = qemu_root() / name
            if vm_dir.exists():
                stale = _load_if_dead(vm_dir)
                if stale is None:
                    raise DuplicateName(name)
                stale._cleanup()
            vm_dir.mkdir(parents=True)
            if len(str(vm_dir / "qmp-long.sock")) > UNIX_PATH_MAX:
                shutil.rmtree(vm_dir)
                raise XenswapError(f"state directory {vm_dir} is too long for unix sockets (set XENSWAP_STATE)")
            config = VMConfig(
                name=name, domid=0, mem_mib=mem_mib, vcpus=vcpus, kernel=str(_boot_kernel(image, boot)),
                initrd=str(image.initrd), ip=ip, gateway=gateway, bridge=bridge, disk=disk,
                mem_backend=mem_backend, recipe_hash=image.recipe_hash, extra_append=extra_append,
            )
            vm = cls(vm_dir, config)
            try:
                vm._allocate_id_and_tap(network)
            except BaseException:
                vm._cleanup()
                raise

        try:
            vm._start_qemu()
        except BaseException:
            vm._cleanup()
            raise
        if wait_up:
            try:
                vm.wait_up(timeout)
            except KeyboardInterrupt:
                vm.destroy()  # interrupted while booting: leave nothing half-made behind
                raise
        return vm

    def _allocate_id_and_tap(self, network: bool, attempts: int = 8) -> None:
        """Pick the smallest free domain id and create its tap (registry lock held).

        Ids must be unique on the whole host, not just in this state directory, because tap names and MACs
        derive from them and several state directories (test sessions) may run guests at once: ids whose
        ``xs<id>-`` tap exists on the host are taken too, and losing a race for a tap name moves on to the
        next id.
        """
        config = self.config
        skip: set[int] = set()
        for _ in range(attempts):
            config.domid = _free_domid(skip | taps.host_tap_ids())
            self._save()  # the id is reserved in this state directory from here on
            if not network:
                return
            name = taps.tap_name(config.domid, config.name)
            try:
                taps.create_tap(name, bridge=config.bridge, guest_cidr=None if config.bridge else config.ip,
                                gateway=config.gateway)
            except taps.TapExists:
                skip.add(config.domid)
                continue
            config.tap = name  # only a tap we created is ever deleted by us
            config.mac = taps.mac_address(config.domid)
            if config.bridge is None and config.ip is not None:
                config.host_address = taps.host_address_for(config.ip, config.gateway)
            self._save()
            return
        raise XenswapError(f"no free tap name for {config.name!r} after {attempts} attempts")

    def _start_qemu(self) -> None:
        argv = qemu_argv(self.config, self._dir)
        argv[0] = qemu_binary()
        # Errors before QEMU daemonises come back on this pipe; afterwards its stderr is qemu.log (-D).
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              check=False)
        if proc.returncode != 0:
            message = proc.stderr.decode(errors="replace").strip().replace("\n", " | ")
            raise XenswapError(f"QEMU failed to start {self.name!r}: {message[-600:]}")
        self.config.pid = int((self._dir / "qemu.pid").read_text().strip())
        self._save()

    def wait_up(self, timeout: float = 120) -> float:
        """Wait for the guest's UP marker; returns seconds since the VM was created. Times out with the log tail
        (and destroys the VM, which is of no use half-booted)."""
        deadline = time.monotonic() + timeout
        marker = f"{UP_MARKER} {self.name}"
        while marker not in (log := self.console.log_text()):
            if "Kernel panic - not syncing" in log:
                time.sleep(0.5)  # let the panic's last lines reach the log
                tail = self.console.tail()
                self.destroy()
                raise XenswapError(f"guest {self.name!r} panicked while booting ({self.mem_mib} MiB): "
                                   + " | ".join(x.strip() for x in tail.splitlines() if x.strip())[-600:])
            if not self.alive():
                tail = self.console.tail()
                try:
                    qemu_log = (self._dir / "qemu.log").read_text(errors="replace").strip()[-300:]
                except OSError:
                    qemu_log = ""
                self._cleanup()
                raise XenswapError(f"QEMU of {self.name!r} exited during boot: {qemu_log} {tail[-500:]}")
            if time.monotonic() >= deadline:
                tail = self.console.tail()
                self.destroy()
                raise GuestBootTimeout(self.name, timeout, tail)
            time.sleep(0.1)
        self.config.up_s = round(time.time() - self.config.created, 2)
        self._save()
        return self.config.up_s

    @classmethod
    def open(cls, ref: str | int) -> QemuVM:
        """A running VM by name or domain id."""
        # By name: its own state directory, no scan of every VM (the wake-up path resumes guests through this).
        if NAME_RE.match(str(ref)) and not str(ref).isdigit():
            vm = _load(qemu_root() / str(ref))
            if vm is not None and vm.alive():
                return vm
        vms = list_vms()
        for vm in vms:
            if vm.name == str(ref) or str(vm.domid) == str(ref):
                return vm
        raise UnknownDomain(str(ref), [vm.name for vm in vms])

    def destroy(self, timeout: float = 10.0) -> None:
        """Stop QEMU (quit over QMP, SIGKILL if it does not go), remove the tap and the state directory."""
        pid = self.config.pid
        if pid and _pid_is_qemu_of(pid, self._dir):
            try:
                qmp_execute(self.qmp_socket, "quit", timeout=2.0)
            except QMPFailure:
                pass  # not answering: killed below
            deadline = time.monotonic() + timeout
            while _pid_is_qemu_of(pid, self._dir) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_is_qemu_of(pid, self._dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                while _pid_is_qemu_of(pid, self._dir):
                    time.sleep(0.05)
        self._cleanup()

    def _cleanup(self) -> None:
        for key in [k for k in _monitors if k[0] == str(self.qmp_long_socket)]:
            _monitors.pop(key).close()
        if self.config.tap:
            taps.delete_tap(self.config.tap)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _save(self) -> None:
        tmp = self._dir / "vm.json.tmp"
        tmp.write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True))
        tmp.replace(self._dir / "vm.json")

    # ----------------------------------------------------------------- facts

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def domid(self) -> int:
        return self.config.domid

    @property
    def state_dir(self) -> Path:
        return self._dir

    @property
    def pid(self) -> int:
        if self.config.pid is None:
            raise XenswapError(f"VM {self.name!r} has no QEMU process yet")
        return self.config.pid

    @property
    def tap(self) -> str | None:
        return self.config.tap

    @property
    def ip(self) -> str | None:
        """The guest's address without prefix (what to ping), or None."""
        return str(ipaddress.ip_interface(self.config.ip).ip) if self.config.ip else None

    @property
    def mem_mib(self) -> int:
        return self.config.mem_mib

    @property
    def serial_log_path(self) -> Path:
        return self._dir / "serial.log"

    @property
    def qmp_socket(self) -> Path:
        """Monitor for short connections (one command or a few, then disconnect)."""
        return self._dir / "qmp.sock"

    @property
    def qmp_long_socket(self) -> Path:
        """Second monitor, free for one long-lived client (such as the paging engine's event loop)."""
        return self._dir / "qmp-long.sock"

    def alive(self) -> bool:
        return self.config.pid is not None and _pid_is_qemu_of(self.config.pid, self._dir)

    def qmp(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        return qmp_execute(self.qmp_socket, command, arguments, timeout)

    def status(self) -> str:
        """QEMU's run state: running, paused, shutdown, guest-panicked, ..."""
        return self.qmp("query-status")["status"]

    def pause(self) -> None:
        self._run_state_command("stop")

    def resume(self) -> None:
        self._run_state_command("cont")

    def _run_state_command(self, command: str) -> None:
        """``stop``/``cont`` over this process's open connection to the second monitor (``qmp-long.sock``),
        opened on first use and kept: waking a paused, paged-out guest is latency-critical, and a fresh
        connection to a QEMU whose main loop was paged out cost 6-38 ms. Falls back to a short connection
        when the second monitor is taken by another process or the connection broke (both commands are
        idempotent, so a retry after a half-done attempt is safe)."""
        if PERSISTENT_MONITOR:
            key = (str(self.qmp_long_socket), self.pid)
            monitor = _monitors.get(key)
            if monitor is None and time.monotonic() - _monitor_refused.get(key, -MONITOR_RETRY_S) >= MONITOR_RETRY_S:
                try:
                    monitor = _monitors[key] = QMPConnection(self.qmp_long_socket, timeout=1.0)
                except QMPFailure:
                    # another long-lived client holds it: don't wait for its greeting on every call
                    _monitor_refused[key] = time.monotonic()
            if monitor is not None:
                try:
                    monitor.execute(command)
                    return
                except QMPFailure:
                    if monitor.is_open:
                        raise  # QEMU refused the command itself
                    _monitors.pop(key, None)
        self.qmp(command)

    def vcpu_thread_ids(self) -> list[int]:
        """Host thread ids of the vCPUs, in vCPU order."""
        cpus = self.qmp("query-cpus-fast")
        return [cpu["thread-id"] for cpu in sorted(cpus, key=lambda c: c["cpu-index"])]

    def vcpu_times(self) -> list[float]:
        """Cumulative CPU seconds of each vCPU thread (from /proc/PID/task/TID/stat)."""
        return [_proc_cpu_seconds(Path(f"/proc/{self.pid}/task/{tid}/stat")) for tid in self.vcpu_thread_ids()]

    def cpu_seconds(self) -> float:
        """CPU time of the whole QEMU process (all threads)."""
        return _proc_cpu_seconds(Path(f"/proc/{self.pid}/stat"))

    def rss_kib(self) -> int:
        """Resident set of the QEMU process (counts the page cache of the mapped kernel file, shared by all VMs)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def memory_kib(self) -> dict[str, int]:
        """Rss, Pss and Private (clean + dirty) of the QEMU process from smaps_rollup, in KiB: Pss and Private
        show what one more VM really costs, as the kernel file's page cache is shared between QEMUs."""
        figures = {"rss": 0, "pss": 0, "private": 0, "swap": 0}
        for line in Path(f"/proc/{self.pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            value = int(rest.split()[0]) if rest.strip().split() and rest.split()[0].isdigit() else 0
            if key == "Rss":
                figures["rss"] = value
            elif key == "Pss":
                figures["pss"] = value
            elif key in ("Private_Clean", "Private_Dirty"):
                figures["private"] += value
            elif key == "Swap":
                figures["swap"] = value
        return figures

    def guest_ram_resident_kib(self) -> int:
        """Resident KiB of guest RAM (the RAM mapping's Rss in /proc/PID/smaps): what paging brings down."""
        start, _length = self.ram_region()
        header = f"{start:x}-"
        inside = False
        with open(f"/proc/{self.pid}/smaps") as smaps:
            for line in smaps:
                if not inside:
                    inside = line.startswith(header)
                elif line.startswith("Rss:"):
                    return int(line.split()[1])
        raise XenswapError(f"guest RAM mapping at {start:#x} vanished from /proc/{self.pid}/smaps")

    def ram_region(self) -> tuple[int, int]:
        """(host virtual address, length) of guest RAM inside the QEMU process.

        The guest's RAM is the memory backend ``xenswap-ram``; its size comes from QMP. Among the process's
        private writable mappings of exactly that size, the right one is confirmed by content: a page of
        guest-physical memory saved by QEMU (pmemsave) must equal the page at the same offset read through
        /proc/PID/mem. The result is cached per QEMU pid in the state directory.
        """
        cache = self._dir / "ram.json"
        try:
            cached = json.loads(cache.read_text())
            if cached["pid"] == self.pid:
                return cached["start"], cached["length"]
        except (OSError, ValueError, KeyError):
            pass
        length = self._ram_backend_size()
        candidates = self._ram_candidates(length)
        if not candidates:
            raise XenswapError(f"no {length}-byte guest RAM mapping in /proc/{self.pid}/maps")
        start = candidates[0] if len(candidates) == 1 else self._confirm_by_content(candidates, length)
        cache.write_text(json.dumps({"pid": self.pid, "start": start, "length": length}))
        return start, length

    def _ram_backend_size(self) -> int:
        for memdev in self.qmp("query-memdev"):
            if memdev.get("id") == RAM_BACKEND_ID:
                return int(memdev["size"])
        return self.mem_mib << 20

    def _ram_candidates(self, length: int) -> list[int]:
        found = []
        for line in Path(f"/proc/{self.pid}/maps").read_text().splitlines():
            parts = line.split()
            start, end = (int(x, 16) for x in parts[0].split("-"))
            path = parts[5] if len(parts) > 5 else ""
            if end - start != length or not parts[1].startswith("rw"):
                continue
            if path == "" or path.startswith("/memfd:"):  # QEMU names its memfds memory-backend-memfd
                found.append(start)
        return found

    def _confirm_by_content(self, candidates: list[int], length: int) -> int:
        probe = self._dir / "ram-probe.bin"
        # Guest-physical 16 MiB: where the kernel is loaded, so the page is non-zero and stable.
        offset = min(16 << 20, length - 4096)
        self.qmp("pmemsave", {"val": offset, "size": 4096, "filename": str(probe)})
        expected = probe.read_bytes()
        probe.unlink()
        with open(f"/proc/{self.pid}/mem", "rb") as mem:
            for start in candidates:
                mem.seek(start + offset)
                if mem.read(4096) == expected:
                    return start
        raise XenswapError(f"none of the guest-RAM-sized mappings of QEMU {self.pid} holds the guest's memory")

    def __repr__(self) -> str:
        return f"QemuVM(name={self.name!r}, domid={self.domid}, pid={self.config.pid}, tap={self.tap!r})"


def _load(vm_dir: Path) -> QemuVM | None:
    try:
        data = json.loads((vm_dir / "vm.json").read_text())
        return QemuVM(vm_dir, VMConfig(**data))
    except (OSError, ValueError, TypeError):
        return None


def _load_if_dead(vm_dir: Path) -> QemuVM | None:
    """The VM in ``vm_dir`` if its QEMU is gone (so it can be cleaned up), else None."""
    vm = _load(vm_dir)
    if vm is None:
        return QemuVM(vm_dir, VMConfig(name=vm_dir.name, domid=-1, mem_mib=0, vcpus=0, kernel="", initrd=""))
    return None if vm.alive() or _starting(vm) else vm


def _starting(vm: QemuVM) -> bool:
    """Being created by some process right now: no QEMU pid yet, and recently made."""
    return vm.config.pid is None and time.time() - vm.config.created < STARTING_GRACE_S


STARTING_GRACE_S = 120  # a VM dir without a pid this young is still being created by someone


def list_vms(clean: bool = True) -> list[QemuVM]:
    """Every live VM of this port, in domain id order; dead ones are cleaned up (tap and state removed)."""
    root = qemu_root()
    if not root.is_dir():
        return []
    vms = []
    for vm_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        vm = _load(vm_dir)
        if vm is not None and vm.alive():
            vms.append(vm)
            continue
        if clean and not (vm is not None and _starting(vm)):
            with _registry_lock():
                stale = _load_if_dead(vm_dir)
                if stale is not None:
                    stale._cleanup()
    return sorted(vms, key=lambda v: v.domid)


def _free_domid(taken: set[int] | None = None) -> int:
    """The smallest id >= 1 not in ``taken`` nor held by a VM directory (call with the registry lock held)."""
    used = set(taken or ())
    root = qemu_root()
    for vm_dir in sorted(root.iterdir()) if root.is_dir() else ():
        if not vm_dir.is_dir():
            continue
        vm = _load(vm_dir)
        if vm is None:
            continue
        if vm.alive() or _starting(vm):
            used.add(vm.domid)
        else:
            vm._cleanup()  # a dead VM's id (and tap name) is free again
    domid = 1
    while domid in used:
        domid += 1
    return domid
