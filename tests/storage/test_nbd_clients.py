"""The NBD server against real clients: qemu-img, qemu-io (QEMU's nbd driver), nbdinfo and nbdcopy (libnbd)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from xenswap.storage.store import Store

from .conftest import GOLDEN_SIZE, Server, free_port, run

HALF = GOLDEN_SIZE // 2


def test_branch_reads_golden_and_keeps_its_own_writes(server: Server, store: Store, tmp_path: Path) -> None:
    store.branch("vm1", "base")
    store.branch("vm2", "base")
    uri = server.uri("vm1")
    run("qemu-io", "-f", "raw", "-c", "write -P 0xa1 1M 64k", "-c", "write -P 0xa2 9M 5000", "-c", "flush", uri)
    out = run("qemu-io", "-f", "raw", "-c", "read -P 0xa1 1M 64k", "-c", "read -P 0xa2 9M 5000",
              "-c", "read -P 0x5a 0 1M", "-c", f"read -P 0 {HALF + (3 << 20)} 1M", uri).stdout
    assert "Pattern verification failed" not in out
    # The sibling branch and the golden image are untouched.
    for other in ("vm2", "base"):
        out = run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 1M 64k", server.uri(other)).stdout
        assert "Pattern verification failed" not in out


def test_qemu_img_convert_compare_and_map(server: Server, store: Store, tmp_path: Path, golden_image: Path) -> None:
    store.branch("vm", "base")
    uri = server.uri("vm")
    # Golden export is byte-identical to the image it was made from.
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(golden_image), server.uri("base"))
    # Write a qcow2's content into the branch with qemu-img convert, then compare.
    src = tmp_path / "src.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(src), str(GOLDEN_SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 2M", "-c", f"write -P 0x44 {HALF} 1M", str(src))
    run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(src), uri)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), uri)
    # Allocation through base:allocation: written data, zero runs as holes.
    layout = json.loads(run("qemu-img", "map", "-f", "raw", "--output=json", uri).stdout)
    zero_ranges = [(e["start"], e["length"]) for e in layout if e["zero"]]
    data_ranges = [(e["start"], e["length"]) for e in layout if e["data"]]
    assert any(start <= HALF and start + ln >= HALF for start, ln in data_ranges)
    assert any(start >= HALF + (1 << 20) for start, _ in zero_ranges)
    # Flatten (V2P) gives the same bytes.
    server.stop()
    flat = tmp_path / "flat.raw"
    store.flatten("vm", str(flat))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), str(flat))


def test_nbdinfo_list_and_maps(server: Server, store: Store) -> None:
    store.branch("vm", "base")
    run("qemu-io", "-f", "raw", "-c", "write -P 1 4M 8k", "-c", "write -z 0 1M", server.uri("vm"))
    listing = json.loads(run("nbdinfo", "--list", "--json", server.uri("")).stdout)
    names = {e["export-name"]: e for e in listing["exports"]}
    assert set(names) == {"base", "vm"}
    assert names["base"]["is_read_only"] and not names["vm"]["is_read_only"]
    assert "base:allocation" in names["vm"]["contexts"]
    alloc = json.loads(run("nbdinfo", "--map", "--json", server.uri("vm")).stdout)
    assert alloc[0]["offset"] == 0 and alloc[0]["length"] == 1 << 20 and alloc[0]["type"] == 3  # hole+zero
    layers = json.loads(run("nbdinfo", "--map=xenswap:layer", "--json", server.uri("vm")).stdout)
    active = [(e["offset"], e["length"]) for e in layers if e["type"] == 2]
    assert active == [(0, 1 << 20), (4 << 20, 8192)]


def test_nbdcopy_round_trip_and_read_only_golden(server: Server, store: Store, tmp_path: Path) -> None:
    store.branch("vm", "base")
    payload = tmp_path / "payload.raw"
    run("qemu-img", "create", "-f", "raw", str(payload), str(GOLDEN_SIZE))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 3M 3M", str(payload))
    run("nbdcopy", str(payload), server.uri("vm"))
    back = tmp_path / "back.raw"
    run("nbdcopy", server.uri("vm"), str(back))
    assert back.read_bytes() == payload.read_bytes()
    # Writes to the golden image are refused by the server, not just by the client's flag.
    proc = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", server.uri("base"), check=False)
    assert proc.returncode != 0 or "failed" in proc.stdout + proc.stderr


def test_snapshot_chain_branches_and_tcp(tmp_path: Path, store: Store) -> None:
    store.branch("vm", "base")
    port = free_port()
    srv = Server(store.root, tmp_path / "tcp.sock", tcp_port=port).start()
    try:
        tcp_uri = f"nbd://127.0.0.1:{port}/vm"
        for gen in range(6):
            run("qemu-io", "-f", "raw", "-c", f"write -P {0x10 + gen} {gen}M 64k", tcp_uri)
            # Nobody is connected between clients, so the CLI can snapshot under a running server.
            store.snapshot("vm", f"gen{gen}")
        store.branch("old", "gen2")
        out = run("qemu-io", "-f", "raw", "-c", "read -P 0x10 0 64k", "-c", "read -P 0x12 2M 64k",
                  "-c", "read -P 0x5a 3M 64k", srv.uri("old")).stdout
        assert "Pattern verification failed" not in out
        out = run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x15 5M 64k", "-c", "read -P 0x14 4M 64k",
                  srv.uri("gen5")).stdout
        assert "Pattern verification failed" not in out
    finally:
        srv.stop()
    # Six generations deep, the disk still reads through exactly one base map.
    disk = store.open("vm")
    try:
        assert disk.locate((5 << 20) // 4096)[0] == 1
        assert disk.locate((8 << 20) // 4096)[0] == 0
    finally:
        disk.close()


def test_many_clients_at_once(server: Server, store: Store) -> None:
    for i in range(6):
        store.branch(f"vm{i}", "base")
    procs = [
        subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P {0x20 + i} 0 2M", "-c", f"read -P {0x20 + i} 0 2M",
                          "-c", "read -P 0x5a 4M 2M", server.uri(f"vm{i}")], stdout=subprocess.PIPE, text=True)
        for i in range(6)
    ]
    # Plus two readers sharing one export (multi-conn).
    procs += [subprocess.Popen(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 0 4M", server.uri("base")],
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0 and "Pattern verification failed" not in out
