"""See, hold and release packets heading for a VM's interface (so a paged-out VM can be woken first).

How: an iptables rule sends packets that the host bridge forwards out of a watched port (a QEMU tap, a
Xen vif, one of our veths) to an NFQUEUE (``-m physdev --physdev-out PORT -j NFQUEUE``; br_netfilter
hands bridged IPv4/IPv6 to iptables), and ``PacketWatcher`` reads that queue over a NETLINK_NETFILTER
socket speaking the nfnetlink_queue protocol itself (a handful of fixed structs; no C library needed).
A queued packet waits in the kernel until we give a verdict: ``HeldPacket.release()`` delivers it,
``drop()`` discards it. The queue is bound fail-open and the rule uses --queue-bypass, so if the manager
is gone or the queue is full, packets flow instead of vanishing. ARP is not IP and is not held (guests
answer it once awake; the sender retries).

Asyncio, in the style of qemu.qmp: ``async with PacketWatcher(queue=5) as w: w.watch_port("tap0");
packet = await w.get(); ...; packet.release()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from xenswap.net import kernel
from xenswap.net.kernel import NetError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQA_CFG_F_FAIL_OPEN = 0x01
NFQNL_COPY_PACKET = 2
NFQA_PACKET_HDR, NFQA_IFINDEX_INDEV, NFQA_IFINDEX_OUTDEV = 1, 5, 6
NFQA_IFINDEX_PHYSINDEV, NFQA_IFINDEX_PHYSOUTDEV, NFQA_PAYLOAD = 7, 8, 10
NFQA_VERDICT_HDR = 2
NF_DROP, NF_ACCEPT = 0, 1
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
RULE_COMMENT = "xenswap-watch"


def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    found = {}
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            break
        found[kind & 0x3FFF] = data[offset + _NLATTR.size: offset + length]  # strip NLA_F_NESTED/BYTEORDER
        offset += (length + 3) & ~3
    return found


def _ifindex(attrs: dict[int, bytes], kind: int) -> int | None:
    raw = attrs.get(kind)
    return struct.unpack(">I", raw)[0] if raw else None


@dataclass
class HeldPacket:
    """One packet the kernel holds for us until ``release()`` or ``drop()``."""

    packet_id: int
    hw_protocol: int  # ethertype: 0x0800 IPv4, 0x86dd IPv6
    payload: bytes  # the network-layer packet (up to the watcher's copy_range bytes)
    in_port: int | None
    out_port: int | None  # ifindex of the bridge port it would leave by (the VM's tap/vif)
    received: float = field(default_factory=time.monotonic)
    _watcher: PacketWatcher | None = field(default=None, repr=False)
    decided: bool = field(default=False, repr=False)

    def release(self) -> None:
        self._decide(NF_ACCEPT)

    def drop(self) -> None:
        self._decide(NF_DROP)

    def _decide(self, verdict: int) -> None:
        if self.decided or self._watcher is None:
            return
        self._watcher.verdict(self.packet_id, verdict)
        self.decided = True

    @property
    def destination(self) -> str | None:
        """The IP destination address, from the copied header."""
        if self.hw_protocol == 0x0800 and len(self.payload) >= 20:
            return socket.inet_ntop(socket.AF_INET, self.payload[16:20])
        if self.hw_protocol == 0x86DD and len(self.payload) >= 40:
            return socket.inet_ntop(socket.AF_INET6, self.payload[24:40])
        return None


class PacketWatcher:
    """Reads one NFQUEUE; ``watch_port`` sends packets leaving a bridge port to it."""

    def __init__(self, queue: int, copy_range: int = 256, max_held: int = 1024,
                 on_packet: Callable[[HeldPacket], None] | None = None):
        if not 0 <= queue <= 65535:
            raise ValueError(f"queue number {queue} out of range 0..65535")
        self.queue = queue
        self.copy_range = copy_range
        self.max_held = max_held
        self.on_packet = on_packet
        self.sock: socket.socket | None = None
        self.packets: asyncio.Queue[HeldPacket] = asyncio.Queue()
        self.ports: list[str] = []
        self.held: dict[int, HeldPacket] = {}
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- netlink -----------------------------------------------------------------------------------------

    def _message(self, msg_type: int, attrs: bytes, flags: int = NLM_F_REQUEST) -> bytes:
        self._seq += 1
        nfgen = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack(">H", self.queue)
        body = nfgen + attrs
        return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags,
                              self._seq, 0) + body

    def _request(self, attrs: bytes) -> None:
        """A config request, waiting for the kernel's ack (sync: only at start and close)."""
        assert self.sock is not None
        self.sock.send(self._message(NFQNL_MSG_CONFIG, attrs, NLM_F_REQUEST | NLM_F_ACK))
        seq = self._seq
        self.sock.setblocking(True)
        try:
            while True:
                data = self.sock.recv(65536)
                for msg_type, msg_seq, body in self._split(data):
                    if msg_type == NLMSG_ERROR and msg_seq == seq:
                        code = -struct.unpack_from("=i", body)[0]
                        if code:
                            raise NetError(f"NFQUEUE {self.queue}: the kernel refused: {os.strerror(code)}"
                                           + (" (is another watcher bound to it?)" if code == errno.EBUSY else ""))
                        return
        finally:
            self.sock.setblocking(False)

    @staticmethod
    def _split(data: bytes):
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                break
            yield msg_type, seq, data[offset + _NLMSGHDR.size: offset + length]
            offset += (length + 3) & ~3

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((0, 0))
        try:
            self._request(_attr(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_BIND, 0)))
            self._request(_attr(NFQA_CFG_PARAMS, struct.pack(">IB", self.copy_range, NFQNL_COPY_PACKET))
                          + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", self.max_held))
                          + _attr(NFQA_CFG_MASK, struct.pack(">I", NFQA_CFG_F_FAIL_OPEN))
                          + _attr(NFQA_CFG_FLAGS, struct.pack(">I", NFQA_CFG_F_FAIL_OPEN)))
        except Exception:
            self.sock.close()
            self.sock = None
            raise
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # we fell behind; fail-open keeps traffic flowing
                    continue
                raise
            for msg_type, _seq, body in self._split(data):
                if msg_type != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    continue
                attrs = _attrs(body[4:])  # after the nfgenmsg
                header = attrs.get(NFQA_PACKET_HDR)
                if header is None:
                    continue
                packet_id, hw_protocol, _hook = struct.unpack_from(">IHB", header)

                packet = HeldPacket(packet_id, hw_protocol, attrs.get(NFQA_PAYLOAD, b""),
                                    _ifindex(attrs, NFQA_IFINDEX_PHYSINDEV) or _ifindex(attrs, NFQA_IFINDEX_INDEV),
                                    _ifindex(attrs, NFQA_IFINDEX_PHYSOUTDEV) or _ifindex(attrs, NFQA_IFINDEX_OUTDEV),
                                    _watcher=self)
                self.held[packet_id] = packet
                if self.on_packet is not None:
                    self.on_packet(packet)
                else:
                    self.packets.put_nowait(packet)

    def verdict(self, packet_id: int, verdict: int) -> None:
        self.held.pop(packet_id, None)
        if self.sock is None:
            return
        self.sock.send(self._message(NFQNL_MSG_VERDICT, _attr(NFQA_VERDICT_HDR, struct.pack(">II", verdict,
                                                                                            packet_id))))

    async def get(self, timeout: float | None = None) -> HeldPacket:
        return await asyncio.wait_for(self.packets.get(), timeout)

    # --- which packets come here --------------------------------------------------------------------------

    def _rule(self, port: str) -> str:
        return (f"-m physdev --physdev-out {port} -m comment --comment \"{RULE_COMMENT} {port}\" "
                f"-j NFQUEUE --queue-num {self.queue} --queue-bypass")

    def watch_port(self, port: str) -> None:
        """Queue IPv4 and IPv6 packets that a host bridge forwards out of ``port`` (host namespace)."""
        _bridge_netfilter_on()
        self.unwatch_port(port)  # a rule left by a killed manager would otherwise be doubled
        for ipv6 in (False, True):
            kernel.iptables_restore(None, f"*filter\n-I FORWARD {self._rule(port)}\nCOMMIT\n", ipv6=ipv6)
        self.ports.append(port)

    def unwatch_port(self, port: str) -> None:
        for ipv6 in (False, True):
            rules = [line for line in kernel.iptables_save(None, ipv6=ipv6).splitlines()
                     if line.startswith("-A FORWARD ") and f'"{RULE_COMMENT} {port}"' in line]
            for rule in rules:  # every copy, whichever queue number it sends to
                with contextlib.suppress(NetError):
                    kernel.iptables_restore(None, f"*filter\n-D{rule[2:]}\nCOMMIT\n", ipv6=ipv6)
        if port in self.ports:
            self.ports.remove(port)

    def close(self) -> None:
        for port in list(self.ports):
            self.unwatch_port(port)
        if self.sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
            # unbinding would make the kernel drop what is still held: deliver it first
            for packet in list(self.held.values()):
                with contextlib.suppress(OSError):
                    packet.release()
            with contextlib.suppress(OSError, NetError):
                self._request(_attr(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_UNBIND, 0)))
            self.sock.close()
            self.sock = None

    async def __aenter__(self) -> PacketWatcher:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _bridge_netfilter_on() -> None:
    """Bridged IP packets reach iptables only with bridge-nf-call-iptables=1 (br_netfilter)."""
    for key in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
        path = f"/proc/sys/net/bridge/{key}"
        try:
            with open(path) as handle:
                if handle.read().strip() == "1":
                    continue
            with open(path, "w") as handle:
                handle.write("1")
        except FileNotFoundError:
            raise NetError("watching a bridge port needs br_netfilter (net.bridge.bridge-nf-call-iptables); "
                           "this kernel lacks it") from None


def stale_rules() -> list[str]:
    """Watch rules left in the host's FORWARD chain (e.g. by a killed manager)."""
    return [line for line in kernel.iptables_save(None).splitlines() if RULE_COMMENT in line]
