"""Events for the QEMU port's working-set work: trigger one (to measure its working set), and notice incoming
packets for paged-out guests (to prefetch before delivery).

Hold-and-release of packets: a guest paged out entirely is *paused* (QMP ``stop``), and a stopped QEMU does
not read its tap, so frames for it wait in the tap's queue (the kernel holds them; up to the tap's txqueuelen,
default 1000). A raw AF_PACKET socket bound to the tap still sees every frame the host transmits to it, so
``PacketWaker`` learns that a packet is waiting and which event type it is, the manager prefetches that event's
working set (MADV_WILLNEED) and resumes the guest, and QEMU then delivers the held frames.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from xenswap.core.working_set import check_event
from xenswap.errors import XenswapError

if TYPE_CHECKING:
    from xenswap.hv.qemu.memory import ProcessMemory
    from xenswap.hv.qemu.vm import QemuVM

ETH_P_ALL = 0x0003
HTTP_PORTS = (80, 8080)


def trigger_event(vm: QemuVM, event: str, timeout: float = 60.0) -> float:
    """Make the guest handle one event of this type from the host side; returns the seconds it took."""
    check_event(event)
    t0 = time.monotonic()
    if event in ("ping", "tcp", "http") and not vm.ip:
        raise XenswapError(f"{vm.name} has no IP address: network events need one")
    if event == "idle":
        pass
    elif event == "ping":
        proc = subprocess.run(["ping", "-c", "1", "-W", str(int(timeout)), vm.ip], capture_output=True)
        if proc.returncode != 0:
            raise XenswapError(f"{vm.name} did not answer a ping")
    elif event == "tcp":
        with socket.create_connection((vm.ip, 80), timeout=timeout):
            pass
    elif event == "http":
        http_get(vm.ip, timeout=timeout)
    elif event == "console":
        vm.console.run("ls / >/dev/null; date", timeout=timeout)
    elif event == "disk":
        # Without a block device, the guest's page cache of a fresh file is the closest thing to disk I/O.
        target = "/dev/vda" if vm.config.disk else "/tmp/xenswap-disk-event"
        cmd = (f"dd if={target} of=/dev/null bs=64k count=64 2>/dev/null" if vm.config.disk
               else f"dd if=/dev/zero of={target} bs=64k count=16 2>/dev/null; sync; rm -f {target}")
        vm.console.run(cmd, timeout=timeout)
    return time.monotonic() - t0


def http_get(ip: str, path: str = "/", port: int = 80, timeout: float = 30.0) -> bytes:
    """One HTTP/1.0 GET (the guest's busybox httpd); returns the whole response."""
    with socket.create_connection((ip, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks)
    if not response.startswith(b"HTTP/1."):
        raise XenswapError(f"no HTTP answer from {ip}:{port}")
    return response


def measure_event(vm: QemuVM, mech: ProcessMemory, event: str, window: float = 10.0, settle: float = 1.0
                  ) -> tuple[list[int], float]:
    """Frames the guest touches while handling one event (plus the background of that window).

    ``idle`` measures a ``window``-second stretch of doing nothing; other events measure from just before
    the trigger to ``settle`` seconds after it finished. Returns (frames, seconds measured)."""
    mech.accessed_pages_and_clear()
    t0 = time.monotonic()
    if event == "idle":
        time.sleep(window)
    else:
        trigger_event(vm, event)
        time.sleep(settle)
    return mech.accessed_pages_and_clear(), time.monotonic() - t0


def classify_frame(frame: bytes) -> str | None:
    """The event type of an Ethernet frame going to a guest: ping, http, tcp, or None (not an event we wake
    for, e.g. IPv6 router solicitations). An ARP request counts as "ping": the host resolves the guest's MAC
    before the first packet of any conversation, and a paused guest would never answer it."""
    if len(frame) < 14:
        return None
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == 0x0806:
        return "ping"
    if ethertype != 0x0800 or len(frame) < 34:
        return None
    ihl = (frame[14] & 0x0F) * 4
    proto = frame[23]
    if proto == 1:
        return "ping" if len(frame) > 14 + ihl and frame[14 + ihl] == 8 else None
    if proto == 6 and len(frame) >= 14 + ihl + 4:
        dport = struct.unpack_from("!H", frame, 14 + ihl + 2)[0]
        return "http" if dport in HTTP_PORTS else "tcp"
    if proto == 17:
        return "tcp"  # any other service traffic: use the generic network working set
    return None


class PacketWaker:
    """Watches the taps of paged-out guests; calls ``on_packet(name, event)`` once per wake-up.

    A thread with one raw socket per watched tap. ``watch(name, tap)`` arms a guest (after pausing it and
    paging it out), ``unwatch(name)`` disarms it; on the first classified frame the guest is disarmed and
    the callback runs in the waker's thread (it must prefetch and resume)."""

    def __init__(self, on_packet: Callable[[str, str], None]) -> None:
        self.on_packet = on_packet
        self._socks: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="xenswap-packet-waker", daemon=True)
        self._thread.start()

    def watch(self, name: str, tap: str) -> None:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((tap, 0))
        s.setblocking(False)
        with self._lock:
            old = self._socks.pop(name, None)
            self._socks[name] = s
        if old:
            old.close()
        self._wakeup_w.send(b"x")

    def unwatch(self, name: str) -> None:
        with self._lock:
            s = self._socks.pop(name, None)
        if s:
            s.close()
        self._wakeup_w.send(b"x")

    def watched(self) -> list[str]:
        with self._lock:
            return sorted(self._socks)

    def close(self) -> None:
        self._stop = True
        self._wakeup_w.send(b"x")
        self._thread.join(timeout=5)
        with self._lock:
            for s in self._socks.values():
                s.close()
            self._socks.clear()
        self._wakeup_r.close()
        self._wakeup_w.close()

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                by_fd = {s.fileno(): (name, s) for name, s in self._socks.items()}
            ready, _, _ = select.select([self._wakeup_r, *[s for _, s in by_fd.values()]], [], [], 1.0)
            for r in ready:
                if r is self._wakeup_r:
                    with contextlib.suppress(OSError):
                        self._wakeup_r.recv(64)
                    continue
                name, s = by_fd[r.fileno()]
                event = None
                with contextlib.suppress(OSError):
                    while event is None:
                        frame, addr = s.recvfrom(65536)
                        if addr[2] == socket.PACKET_OUTGOING:  # host -> guest direction on the tap
                            event = classify_frame(frame)
                if event is None:
                    continue
                self.unwatch(name)
                try:
                    self.on_packet(name, event)
                except Exception as exc:  # keep the waker alive for the other guests
                    print(f"xenswap: wake of {name} failed: {exc}")


class TapWakeSource:
    """The manager's ``WakeSource`` for QEMU guests: a PacketWaker over their taps."""

    def __init__(self, manager, prefetch: bool = True) -> None:
        self.manager = manager
        self.prefetch = prefetch  # False: resume only (demand paging), for comparison
        self.waker = PacketWaker(lambda name, event: manager.page_in(name, event=event, prefetch=self.prefetch))

    def watch(self, name: str) -> None:
        from xenswap.hv.qemu.vm import QemuVM

        tap = QemuVM.open(name).tap
        if tap:
            self.waker.watch(name, tap)

    def unwatch(self, name: str) -> None:
        self.waker.unwatch(name)

    def watched(self) -> list[str]:
        return self.waker.watched()

    def close(self) -> None:
        self.waker.close()


def wake_source_for(hv: object, manager) -> TapWakeSource:
    return TapWakeSource(manager)
