"""Malformed and hostile requests: each gets the protocol's error or a disconnect of that client only, while
another client keeps reading and writing the same server without a single wrong byte."""

from __future__ import annotations

import random
import socket
import struct
import threading
from pathlib import Path

import pytest

from xenswap.storage.store import Store

from .conftest import GOLDEN_SIZE, Server, run
from .nbdclient import CMD_READ, CMD_WRITE, IHAVEOPT, OPT_REPLY_MAGIC, Client, NbdError

EINVAL, EPERM, ENOSPC, EOVERFLOW = 22, 1, 28, 75


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def raw_handshake(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.recv(18)
    return sock


class Worker(threading.Thread):
    """The well-behaved client: writes a block, reads it back, over and over."""

    def __init__(self, sock: str) -> None:
        super().__init__(daemon=True)
        self.client = Client(sock, "good")
        self.stop = threading.Event()
        self.rounds = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(7)
        try:
            while not self.stop.is_set():
                offset = rng.randrange(GOLDEN_SIZE // 4096) * 4096
                data = rng.randbytes(4096)
                self.client.write(offset, data)
                assert self.client.read(offset, 4096) == data
                self.rounds += 1
        except BaseException as exc:  # reported by the test
            self.failure = exc


@pytest.fixture
def worker(server: Server, store: Store):
    worker = Worker(str(server.sock))
    worker.start()
    yield worker
    worker.stop.set()
    worker.join(10)
    worker.client.close()


@pytest.fixture(autouse=True)
def _disks(store: Store) -> None:
    store.branch("good", "base")
    store.branch("victim", "base")


def test_handshake_garbage_disconnects_only_that_client(server: Server, worker: Worker) -> None:
    path = str(server.sock)
    # Unknown client flags.
    s = raw_handshake(path)
    s.sendall(struct.pack(">I", 0xFFFF0000))
    assert closed_by_server(s)
    # Garbage instead of an option header.
    s = raw_handshake(path)
    s.sendall(struct.pack(">I", 1) + b"GARBAGE!" * 8)
    assert closed_by_server(s)
    # A 1 GiB option length.
    s = raw_handshake(path)
    s.sendall(struct.pack(">IQII", 1, IHAVEOPT, 7, 1 << 30))
    assert closed_by_server(s)
    # EXPORT_NAME of an export that does not exist: the spec says terminate.
    s = raw_handshake(path)
    s.sendall(struct.pack(">IQII", 1, IHAVEOPT, 1, 4) + b"nope")
    assert closed_by_server(s)
    # An unknown option is answered with NBD_REP_ERR_UNSUP and negotiation goes on.
    s = raw_handshake(path)
    s.sendall(struct.pack(">IQII", 1, IHAVEOPT, 4242, 3) + b"abc")
    magic, opt, rtype, length = struct.unpack(">QIII", s.recv(20))
    assert (magic, opt, rtype) == (OPT_REPLY_MAGIC, 4242, (1 << 31) + 1)
    s.recv(length)
    s.sendall(struct.pack(">QII", IHAVEOPT, 2, 0))  # ABORT
    assert struct.unpack(">QIII", s.recv(20))[2] == 1
    s.close()
    # Random bytes, many times.
    rng = random.Random(1)
    for _ in range(30):
        s = raw_handshake(path)
        s.sendall(rng.randbytes(rng.randrange(1, 200)))
        s.shutdown(socket.SHUT_WR)
        assert closed_by_server(s)
        s.close()
    assert worker.failure is None and worker.rounds > 0


def test_bad_transmission_requests(server: Server, worker: Worker, store: Store, tmp_path: Path) -> None:
    path = str(server.sock)
    bad = Client(path, "victim")
    size = bad.size
    before = worker.rounds

    def expect_error(errno: int, cmd: int, offset: int, length: int, flags: int = 0, payload: bytes = b"") -> None:
        handle = bad.send_request(cmd, offset, length, flags, payload)
        with pytest.raises(NbdError) as info:
            bad.reply(handle)
        assert info.value.errno == errno

    expect_error(EINVAL, CMD_READ, size - 4096, 8192)  # read past the end
    expect_error(EINVAL, CMD_READ, 1 << 62, 512)  # far past the end
    expect_error(ENOSPC, CMD_WRITE, size, 4096, payload=bytes(4096))  # write past the end (payload consumed)
    expect_error(EOVERFLOW, CMD_READ, 0, 64 << 20)  # oversize read
    expect_error(EINVAL, 99, 0, 0)  # unknown command
    expect_error(EINVAL, CMD_READ, 0, 4096, flags=0x80)  # unknown flag
    expect_error(EINVAL, 7, 0, 4096)  # block status without a negotiated context
    # After all that, the same connection still works.
    bad.write(8192, b"x" * 4096)
    assert bad.read(8192, 4096) == b"x" * 4096
    # A bad magic makes the stream untrustworthy: disconnect.
    bad.send_request(CMD_READ, 0, 4096, magic=0xDEADBEEF)
    assert closed_by_server(bad.sock)
    # An oversize write: error reply, then disconnect (we will not swallow 1 GiB).
    bad = Client(path, "victim")
    handle = bad.send_request(CMD_WRITE, 0, 1 << 30)
    with pytest.raises(NbdError) as info:
        bad.reply(handle)
    assert info.value.errno == EOVERFLOW
    assert closed_by_server(bad.sock)
    # Writes to a read-only export: EPERM.
    ro = Client(path, "base")
    handle = ro.send_request(CMD_WRITE, 0, 4096, payload=bytes(4096))
    with pytest.raises(NbdError) as info:
        ro.reply(handle)
    assert info.value.errno == EPERM
    ro.close()
    # A connection dropped in the middle of a write payload.
    half = Client(path, "victim")
    half.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, 1, 0, 8192) + b"y" * 100)
    half.sock.close()
    # Random request headers after a good handshake.
    rng = random.Random(2)
    for _ in range(20):
        fuzz = Client(path, "victim")
        fuzz.sock.sendall(rng.randbytes(rng.randrange(28, 300)))
        fuzz.sock.shutdown(socket.SHUT_WR)
        closed_by_server(fuzz.sock)
        fuzz.sock.close()
    assert server.proc.poll() is None, "the server died"
    assert worker.failure is None
    assert wait_rounds(worker, before + 20)
    # The victim disk holds exactly what was written to it properly, and the golden image is intact.
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x78 8192 4096", "-c", "read -P 0x5a 0 8192",
        server.uri("victim"))
    src = tmp_path / "golden-src.raw"
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), server.uri("base"))


def wait_rounds(worker: Worker, target: int) -> bool:
    import time

    end = time.monotonic() + 10
    while time.monotonic() < end:
        if worker.rounds >= target or worker.failure is not None:
            break
        time.sleep(0.01)
    return worker.rounds >= target
