"""A deliberately small synchronous NBD client for the crash and bad-request tests, which need to send
exactly the bytes they choose (the real-client tests use qemu-img, qemu-io, nbdinfo and nbdcopy)."""

from __future__ import annotations

import socket
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
FLAG_FUA = 1


class NbdError(Exception):
    def __init__(self, errno: int) -> None:
        super().__init__(f"NBD error {errno}")
        self.errno = errno


class Client:
    def __init__(self, sock_path: str, export: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(sock_path)
        self.handle = 0
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert magic == NBDMAGIC and opt == IHAVEOPT and flags & 1
        self.sock.sendall(struct.pack(">I", 1 | 2))  # fixed newstyle, no zeroes
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        self.size = -1
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", self.recv(20))
            assert magic == OPT_REPLY_MAGIC
            payload = self.recv(length)
            if rtype == REP_INFO and struct.unpack_from(">H", payload)[0] == 0:
                self.size, self.tflags = struct.unpack_from(">QH", payload, 2)
            elif rtype == REP_ACK:
                break
            elif rtype & (1 << 31):
                raise ConnectionError(f"GO refused: {rtype:#x} {payload!r}")

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("server closed the connection")
            out += chunk
        return bytes(out)

    def send_request(self, cmd: int, offset: int, length: int, flags: int = 0, payload: bytes = b"",
                     magic: int = REQUEST_MAGIC) -> int:
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", magic, flags, cmd, self.handle, offset, length) + payload)
        return self.handle

    def reply(self, handle: int, read_length: int = 0) -> bytes:
        magic, error, got = struct.unpack(">IIQ", self.recv(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        assert got == handle
        if error:
            raise NbdError(error)
        return self.recv(read_length) if read_length else b""

    def read(self, offset: int, length: int) -> bytes:
        return self.reply(self.send_request(CMD_READ, offset, length), length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self.reply(self.send_request(CMD_WRITE, offset, len(data), FLAG_FUA if fua else 0, data))

    def flush(self) -> None:
        self.reply(self.send_request(CMD_FLUSH, 0, 0))

    def close(self) -> None:
        try:
            self.send_request(CMD_DISC, 0, 0)
        except OSError:
            pass
        self.sock.close()
