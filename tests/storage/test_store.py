"""The block store without NBD: maps, versioning, reference counts, checksums."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenswap.storage.blockmap import ClusterHashMap, DeltaMap, GuardedPageTable
from xenswap.storage.store import CorruptBlock, InUse, StorageError, Store

from .conftest import GOLDEN_SIZE, run

BS = 4096
ops = st.lists(
    st.tuples(st.booleans(), st.one_of(st.integers(0, 5000), st.integers(0, 1 << 44)), st.integers(1, 1 << 31)),
    max_size=300,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_maps_agree_with_a_dict(operations: list[tuple[bool, int, int]]) -> None:
    maps = [ClusterHashMap(), GuardedPageTable(), DeltaMap(switch_clusters=4)]
    reference: dict[int, tuple[int, int, int]] = {}
    for is_set, vba, value in operations:
        for m in maps:
            if is_set:
                m.set(vba, value, value ^ 0x5555, value * 3)
            else:
                m.delete(vba)
        if is_set:
            reference[vba] = (value, value ^ 0x5555, value * 3)
        else:
            reference.pop(vba, None)
    for m in maps:
        for vba, entry in reference.items():
            assert m.get(vba) == entry
        assert m.get((1 << 45) + 7) is None
    assert [v for v, _ in maps[2].entries()] == sorted(reference)


def test_delta_switches_to_guarded_page_table_and_guards_keep_it_shallow() -> None:
    delta = DeltaMap(switch_clusters=64)
    for vba in range(0, 100 * 16, 3):
        delta.set(vba, 1, vba, vba)
    assert delta.kind == "gpt"
    assert all(delta.get(vba) == (1, vba, vba) for vba in range(0, 1600, 3))
    assert delta.get(1) is None
    gpt = delta.table
    assert isinstance(gpt, GuardedPageTable)
    gpt.set(1 << 40, 2, 2, 2)  # far away: a guard, not 6 new levels of single-child nodes
    assert gpt.depth() <= 3
    # Dense deltas cost about 16 bytes a block.
    dense = GuardedPageTable()
    for vba in range(1 << 16):
        dense.set(vba, 1, 0, vba)
    assert dense.nbytes() < 20 * (1 << 16)


def test_versioning_commit_export_import_flatten(store: Store, tmp_path: Path) -> None:
    store.branch("vm", "base")
    disk = store.open("vm")
    disk.write(0, b"A" * BS)
    disk.write(10 * BS + 100, b"B" * 50)  # unaligned: read-modify-write
    disk.write_zeroes(20 * BS, 3 * BS)
    disk.close()
    store.snapshot("vm", "s1")
    disk = store.open("vm")
    disk.write(BS, b"C" * BS)
    assert disk.locate(0)[0] == 1 and disk.locate(1)[0] == 2 and disk.locate(5)[0] == 0
    disk.close()
    # Export only what changed since the snapshot; import it on the snapshot elsewhere.
    delta = tmp_path / "vm.delta"
    assert store.export_delta("vm", str(delta), "active") == 1
    store.import_delta(str(delta), "copy", "s1")
    copy = store.open("copy")
    assert copy.read(0, BS) == b"A" * BS and copy.read(BS, BS) == b"C" * BS
    assert copy.read(10 * BS + 100, 50) == b"B" * 50 and copy.read(10 * BS, 100) == b"\x5a" * 100
    assert copy.read(20 * BS, 3 * BS) == bytes(3 * BS)
    copy.close()
    # A whole-disk delta imports onto the golden image.
    full = tmp_path / "vm-all.delta"
    store.export_delta("vm", str(full), "all")
    store.import_delta(str(full), "copy2", "base")
    store.commit("vm")
    flat_a, flat_b = tmp_path / "a.raw", tmp_path / "b.raw"
    store.flatten("vm", str(flat_a))
    store.flatten("copy2", str(flat_b))
    assert flat_a.read_bytes() == flat_b.read_bytes()
    assert flat_a.stat().st_size == GOLDEN_SIZE
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(flat_a), str(flat_b))
    # A damaged delta file is refused with a clear error.
    raw = bytearray(delta.read_bytes())
    raw[-100] ^= 0xFF
    delta.write_bytes(bytes(raw))
    with pytest.raises(CorruptBlock, match="damaged"):
        store.import_delta(str(delta), "copy3", "s1")
    assert store.find("copy3") is None


def test_reference_counts_and_rm(store: Store) -> None:
    store.branch("vm", "base")
    disk = store.open("vm")
    disk.write(0, b"D" * BS)
    disk.close()
    store.snapshot("vm", "snap")
    store.branch("child", "snap")
    with pytest.raises(InUse, match="used by"):
        store.remove("base")
    with pytest.raises(StorageError, match="live disk"):
        store.branch("x", "vm")
    # Removing the snapshot and its origin keeps the data the child still shares.
    store.remove("snap")
    store.remove("vm")
    child = store.open("child")
    assert child.read(0, BS) == b"D" * BS
    child.close()
    files_before = set((store.root / "data").glob("*.blk"))
    store.remove("child")
    assert not set((store.root / "data").glob("*.blk")) & files_before
    store.remove("base")
    assert store.list() == []


def test_open_disk_is_locked_against_cli_changes(store: Store) -> None:
    store.branch("vm", "base")
    disk = store.open("vm")
    store.CLOSE_GRACE_SECONDS = 0.2  # a CLI command waits this long for a closing server, then refuses
    with pytest.raises(InUse, match="disconnect"):
        store.snapshot("vm", "s")
    disk.close()
    store.snapshot("vm", "s")


def test_checksums_catch_damaged_data_and_golden(store: Store) -> None:
    store.branch("vm", "base")
    disk = store.open("vm")
    disk.write(0, random.Random(1).randbytes(BS))
    disk.close()
    data_file = next((store.root / "data").glob("*.blk"))
    with open(data_file, "r+b") as f:
        f.seek(17)
        f.write(b"\xff")
    disk = store.open("vm")
    with pytest.raises(CorruptBlock, match="checksum mismatch"):
        disk.read(0, 512)
    assert disk.read(BS, BS) == b"\x5a" * BS  # the rest of the disk still reads
    disk.close()
    golden = store.golden_path("base")
    golden.chmod(0o644)
    with open(golden, "r+b") as f:
        f.seek(5 * BS)
        f.write(b"\x00")
    disk = store.open("vm")
    with pytest.raises(CorruptBlock, match="golden image 'base': block 5"):
        disk.read(5 * BS, BS)
    disk.close()


def test_lookup_cost_does_not_grow_with_snapshot_depth(store: Store) -> None:
    """Time the same random reads on a disk with 1 and with 40 snapshots in its history."""
    store.branch("shallow", "base")
    store.branch("deep", "base")
    rng = random.Random(3)
    for name, depth in (("shallow", 1), ("deep", 40)):
        for gen in range(depth):
            disk = store.open(name)
            for _ in range(8):
                disk.write(rng.randrange(GOLDEN_SIZE // BS) * BS, rng.randbytes(BS))
            disk.close()
            store.snapshot(name, f"{name}-{gen}")
    offsets = [rng.randrange(GOLDEN_SIZE // BS) * BS for _ in range(2000)]
    disks = {name: store.open(name) for name in ("shallow", "deep")}
    assert disks["deep"].locate(offsets[0] // BS)[0] in (0, 1)  # never deeper than base, whatever the history
    # Best of 5 alternating trials each, so a burst of load from elsewhere does not decide the outcome.
    timings = {"shallow": float("inf"), "deep": float("inf")}
    for _ in range(5):
        for name, disk in disks.items():
            start = time.perf_counter()
            for off in offsets:
                disk.read(off, BS)
            timings[name] = min(timings[name], time.perf_counter() - start)
    for disk in disks.values():
        disk.close()
    assert timings["deep"] < 1.4 * timings["shallow"], timings


def test_overwrites_reuse_space_once_no_durable_map_needs_the_old_block(store: Store) -> None:
    store.branch("vm", "base")
    disk = store.open("vm")
    rng = random.Random(5)
    for round_ in range(50):
        for vba in range(16):
            disk.write(vba * BS, rng.randbytes(BS))
            disk.write(vba * BS, rng.randbytes(BS))  # rewritten before any flush: reused at once
        if round_ % 5 == 4:
            disk.flush()
    final = [disk.read(vba * BS, BS) for vba in range(16)]
    disk.close()
    data_file = store.data_path(store.get("vm").active_layer)  # type: ignore[arg-type]
    # 1600 block writes; live data is 16 blocks. Without reuse the file would hold 1600.
    assert data_file.stat().st_size <= 16 * BS * 4
    disk = store.open("vm")
    assert [disk.read(vba * BS, BS) for vba in range(16)] == final
    disk.close()


def test_compact_rewrites_in_order_frees_space_and_keeps_content(store: Store, tmp_path: Path) -> None:
    store.branch("vm", "base")
    rng = random.Random(9)
    for gen in range(3):
        disk = store.open("vm")
        for _ in range(300):
            disk.write(rng.randrange(512) * BS, rng.randbytes(BS))
        disk.write_zeroes(600 * BS, 4 * BS)
        disk.close()
        if gen == 0:
            store.snapshot("vm", "keep")  # a snapshot still needs its own blocks after the compaction
        else:
            store.commit("vm")
    before = tmp_path / "before.raw"
    store.flatten("vm", str(before))
    keep_before = tmp_path / "keep-before.raw"
    store.flatten("keep", str(keep_before))
    disk = store.open("vm", writable=False)
    runs_before = sum(1 for seg in disk._segments(0, 512) if seg[0] >= 0)  # data runs (not golden)
    disk.close()
    result = store.compact("vm")
    assert result["data_bytes_after"] < result["data_bytes_before"]
    after = tmp_path / "after.raw"
    store.flatten("vm", str(after))
    assert after.read_bytes() == before.read_bytes()
    keep_after = tmp_path / "keep-after.raw"
    store.flatten("keep", str(keep_after))
    assert keep_after.read_bytes() == keep_before.read_bytes()
    disk = store.open("vm", writable=False)
    segments = disk._segments(0, 512)
    data_runs = [seg for seg in segments if seg[0] >= 0]
    golden_runs = [seg for seg in segments if seg[0] < 0]
    # In VBA order, a data run now only ends where an unwritten (golden) block interrupts it.
    assert len(data_runs) <= len(golden_runs) + 1 < runs_before // 2
    disk.close()


def test_allocation_status_matches_content(store: Store) -> None:
    """base:allocation: everything reported hole|zero reads as zeroes; every delta block is data."""
    store.branch("vm", "base")
    disk = store.open("vm")
    half = GOLDEN_SIZE // 2
    disk.write(3 * BS, b"x" * BS)  # data over golden data
    disk.write(half + 40 * BS + 5, b"y" * 10)  # data inside the golden hole (unaligned)
    disk.write_zeroes(100 * BS, 20 * BS)  # zero entries over golden data
    extents = disk.extents(0, GOLDEN_SIZE, "base:allocation")
    assert sum(length for length, _ in extents) == GOLDEN_SIZE
    pos = 0
    for length, flags in extents:
        if flags == 3:
            assert disk.read(pos, length) == bytes(length)
        pos += length
    kinds = {}
    pos = 0
    for length, flags in extents:
        for vba in range(pos // BS, (pos + length) // BS):
            kinds[vba] = flags
        pos += length
    assert kinds[3] == 0 and kinds[(half // BS) + 40] == 0 and kinds[100] == 3 and kinds[119] == 3
    assert kinds[(half // BS) + 41] == 3  # golden hole
    # An unaligned window is clipped to exactly the request.
    window = disk.extents(BS + 7, 10 * BS, "base:allocation")
    assert sum(length for length, _ in window) == 10 * BS
    disk.close()
