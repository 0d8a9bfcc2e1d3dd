"""The QEMU port: tiny guests under ``qemu-system-x86_64 -accel tcg``, driven over QMP, one tap each.

``QemuVM`` (xenswap.hv.qemu.vm) is one guest; ``QemuHypervisor`` is the port interface of
xenswap.hv.base over all of them, found through their state directories. In short::

    vm = QemuVM.create("vm1", ip="10.0.0.2/24")      # boots the cached guest image, waits for its UP line
    vm.console.run("uname -r", timeout=30)             # shell command over the serial console -> output
    vm.pid, vm.vcpu_thread_ids(), vm.ram_region()      # host facts for idleness and paging
    vm.pause(); vm.resume(); vm.status()               # QMP stop / cont / query-status
    vm.destroy()                                       # QEMU, tap and state directory gone
    QemuVM.open("vm1")                                 # from any process, by name or domain id
    open_hypervisor().list_domains()                   # xl-like rows (DomainInfo)
"""

from __future__ import annotations

from pathlib import Path

from xenswap.errors import XenswapError
from xenswap.hv.base import DomainInfo, Hypervisor
from xenswap.hv.qemu.qmp import QMPFailure, qmp_session
from xenswap.hv.qemu.vm import QemuVM, list_vms

__all__ = ["QemuHypervisor", "QemuVM", "open_hypervisor"]


def _thread_running(pid: int, tid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] == "R"


class QemuHypervisor(Hypervisor):
    name = "qemu"

    def list_domains(self) -> list[DomainInfo]:
        domains = []
        for vm in list_vms():
            extra: dict = {}
            try:
                status, cpus = _status_and_cpus(vm)
                tids = [cpu["thread-id"] for cpu in sorted(cpus, key=lambda c: c["cpu-index"])]
            except QMPFailure:
                if not vm.alive():
                    continue  # exited between the directory scan and now
                # Monitor busy or hung: still list the VM, with what /proc tells (run state unknown).
                status, tids = "unknown", _vcpu_tids_from_proc(vm.pid)
                extra["qmp"] = "unreachable"
            try:
                resident_mib: float | None = round(vm.guest_ram_resident_kib() / 1024, 1)
            except (XenswapError, OSError):
                resident_mib = None  # RAM not found (yet): the column stays empty rather than wrong
            domains.append(
                DomainInfo(
                    name=vm.name,
                    domid=vm.domid,
                    mem_mib=vm.mem_mib,
                    vcpus=len(tids) or vm.config.vcpus,
                    state=_xl_state(status, any(_thread_running(vm.pid, t) for t in tids)),
                    cpu_time_s=vm.cpu_seconds(),
                    resident_mib=resident_mib,
                    extra={"pid": vm.pid, "vcpu_tids": tids, "tap": vm.tap, "ip": vm.ip, "rss_kib": vm.rss_kib(),
                           **extra},
                )
            )
        return domains

    def vm(self, ref: str | int) -> QemuVM:
        return QemuVM.open(ref)

    def pause(self, ref: str | int) -> None:
        QemuVM.open(ref).pause()

    def unpause(self, ref: str | int) -> None:
        QemuVM.open(ref).resume()

    def vcpu_times(self, ref: str | int) -> list[float]:
        return QemuVM.open(ref).vcpu_times()

    def destroy(self, ref: str | int) -> None:
        QemuVM.open(ref).destroy()


def _vcpu_tids_from_proc(pid: int) -> list[int]:
    """vCPU threads by name (QEMU runs with debug-threads=on: "CPU 0/TCG"), in vCPU order."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("CPU ") and "/" in comm:
            found.append((int(comm[4:].split("/")[0]), int(task.name)))
    return [tid for _, tid in sorted(found)]


def _status_and_cpus(vm: QemuVM) -> tuple[str, list[dict]]:
    status, cpus = qmp_session(vm.qmp_socket, [("query-status", None), ("query-cpus-fast", None)], timeout=5.0)
    return status["status"], cpus


def _xl_state(status: str, vcpu_running: bool) -> str:
    """xl's six flags (r b p s c d) from QEMU's run state."""
    if status in ("running", "unknown"):
        return "r-----" if vcpu_running else "-b----"
    if status in ("paused", "suspended", "prelaunch", "inmigrate", "postmigrate", "finish-migrate", "save-vm",
                  "restore-vm", "debug", "watchdog"):
        return "--p---"
    if status == "shutdown":
        return "---s--"
    if status in ("guest-panicked", "internal-error", "io-error"):
        return "----c-"
    return "------"


def open_hypervisor() -> QemuHypervisor:
    return QemuHypervisor()
