"""kill -9 the server at random points while a client writes and flushes; after each restart every block
must read back as its last flushed content or a content written after that flush -- never torn, never
a checksum error, never an older version."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from pathlib import Path

from xenswap.storage.store import Store

from .conftest import Server
from .nbdclient import Client

BLOCKS = 512  # the blocks the test writes to: 2 MiB at the start of the disk
BS = 4096
KILLS = 50


def block_content(rng: random.Random, vba: int, cycle: int, seq: int) -> bytes:
    head = f"vba={vba} cycle={cycle} seq={seq} ".encode()
    return head + rng.randbytes(BS - len(head))


def test_kill9_at_random_points_loses_only_unflushed_writes(tmp_path: Path, store: Store) -> None:
    store.branch("vm", "base")
    golden = (tmp_path / "golden-src.raw").read_bytes()[: BLOCKS * BS]
    durable = {vba: golden[vba * BS : (vba + 1) * BS] for vba in range(BLOCKS)}
    rng = random.Random(4)
    flushes_acked = 0
    lost_unflushed = 0
    pending: dict[int, list[bytes]] = {}
    for cycle in range(KILLS):
        srv = Server(store.root, tmp_path / "crash.sock").start()
        try:
            client = Client(str(srv.sock), "vm")
            # What is on disk now is what survived: it must be durable or one of the writes since.
            if cycle:
                image = client.read(0, BLOCKS * BS)
                for vba in range(BLOCKS):
                    got = image[vba * BS : (vba + 1) * BS]
                    allowed = [durable[vba], *pending.get(vba, [])]
                    assert got in allowed, f"cycle {cycle}: block {vba} is neither flushed nor written: {got[:40]!r}"
                    if got != (pending.get(vba) or [durable[vba]])[-1]:
                        lost_unflushed += 1
                    durable[vba] = got
            pending = {}
            stop = threading.Event()
            acked: list[int] = []

            def writer(client: Client = client, cycle: int = cycle, pending: dict = pending,
                       stop: threading.Event = stop, acked: list[int] = acked) -> None:
                nonlocal flushes_acked
                seq = 0
                try:
                    while not stop.is_set():
                        seq += 1
                        vba = rng.randrange(BLOCKS)
                        data = block_content(rng, vba, cycle, seq)
                        pending.setdefault(vba, []).append(data)
                        fua = rng.random() < 0.05
                        client.write(vba * BS, data, fua=fua)
                        if fua:  # only this block is known durable
                            durable[vba] = data
                            pending[vba] = []
                        if rng.random() < 0.1:
                            client.flush()
                            flushes_acked += 1
                            for v, versions in pending.items():
                                if versions:
                                    durable[v] = versions[-1]
                                    versions.clear()
                        acked.append(seq)
                except (ConnectionError, OSError):
                    return  # the server was killed under us

            thread = threading.Thread(target=writer)
            thread.start()
            time.sleep(rng.uniform(0.01, 0.25))
            srv.kill9()
            stop.set()
            thread.join(10)
            client.sock.close()
            assert acked, "the writer never got going"
        finally:
            srv.stop()
    assert flushes_acked >= KILLS, "too few flushes to mean anything"
    print(f"{KILLS} kills, {flushes_acked} flushes acknowledged, {lost_unflushed} unflushed block versions lost")
    # The metadata store is intact and the disk is still fully usable.
    db = sqlite3.connect(store.root / "meta.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    store.snapshot("vm", "after-crashes")
    disk = store.open("after-crashes")
    try:
        data = disk.read(0, BLOCKS * BS)
    finally:
        disk.close()
    for vba in range(BLOCKS):
        assert data[vba * BS : (vba + 1) * BS] in [durable[vba], *pending.get(vba, [])]


def test_autoflush_bounds_what_a_crash_loses(tmp_path: Path, store: Store) -> None:
    """The client never flushes; the server's periodic flush still makes its writes survive kill -9."""
    store.branch("vm", "base")
    srv = Server(store.root, tmp_path / "af.sock", autoflush=0.2).start()
    try:
        client = Client(str(srv.sock), "vm")
        client.write(0, b"A" * BS)
        client.write(7 * BS, b"B" * BS)
        time.sleep(1.0)
        srv.kill9()
        client.sock.close()
    finally:
        srv.stop()
    srv = Server(store.root, tmp_path / "af.sock").start()
    try:
        client = Client(str(srv.sock), "vm")
        assert client.read(0, BS) == b"A" * BS and client.read(7 * BS, BS) == b"B" * BS
        client.close()
    finally:
        srv.stop()
