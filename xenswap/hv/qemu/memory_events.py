"""Events for the QEMU port's working-set work: trigger one (to measure its working set), and notice incoming
packets for paged-out guests (to prefetch before delivery).

Hold-and-release of packets: a guest paged out entirely is *paused* (QMP ``stop``), and a stopped QEMU does
not read its tap, so frames for it wait in the tap's queue (the kernel holds them; up to the tap's txqueuelen,
default 1000). A raw AF_PACKET socket bound to the tap still sees every frame the host transmits to it, so
``PacketWaker`` learns that a packet is waiting and which event type it is, the manager prefetches that event's
working set (MADV_WILLNEED) and resumes the guest, and QEMU then delivers the held frames.

On a routed tap the host would first resolve the paused guest's MAC (an ARP request, which a paused guest
cannot answer until it is resumed): the ARP request then is what wakes the guest, a round trip is added
before the real packet, and the wake-up is classified as "ping" whatever the packet is. So while a guest is
watched its neighbour entry on the host is pinned (``nud permanent``, the tap's fixed MAC): the first frame
the waker sees is the real one.
"""

from __future__ import annotations

import collections
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
SO_TIMESTAMPNS = 35  # socket(7): kernel receive time of each frame as a timespec (SCM_TIMESTAMPNS)
NUD_PERMANENT = 0x80


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
    """Watches the taps of paged-out guests; calls ``on_packet(name, event, frame_time)`` once per wake-up
    (``frame_time``: the kernel's time.time() stamp of the frame, for latency accounting).

    A thread with one raw socket per watched tap. ``watch(name, tap)`` arms a guest (after pausing it and
    paging it out), ``unwatch(name)`` disarms it; on the first classified frame the guest is disarmed and
    the callback runs in the waker's thread (it must prefetch and resume)."""

    def __init__(self, on_packet: Callable[[str, str, float], None]) -> None:
        self.on_packet = on_packet
        self._socks: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="xenswap-packet-waker", daemon=True)
        self._thread.start()

    def watch(self, name: str, tap: str) -> None:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
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
                watched = {s: name for name, s in self._socks.items()}
            try:
                ready, _, _ = select.select([self._wakeup_r, *watched], [], [], 1.0)
            except (OSError, ValueError):  # a socket was closed (unwatched) under us: take the new set
                continue
            for r in ready:
                if r is self._wakeup_r:
                    with contextlib.suppress(OSError):
                        self._wakeup_r.recv(64)
                    continue
                name = watched[r]
                event = None
                frame_time = time.time()
                with contextlib.suppress(OSError):  # drained, or closed by unwatch meanwhile
                    while event is None:
                        frame, ancillary, _flags, addr = r.recvmsg(65536, socket.CMSG_SPACE(16))
                        if addr[2] == socket.PACKET_OUTGOING:  # host -> guest direction on the tap
                            event = classify_frame(frame)
                            frame_time = _kernel_timestamp(ancillary, frame_time)
                if event is None:
                    continue
                with self._lock:
                    if self._socks.get(name) is not r:
                        continue  # unwatched (or re-armed with a new socket) meanwhile
                    del self._socks[name]
                try:
                    self.on_packet(name, event, frame_time)
                except Exception as exc:  # keep the waker alive for the other guests
                    print(f"xenswap: wake of {name} failed: {exc}")
                finally:
                    # Closed only now: closing a packet socket waits for an RCU grace period (synchronize_net),
                    # which cost ~6 ms on the wake-up path when it came before the callback.
                    r.close()


def _kernel_timestamp(ancillary: list[tuple[int, int, bytes]], default: float) -> float:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack_from("qq", data)
            return seconds + nanoseconds / 1e9
    return default


def pin_neighbour(tap: str, ip: str, mac: str) -> None:
    """A permanent neighbour entry on the host for the guest behind a routed tap (its MAC never changes):
    the host then never ARPs for it, so a packet for a paused guest is the packet itself."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=tap)
        if found:
            ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=found[0], state=NUD_PERMANENT)


def unpin_neighbour(tap: str, ip: str) -> None:
    """Drop a pinned (permanent) entry again, so the kernel learns the neighbour by ARP as usual; an entry the
    kernel learned itself is left alone."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=tap)
        if not found:
            return
        for entry in ipr.get_neighbours(ifindex=found[0], dst=ip):
            if entry["state"] & NUD_PERMANENT:
                with contextlib.suppress(NetlinkError):
                    ipr.neigh("del", dst=ip, ifindex=found[0])


class TapWakeSource:
    """The manager's ``WakeSource`` for QEMU guests: a PacketWaker over their taps.

    ``wakes`` keeps the latest wake-ups' timelines (ms after the frame: when the waker saw it, and the
    page-in steps), for the benchmark's breakdown and for debugging slow wake-ups."""

    def __init__(self, manager, prefetch: bool = True, pin_neighbours: bool = True) -> None:
        self.manager = manager
        self.prefetch = prefetch  # False: resume only (demand paging), for comparison
        self.pin_neighbours = pin_neighbours  # False: the host ARPs for a paused guest (the behaviour before)
        self.wakes: collections.deque[dict] = collections.deque(maxlen=64)
        self.waker = PacketWaker(self._on_packet)

    def _on_packet(self, name: str, event: str, frame_time: float) -> None:
        seen = time.time()
        decision = self.manager.page_in(name, event=event, prefetch=self.prefetch)
        timeline = {"domain": name, "event": event, "seen_ms": (seen - frame_time) * 1000}
        timeline.update({k: v + timeline["seen_ms"] for k, v in (decision.timings or {}).items()})
        self.wakes.append(timeline)

    def watch(self, name: str) -> None:
        from xenswap.hv.qemu.vm import QemuVM

        vm = QemuVM.open(name)
        if not vm.tap:
            return
        routed = vm.config.host_address is not None and vm.config.bridge is None
        if routed and vm.ip and vm.config.mac:
            if self.pin_neighbours:
                pin_neighbour(vm.tap, vm.ip, vm.config.mac)
            else:
                unpin_neighbour(vm.tap, vm.ip)
        self.waker.watch(name, vm.tap)

    def unwatch(self, name: str) -> None:
        self.waker.unwatch(name)

    def watched(self) -> list[str]:
        return self.waker.watched()

    def close(self) -> None:
        self.waker.close()


def wake_source_for(hv: object, manager) -> TapWakeSource:
    from xenswap.hv.qemu.vm import use_persistent_monitors

    use_persistent_monitors(True)  # the wake-up's resume: no new QMP connection on the critical path
    return TapWakeSource(manager)
