"""The branching block store: golden images, disks (branches), snapshots, and their deltas.

Layout of a store directory (``state_dir()/storage`` unless ``--store DIR``)::

    meta.sqlite3        images, disks, snapshots, layers, cluster maps (WAL, synchronous=FULL)
    golden/NAME.raw     a golden image: read-only, linear (VBA = offset), no map at all
    golden/NAME.sum     per block: CRC32 (u32) -- detects a golden image changed under us
    data/ID.blk         append-only data of the active layer ID (block i at offset i * block_size)
    locks/NAME.lock     held by a server while it has the disk open read-write

Every object shares one name space: an export name is an object name. A disk reads through at most three
levels: its active delta (read-write), its base delta (the migration delta: read-only, the flattened state
at the last snapshot/commit, possibly shared with snapshots and other disks), then the golden image.
Taking a snapshot flattens base + active into a new frozen layer, so lookup cost never grows with history.

Crash safety: written blocks go to the active data file first; their map entries reach sqlite only at a
flush (or FUA write, or close), after the data file is fsynced, in one transaction. A kill at any point
leaves either the old or the new map entry, each pointing at data that was durable before it; blocks
written since the last flush may be lost but are never torn. Every block carries a CRC32 checked on read.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import os
import re
import sqlite3
import struct
import subprocess
import threading
import time
import weakref
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from xenswap.config import state_dir
from xenswap.errors import XenswapError
from xenswap.sqlite_tx import rollback
from xenswap.storage.blockmap import (
    CLUSTER_BLOCKS,
    CLUSTER_MASK,
    CLUSTER_SHIFT,
    ENTRY,
    ENTRY_SIZE,
    ZERO_FILE,
    DeltaMap,
)

DEFAULT_BLOCK_SIZE = 4096
GOLDEN = -1  # segment kind: read from the golden image
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DELTA_MAGIC = b"XSDELTA1"
DELTA_RECORD = struct.Struct("<QII")  # vba, kind (0 data, 1 zero), crc32

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('golden', 'disk', 'snapshot')),
    golden TEXT NOT NULL,
    parent TEXT,
    base_layer INTEGER,
    active_layer INTEGER,
    size INTEGER NOT NULL,
    block_size INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS layers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL CHECK (state IN ('active', 'frozen')),
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS clusters (
    layer INTEGER NOT NULL,
    cidx INTEGER NOT NULL,
    entries BLOB NOT NULL,
    PRIMARY KEY (layer, cidx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS layer_files (
    layer INTEGER NOT NULL,
    file INTEGER NOT NULL,
    PRIMARY KEY (layer, file)
) WITHOUT ROWID;
"""


class StorageError(XenswapError):
    """A storage operation the user asked for cannot be done as asked."""


class CorruptBlock(StorageError):
    """A block's checksum does not match: the data file or golden image was damaged."""


class InUse(StorageError):
    pass


@dataclass
class ObjectInfo:
    name: str
    kind: str
    golden: str
    parent: str | None
    base_layer: int | None
    active_layer: int | None
    size: int
    block_size: int
    created: float

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name, "kind": self.kind, "golden": self.golden, "parent": self.parent,
            "size": self.size, "block_size": self.block_size, "created": self.created,
            "read_only": self.kind != "disk",
        }


@dataclass
class FlushJob:
    """A consistent snapshot of a disk's dirty map clusters, taken on the owner's thread, persisted by the
    store's flush thread."""

    disk: Disk
    fd: int
    layer: int
    rows: list[tuple[int, int, bytes]]
    gone: list[tuple[int, int]]
    freed_after: list[int]  # data-file blocks that become reusable once this flush has committed


def _check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise StorageError(f"bad name {name!r}: use 1-64 letters, digits, '.', '_' or '-', not starting with a symbol")


class GoldenSums:
    """Per-block CRC32s of a golden image (shared by every open disk on it)."""

    def __init__(self, path: Path, block_size: int) -> None:
        self.sums = array("I")
        with open(path.with_suffix(".sum"), "rb") as f:
            self.sums.frombytes(f.read())
        self.verified = bytearray(len(self.sums))


class Golden:
    """A golden image opened for reading, with its per-block checksums."""

    def __init__(self, path: Path, block_size: int, sums: GoldenSums) -> None:
        self.path = path
        self.block_size = block_size
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.shared_sums = sums
        self.sums = sums.sums

    def close(self) -> None:
        os.close(self.fd)


def _write_golden_sums(path: Path, block_size: int) -> None:
    sums = array("I")
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block_size * 256)
            if not chunk:
                break
            for off in range(0, len(chunk), block_size):
                sums.append(zlib.crc32(chunk[off : off + block_size]))
    tmp = path.with_suffix(".sum.tmp")
    with open(tmp, "wb") as f:
        f.write(sums.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path.with_suffix(".sum"))


class Store:
    def __init__(self, root: Path | str | None = None, switch_clusters: int = 4096) -> None:
        self.root = Path(root) if root is not None else state_dir() / "storage"
        self.switch_clusters = switch_clusters
        for sub in ("golden", "data", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / "meta.sqlite3", isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        # Frozen layers never change, so disks on the same snapshot share one map object (and goldens
        # their checksum tables): per-disk lookup memory is the active delta only.
        self._frozen_maps: weakref.WeakValueDictionary[int, DeltaMap] = weakref.WeakValueDictionary()
        # Flushes are persisted by one worker thread with its own sqlite connection, strictly in the order
        # they were taken: an older map snapshot can never be committed after a newer one, and the event
        # loop of a server keeps serving other clients while a flush waits for fsync.
        self._flusher: concurrent.futures.ThreadPoolExecutor | None = None
        self._flusher_db = threading.local()
        self._goldens: weakref.WeakValueDictionary[str, GoldenSums] = weakref.WeakValueDictionary()

    def close(self) -> None:
        if self._flusher is not None:
            self._flusher.shutdown(wait=True)
            self._flusher = None
        self.db.close()

    def submit_flush(self, job: FlushJob) -> concurrent.futures.Future[None]:
        if self._flusher is None:
            self._flusher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="xenswap-flush")
        return self._flusher.submit(self._persist, job)

    def _persist(self, job: FlushJob) -> None:
        """In the flush thread: data first (fsync), then the map clusters in one transaction."""
        db = getattr(self._flusher_db, "db", None)
        if db is None:
            db = self._flusher_db.db = sqlite3.connect(self.root / "meta.sqlite3", isolation_level=None,
                                                       timeout=30, check_same_thread=False)
            db.execute("PRAGMA synchronous=FULL")
        if job.disk.broken is not None:
            raise StorageError(f"{job.disk.name}: an earlier flush failed ({job.disk.broken}); reopen the disk")
        try:
            if not job.rows and not job.gone:
                return  # nothing new: FIFO order alone guarantees earlier flushes are done
            os.fsync(job.fd)
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR REPLACE INTO clusters (layer, cidx, entries) VALUES (?, ?, ?)", job.rows)
                db.executemany("DELETE FROM clusters WHERE layer = ? AND cidx = ?", job.gone)
                db.execute("INSERT OR IGNORE INTO layer_files (layer, file) VALUES (?, ?)", (job.layer, job.layer))
                db.execute("COMMIT")
            except BaseException:
                rollback(db)
                raise
        except BaseException as exc:
            # Like a database after a failed fsync: nothing after this point can be promised durable.
            job.disk.broken = exc
            raise

    # -- objects ---------------------------------------------------------------------------------------
    def get(self, name: str) -> ObjectInfo:
        row = self.db.execute(
            "SELECT name, kind, golden, parent, base_layer, active_layer, size, block_size, created "
            "FROM objects WHERE name = ?", (name,),
        ).fetchone()
        if row is None:
            known = [r[0] for r in self.db.execute("SELECT name FROM objects ORDER BY name LIMIT 20")]
            hint = f" (known: {', '.join(known)})" if known else " (the store is empty)"
            raise StorageError(f"no image, disk or snapshot named {name!r}{hint}")
        return ObjectInfo(*row)

    def find(self, name: str) -> ObjectInfo | None:
        try:
            return self.get(name)
        except StorageError:
            return None

    def list(self) -> list[ObjectInfo]:
        rows = self.db.execute(
            "SELECT name, kind, golden, parent, base_layer, active_layer, size, block_size, created "
            "FROM objects ORDER BY created, name"
        )
        return [ObjectInfo(*r) for r in rows]

    def _new_name(self, name: str) -> None:
        _check_name(name)
        if self.find(name) is not None:
            raise StorageError(f"{name!r} already exists (pick another name or `xenswap disk rm {name}`)")

    def golden_path(self, name: str) -> Path:
        return self.root / "golden" / f"{name}.raw"

    def data_path(self, file_id: int) -> Path:
        return self.root / "data" / f"{file_id}.blk"

    def create_golden(
        self, name: str, source: str | None = None, size: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> ObjectInfo:
        """A golden image from an image file (any format qemu-img reads: raw, qcow2, ...) or an empty one."""
        self._new_name(name)
        if block_size < 512 or block_size & (block_size - 1):
            raise StorageError(f"block size {block_size} must be a power of two >= 512")
        path = self.golden_path(name)
        tmp = path.with_suffix(".raw.tmp")
        if source is not None:
            if not Path(source).exists():
                raise StorageError(f"source image {source} does not exist")
            proc = subprocess.run(
                ["qemu-img", "convert", "-O", "raw", source, str(tmp)], capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise StorageError(f"qemu-img convert {source} failed: {proc.stderr.strip()}")
        elif size is not None:
            with open(tmp, "wb") as f:
                f.truncate(size)
        else:
            raise StorageError("a golden image needs --from IMAGE or --size BYTES")
        raw_size = tmp.stat().st_size
        padded = -(-raw_size // block_size) * block_size
        if padded != raw_size:
            os.truncate(tmp, padded)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o444)
        os.replace(tmp, path)
        _write_golden_sums(path, block_size)
        self.db.execute(
            "INSERT INTO objects (name, kind, golden, parent, size, block_size, created) "
            "VALUES (?, 'golden', ?, NULL, ?, ?, ?)",
            (name, name, padded, block_size, time.time()),
        )
        return self.get(name)

    def _new_layer(self, state: str) -> int:
        cur = self.db.execute("INSERT INTO layers (state, created) VALUES (?, ?)", (state, time.time()))
        return int(cur.lastrowid)  # type: ignore[arg-type]

    def branch(self, name: str, source: str) -> ObjectInfo:
        """A new read-write disk on a golden image or a snapshot: shares all of it, stores only its changes."""
        self._new_name(name)
        src = self.get(source)
        if src.kind == "disk":
            raise StorageError(f"{source!r} is a live disk: snapshot it first (`xenswap disk snapshot {source} SNAP`)")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            active = self._new_layer("active")
            self.db.execute(
                "INSERT INTO objects (name, kind, golden, parent, base_layer, active_layer, size, block_size, "
                "created) VALUES (?, 'disk', ?, ?, ?, ?, ?, ?, ?)",
                (name, src.golden, source, src.base_layer, active, src.size, src.block_size, time.time()),
            )
            self.db.execute("COMMIT")
        except BaseException:
            rollback(self.db)
            raise
        return self.get(name)

    # -- maps ------------------------------------------------------------------------------------------
    def load_map(self, layer: int | None) -> DeltaMap:
        delta = DeltaMap(self.switch_clusters)
        if layer is None:
            return delta
        for cidx, blob in self.db.execute("SELECT cidx, entries FROM clusters WHERE layer = ?", (layer,)):
            delta.put_cluster(cidx, blob)
        return delta

    def shared_frozen_map(self, layer: int | None) -> DeltaMap:
        if layer is None:
            return DeltaMap(self.switch_clusters)
        delta = self._frozen_maps.get(layer)
        if delta is None:
            delta = self._frozen_maps[layer] = self.load_map(layer)
        return delta

    def golden_sums(self, name: str, block_size: int) -> GoldenSums:
        sums = self._goldens.get(name)
        if sums is None:
            sums = self._goldens[name] = GoldenSums(self.golden_path(name), block_size)
        return sums

    def _save_frozen(self, delta: DeltaMap, layer: int | None = None) -> int:
        """Write a whole map as a new frozen layer (inside the caller's transaction)."""
        if layer is None:
            layer = self._new_layer("frozen")
        files: set[int] = set()
        rows = []
        for cidx in delta.cluster_indexes():
            blob = delta.cluster_blob(cidx)
            if blob is None:
                continue
            rows.append((layer, cidx, blob))
            for i in range(CLUSTER_BLOCKS):
                file_id = ENTRY.unpack_from(blob, i * ENTRY_SIZE)[0]
                if file_id and file_id != ZERO_FILE:
                    files.add(file_id)
        self.db.executemany("INSERT INTO clusters (layer, cidx, entries) VALUES (?, ?, ?)", rows)
        self.db.executemany("INSERT INTO layer_files (layer, file) VALUES (?, ?)", [(layer, f) for f in files])
        return layer

    # A server closes a disk (flush, then unlock) just after its last client disconnects: a command run right
    # after that client exits waits this long for the lock instead of failing on the server's tail end.
    CLOSE_GRACE_SECONDS = 5.0

    def lock_disk(self, name: str, grace: float | None = None) -> int:
        """An exclusive lock on a disk: a server holds it while it has the disk open read-write. Waits up to
        ``grace`` seconds (default CLOSE_GRACE_SECONDS) for a closing server to let go."""
        deadline = time.monotonic() + (self.CLOSE_GRACE_SECONDS if grace is None else grace)
        fd = os.open(self.root / "locks" / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(fd)
                raise InUse(
                    f"disk {name!r} is open in a running `xenswap disk serve` (a client is connected); "
                    "disconnect its clients first"
                ) from None

    def _freeze_disk(self, info: ObjectInfo) -> int:
        """Flatten base + active of a disk into a new frozen layer; the disk continues on it with an empty
        active layer. Returns the frozen layer. Runs in one transaction: a crash leaves the old or new state."""
        base = self.load_map(info.base_layer)
        base.overlay(self.load_map(info.active_layer))
        self.db.execute("BEGIN IMMEDIATE")
        try:
            frozen = self._save_frozen(base)
            active = self._new_layer("active")
            self.db.execute(
                "UPDATE objects SET base_layer = ?, active_layer = ? WHERE name = ?", (frozen, active, info.name)
            )
            self._gc()
            self.db.execute("COMMIT")
        except BaseException:
            rollback(self.db)
            raise
        self._unlink_dead_files()
        return frozen

    def snapshot(self, disk: str, name: str) -> ObjectInfo:
        """Freeze a disk's current contents as a read-only snapshot (itself exportable and branchable)."""
        self._new_name(name)
        info = self.get(disk)
        if info.kind != "disk":
            raise StorageError(f"{disk!r} is a {info.kind}, already read-only: branch from it instead")
        lock = self.lock_disk(disk)
        try:
            frozen = self._freeze_disk(info)
            self.db.execute(
                "INSERT INTO objects (name, kind, golden, parent, base_layer, active_layer, size, block_size, "
                "created) VALUES (?, 'snapshot', ?, ?, ?, NULL, ?, ?, ?)",
                (name, info.golden, disk, frozen, info.size, info.block_size, time.time()),
            )
        finally:
            os.close(lock)
        return self.get(name)

    def commit(self, disk: str) -> ObjectInfo:
        """Fold the active delta into the base (migration) delta: done at migration time."""
        info = self.get(disk)
        if info.kind != "disk":
            raise StorageError(f"{disk!r} is a {info.kind}: only disks have an active delta to commit")
        lock = self.lock_disk(disk)
        try:
            self._freeze_disk(info)
        finally:
            os.close(lock)
        return self.get(disk)

    def compact(self, disk: str) -> dict[str, int]:
        """Fold the active delta into the base like ``commit``, and also copy every block the disk maps into
        one new data file in VBA order: sequential reads become sequential again and blocks nobody else
        references are freed. Snapshots keep their own layers (and the files those still need)."""
        info = self.get(disk)
        if info.kind != "disk":
            raise StorageError(f"{disk!r} is a {info.kind}: only disks can be compacted")
        lock = self.lock_disk(disk)
        try:
            before = self._data_bytes()
            merged = self.load_map(info.base_layer)
            merged.overlay(self.load_map(info.active_layer))
            # Copy into a ".part" file no clean-up touches; it gets its layer's name inside the transaction that
            # makes the layer, so a crash leaves either the old disk or the new one (plus, at worst, an orphan
            # file that the next clean-up deletes).
            part = self.root / "data" / f"compact-{disk}.part"
            placed: list[tuple[int, int, int]] = []  # (vba, crc, index in the new file); index -1: zero block
            reader = Disk(self, info, writable=False)
            count = 0
            try:
                with open(part, "wb") as out:
                    for vba, (file_id, crc, index) in merged.entries():
                        if file_id == ZERO_FILE:
                            placed.append((vba, 0, -1))
                            continue
                        out.write(reader.read_entry(file_id, crc, index))  # checksum-verified copy
                        placed.append((vba, crc, count))
                        count += 1
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                reader.close()
            self.db.execute("BEGIN IMMEDIATE")
            try:
                layer = self._new_layer("frozen")
                compacted = DeltaMap(self.switch_clusters)
                for vba, crc, index in placed:
                    if index < 0:
                        compacted.set(vba, ZERO_FILE, 0, 0)
                    else:
                        compacted.set(vba, layer, crc, index)
                self._save_frozen(compacted, layer)
                active = self._new_layer("active")
                self.db.execute("UPDATE objects SET base_layer = ?, active_layer = ? WHERE name = ?",
                                (layer, active, disk))
                self._gc()
                os.replace(part, self.data_path(layer))
                self.db.execute("COMMIT")
            except BaseException:
                rollback(self.db)
                part.unlink(missing_ok=True)
                raise
            self._unlink_dead_files()
            return {"blocks": count, "data_bytes_before": before, "data_bytes_after": self._data_bytes()}
        finally:
            os.close(lock)

    def _data_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "data").glob("*.blk"))

    def remove(self, name: str) -> None:
        info = self.get(name)
        if info.kind == "golden":
            users = [r[0] for r in self.db.execute(
                "SELECT name FROM objects WHERE golden = ? AND name != ? ORDER BY name", (name, name))]
            if users:
                raise InUse(f"golden image {name!r} is used by {', '.join(users)}: remove those first")
        lock = self.lock_disk(name) if info.kind == "disk" else None
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("DELETE FROM objects WHERE name = ?", (name,))
                self.db.execute("UPDATE objects SET parent = NULL WHERE parent = ?", (name,))
                self._gc()
                self.db.execute("COMMIT")
            except BaseException:
                rollback(self.db)
                raise
        finally:
            if lock is not None:
                os.close(lock)
                (self.root / "locks" / f"{name}.lock").unlink(missing_ok=True)
        if info.kind == "golden":
            self.golden_path(name).unlink(missing_ok=True)
            self.golden_path(name).with_suffix(".sum").unlink(missing_ok=True)
        self._unlink_dead_files()

    def _gc(self) -> None:
        """Drop layers no object references (reference counts are the references themselves)."""
        self.db.execute(
            "DELETE FROM layers WHERE id NOT IN (SELECT base_layer FROM objects WHERE base_layer IS NOT NULL) "
            "AND id NOT IN (SELECT active_layer FROM objects WHERE active_layer IS NOT NULL)"
        )
        self.db.execute("DELETE FROM clusters WHERE layer NOT IN (SELECT id FROM layers)")
        self.db.execute("DELETE FROM layer_files WHERE layer NOT IN (SELECT id FROM layers)")

    def _unlink_dead_files(self) -> None:
        """Delete data files no layer maps into and no live active layer appends to."""
        live = {r[0] for r in self.db.execute("SELECT file FROM layer_files")}
        live |= {r[0] for r in self.db.execute("SELECT id FROM layers WHERE state = 'active'")}
        for path in (self.root / "data").glob("*.blk"):
            if path.stem.isdigit() and int(path.stem) not in live:
                path.unlink(missing_ok=True)

    # -- usage -------------------------------------------------------------------------------------------
    def usage(self, name: str) -> dict[str, int]:
        info = self.get(name)
        out = {"base_clusters": 0, "active_clusters": 0}
        for key, layer in (("base_clusters", info.base_layer), ("active_clusters", info.active_layer)):
            if layer is not None:
                out[key] = self.db.execute("SELECT count(*) FROM clusters WHERE layer = ?", (layer,)).fetchone()[0]
        return out

    def open(self, name: str, writable: bool | None = None) -> Disk:
        info = self.get(name)
        return Disk(self, info, writable=(info.kind == "disk") if writable is None else writable)

    # -- flatten / export / import ------------------------------------------------------------------
    def flatten(self, name: str, out: str, fmt: str = "raw") -> None:
        """Write the whole virtual disk as one standalone image (for V2P or for another tool)."""
        disk = self.open(name, writable=False)
        target = Path(out)
        tmp = target.with_name(target.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.truncate(disk.size)
                step = disk.block_size * 256
                for offset in range(0, disk.size, step):
                    length = min(step, disk.size - offset)
                    data = disk.read(offset, length)
                    if data.count(0) != len(data):
                        f.seek(offset)
                        f.write(data)
                f.flush()
                os.fsync(f.fileno())
        finally:
            disk.close()
        if fmt == "raw":
            os.replace(tmp, target)
            return
        proc = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(tmp), str(target)],
                              capture_output=True, text=True)
        tmp.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise StorageError(f"qemu-img convert to {fmt} failed: {proc.stderr.strip()}")

    def export_delta(self, name: str, out: str, which: str = "active") -> int:
        """Write a delta as a self-contained file: what migration sends. ``which``: active (changes since
        the last commit), base, or all (base + active flattened, relative to the golden image)."""
        info = self.get(name)
        if which not in ("active", "base", "all"):
            raise StorageError(f"unknown layer {which!r}: use active, base or all")
        if info.kind != "disk" and which == "active":
            which = "base"
        if which == "active":
            delta = self.load_map(info.active_layer)
        else:
            delta = self.load_map(info.base_layer)
            if which == "all":
                delta.overlay(self.load_map(info.active_layer))
        disk = self.open(name, writable=False)
        count = 0
        target = Path(out)
        tmp = target.with_name(target.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                header = json.dumps({
                    "golden": info.golden, "source": name, "layer": which, "size": info.size,
                    "block_size": info.block_size,
                }).encode()
                f.write(DELTA_MAGIC + struct.pack("<II", len(header), zlib.crc32(header)) + header)
                for vba, (file_id, crc, index) in delta.entries():
                    if file_id == ZERO_FILE:
                        f.write(DELTA_RECORD.pack(vba, 1, 0))
                    else:
                        f.write(DELTA_RECORD.pack(vba, 0, crc))
                        f.write(disk.read_entry(file_id, crc, index))
                    count += 1
                f.write(DELTA_RECORD.pack(0xFFFFFFFFFFFFFFFF, 2, count))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            disk.close()
        return count

    def import_delta(self, path: str, name: str, onto: str) -> ObjectInfo:
        """Make a new disk ``name`` on ``onto`` (the golden image or a snapshot with the same base the delta
        was taken against) whose active delta holds the file's blocks."""
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) != 16 or head[:8] != DELTA_MAGIC:
                raise StorageError(f"{path} is not a xenswap delta file")
            length, crc = struct.unpack("<II", head[8:])
            header_bytes = f.read(length)
            if zlib.crc32(header_bytes) != crc:
                raise CorruptBlock(f"{path}: header checksum mismatch")
            header = json.loads(header_bytes)
            base = self.get(onto)
            if base.golden != header["golden"] or base.block_size != header["block_size"]:
                raise StorageError(
                    f"{path} was taken against golden image {header['golden']!r} "
                    f"(block size {header['block_size']}), {onto!r} is on {base.golden!r}"
                )
            self.branch(name, onto)
            disk = self.open(name)
            try:
                bs = disk.block_size
                count = 0
                while True:
                    rec = f.read(DELTA_RECORD.size)
                    if len(rec) != DELTA_RECORD.size:
                        raise CorruptBlock(f"{path} is truncated after {count} blocks")
                    vba, kind, crc = DELTA_RECORD.unpack(rec)
                    if kind == 2:
                        if crc != count:
                            raise CorruptBlock(f"{path}: trailer says {crc} blocks, read {count}")
                        break
                    if kind == 1:
                        disk.write_zeroes(vba * bs, bs)
                    else:
                        data = f.read(bs)
                        if len(data) != bs or zlib.crc32(data) != crc:
                            raise CorruptBlock(f"{path}: block {vba} is damaged (checksum mismatch)")
                        disk.write(vba * bs, data)
                    count += 1
                disk.flush()
            except BaseException:
                disk.close()
                self.remove(name)
                raise
            disk.close()
        return self.get(name)

    def tree(self) -> list[dict[str, object]]:
        objects = self.list()
        children: dict[str | None, list[ObjectInfo]] = {}
        for o in objects:
            parent = o.parent if o.kind != "golden" else None
            if parent is not None and all(p.name != parent for p in objects):
                parent = o.golden
            children.setdefault(parent, []).append(o)

        def node(o: ObjectInfo) -> dict[str, object]:
            return {**o.to_json(), "children": [node(c) for c in children.get(o.name, [])]}

        return [node(o) for o in children.get(None, [])]


class Disk:
    """An open virtual disk (or read-only golden image / snapshot): the read/write engine behind an export."""

    def __init__(self, store: Store, info: ObjectInfo, writable: bool) -> None:
        self.store = store
        self.info = info
        self.name = info.name
        self.size = info.size
        self.block_size = info.block_size
        self.shift = self.block_size.bit_length() - 1
        self.writable = writable and info.kind == "disk"
        self.lock_fd = store.lock_disk(info.name, grace=0) if self.writable else None
        # Re-read: the object may have changed between get() and taking the lock.
        info = self.info = store.get(info.name)
        self.golden = Golden(store.golden_path(info.golden), self.block_size,
                             store.golden_sums(info.golden, self.block_size))
        if self.golden.size < self.size:
            raise CorruptBlock(f"golden image {info.golden!r} is shorter than recorded: it was changed")
        self.base = store.shared_frozen_map(info.base_layer)
        self.active = store.load_map(info.active_layer) if info.kind == "disk" else DeltaMap(store.switch_clusters)
        self.active_layer = info.active_layer
        self.fds: dict[int, int] = {}
        self.dirty: set[int] = set()
        self.append_fd: int | None = None
        self.append_index = 0
        self.zero_block = bytes(self.block_size)
        if self.writable:
            path = store.data_path(self.active_layer)  # type: ignore[arg-type]
            self.append_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            self.fds[self.active_layer] = self.append_fd  # type: ignore[index]
            # Blocks past the last whole block are a torn tail from a crash: never referenced, overwrite.
            self.append_index = os.fstat(self.append_fd).st_size // self.block_size
        # Space reuse: blocks of the active data file that no map references (overwritten, trimmed, or
        # written after the last flush before a crash) are written again instead of growing the file.
        self.unflushed: set[int] = set()
        self.free_after_flush: list[int] = []
        self.free: list[int] = []
        if self.writable:
            used = {entry[2] for _, entry in self.active.entries() if entry[0] == self.active_layer}
            self.free = [i for i in range(self.append_index - 1, -1, -1) if i not in used]
        self.writes_since_flush = 0
        self.broken: BaseException | None = None  # set when a flush failed: nothing is promised after it

    # -- lookups ----------------------------------------------------------------------------------------
    def _fd(self, file_id: int) -> int:
        fd = self.fds.get(file_id)
        if fd is None:
            try:
                fd = self.fds[file_id] = os.open(self.store.data_path(file_id), os.O_RDONLY)
            except FileNotFoundError:
                raise CorruptBlock(f"data file {file_id} of {self.name!r} is missing") from None
        return fd

    def locate(self, vba: int) -> tuple[int, tuple[int, int, int] | None]:
        """(level, entry): level 2 active, 1 base, 0 golden (entry None)."""
        entry = self.active.get(vba)
        if entry is not None:
            return 2, entry
        entry = self.base.get(vba)
        if entry is not None:
            return 1, entry
        return 0, None

    def read_entry(self, file_id: int, crc: int, index: int) -> bytes:
        if file_id == ZERO_FILE:
            return self.zero_block
        data = os.pread(self._fd(file_id), self.block_size, index << self.shift)
        if len(data) != self.block_size or zlib.crc32(data) != crc:
            raise CorruptBlock(f"{self.name}: block in data file {file_id} at index {index} is damaged "
                               "(checksum mismatch)")
        return data

    def _segments(self, first: int, end: int) -> list[list]:
        """Resolve blocks [first, end) into runs: [GOLDEN, vba, n] or [file_id, vba, n, index, crcs].
        Works a cluster at a time: a cluster neither delta has costs two dict probes for its 16 blocks."""
        active_view = self.active.cluster_view
        base_view = self.base.cluster_view
        unpack = ENTRY.unpack_from
        segments: list[list] = []
        last: list | None = None
        for cidx in range(first >> CLUSTER_SHIFT, ((end - 1) >> CLUSTER_SHIFT) + 1):
            lo = max(first, cidx << CLUSTER_SHIFT)
            hi = min(end, (cidx + 1) << CLUSTER_SHIFT)
            top = active_view(cidx)
            below = base_view(cidx)
            if top is None and below is None:
                if last is not None and last[0] == GOLDEN and last[1] + last[2] == lo:
                    last[2] += hi - lo
                else:
                    last = [GOLDEN, lo, hi - lo]
                    segments.append(last)
                continue
            for vba in range(lo, hi):
                slot = (vba & CLUSTER_MASK) * ENTRY_SIZE
                file_id = 0
                if top is not None:
                    file_id, crc, index = unpack(top, slot)
                if not file_id and below is not None:
                    file_id, crc, index = unpack(below, slot)
                if not file_id:
                    if last is not None and last[0] == GOLDEN and last[1] + last[2] == vba:
                        last[2] += 1
                    else:
                        last = [GOLDEN, vba, 1]
                        segments.append(last)
                elif file_id == ZERO_FILE:
                    last = None  # the output buffer is already zero
                elif (last is not None and last[0] == file_id and last[1] + last[2] == vba
                      and last[3] + last[2] == index):
                    last[2] += 1
                    last[4].append(crc)
                else:
                    last = [file_id, vba, 1, index, [crc]]
                    segments.append(last)
        return segments

    def _read_blocks(self, first: int, count: int) -> bytearray:
        """Whole blocks [first, first + count): each run from one place is read with one preadv."""
        shift = self.shift
        out = bytearray(count << shift)
        view = memoryview(out)
        golden = self.golden
        verified = golden.shared_sums.verified
        golden_sums = golden.sums
        for seg in self._segments(first, first + count):
            kind, vba, n = seg[0], seg[1], seg[2]
            dst = view[(vba - first) << shift : (vba - first + n) << shift]
            if kind == GOLDEN:
                if os.preadv(golden.fd, [dst], vba << shift) != n << shift:
                    raise CorruptBlock(f"golden image {self.info.golden!r} is shorter than recorded")
                # The golden image never changes: a block whose checksum matched once in this process is
                # not checked again (the first read of every block after start-up still is).
                if verified.find(0, vba, vba + n) != -1:
                    for i in range(n):
                        if verified[vba + i]:
                            continue
                        if zlib.crc32(dst[i << shift : (i + 1) << shift]) != golden_sums[vba + i]:
                            raise CorruptBlock(f"golden image {self.info.golden!r}: block {vba + i} is damaged "
                                               "(checksum mismatch)")
                        verified[vba + i] = 1
                continue
            if os.preadv(self._fd(kind), [dst], seg[3] << shift) != n << shift:
                raise CorruptBlock(f"{self.name}: data file {kind} is truncated")
            for i, want in enumerate(seg[4]):
                if zlib.crc32(dst[i << shift : (i + 1) << shift]) != want:
                    raise CorruptBlock(f"{self.name}: block {vba + i} in data file {kind} is damaged "
                                       "(checksum mismatch)")
        return out

    def read(self, offset: int, length: int) -> bytes | bytearray:
        shift = self.shift
        first = offset >> shift
        last = (offset + length - 1) >> shift
        data = self._read_blocks(first, last - first + 1)
        skip = offset - (first << shift)
        if skip == 0 and len(data) == length:
            return data
        return bytes(memoryview(data)[skip : skip + length])

    # -- writes -----------------------------------------------------------------------------------------
    def _require_writable(self) -> None:
        if not self.writable:
            raise StorageError(f"{self.name!r} is read-only")
        if self.broken is not None:
            raise StorageError(f"{self.name}: an earlier flush failed ({self.broken}); reopen the disk")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._require_writable()
        bs = self.block_size
        shift = self.shift
        length = len(data)
        first = offset >> shift
        last = (offset + length - 1) >> shift
        head = offset - (first << shift)
        if head or (offset + length) & (bs - 1):
            # Unaligned: read-modify-write of the edge blocks, so the map only ever holds whole blocks.
            buf = self._read_blocks(first, last - first + 1)
            buf[head : head + length] = data
            data = buf
        view = memoryview(data)
        count = last - first + 1
        zero_block = self.zero_block
        # One pwrite for all non-zero blocks of this request (they land at consecutive indexes).
        keep = []
        for i in range(count):
            block = view[i << shift : (i + 1) << shift]
            if block == zero_block:
                self._replace(first + i, ZERO_FILE, 0, 0)
            else:
                keep.append((i, block))
        if keep:
            indexes = self._allocate(len(keep))
            fd = self.append_fd
            # One pwrite per run of blocks that are contiguous both in the request and in the data file.
            run_start = 0
            for k in range(1, len(keep) + 1):
                if k < len(keep) and indexes[k] == indexes[k - 1] + 1 and keep[k][0] == keep[k - 1][0] + 1:
                    continue
                chunk = view[keep[run_start][0] << shift : (keep[k - 1][0] + 1) << shift]
                if os.pwrite(fd, chunk, indexes[run_start] << shift) != len(chunk):  # type: ignore[arg-type]
                    raise StorageError(f"{self.name}: short write to the data file (disk full?)")
                run_start = k
            file_id = self.active_layer
            for (i, block), index in zip(keep, indexes, strict=True):
                self._replace(first + i, file_id, zlib.crc32(block), index)  # type: ignore[arg-type]
                self.unflushed.add(index)
        self.writes_since_flush += 1

    def _replace(self, vba: int, file_id: int, crc: int, index: int) -> None:
        old = self.active.get(vba)
        self.active.set(vba, file_id, crc, index)
        self.dirty.add(vba >> CLUSTER_SHIFT)
        if old is not None:
            self._release(old)

    def _release(self, old: tuple[int, int, int]) -> None:
        """A block of the active data file is no longer mapped. If no durable map can reference it (it was
        written after the last flush) it is free now; otherwise only once the next flush has committed a map
        without it -- until then a crash would bring the old map, and this block, back."""
        if old[0] != self.active_layer:
            return
        index = old[2]
        if index in self.unflushed:
            self.unflushed.discard(index)
            self.free.append(index)
        else:
            self.free_after_flush.append(index)

    def _allocate(self, count: int) -> list[int]:
        """Indexes for ``count`` new blocks: reused free ones first, then the end of the file."""
        take = min(count, len(self.free))
        indexes = [self.free.pop() for _ in range(take)]
        indexes.sort()
        rest = count - take
        if rest:
            indexes.extend(range(self.append_index, self.append_index + rest))
            self.append_index += rest
        return indexes

    def write_zeroes(self, offset: int, length: int) -> None:
        self._require_writable()
        bs = self.block_size
        first = -(-offset // bs)
        end = (offset + length) // bs
        # Partial blocks at the edges are written as data; whole blocks become zero entries (no data).
        if first > end:
            self.write(offset, bytes(length))
            return
        if offset < first * bs:
            self.write(offset, bytes(first * bs - offset))
        for vba in range(first, end):
            self._replace(vba, ZERO_FILE, 0, 0)
        if offset + length > end * bs:
            self.write(end * bs, bytes(offset + length - end * bs))
        self.writes_since_flush += 1

    def trim(self, offset: int, length: int) -> None:
        """Forget our copies of whole blocks in the range: they read from the layer below again."""
        self._require_writable()
        bs = self.block_size
        for vba in range(-(-offset // bs), (offset + length) // bs):
            old = self.active.get(vba)
            if old is not None:
                self.active.delete(vba)
                self.dirty.add(vba >> CLUSTER_SHIFT)
                self._release(old)
        self.writes_since_flush += 1

    def begin_flush(self) -> FlushJob | None:
        """Snapshot what the next flush must persist and hand it to the flush thread (returns None for a
        read-only disk). Blocks written so far count as covered; any of them freed from now on is reusable
        only after a later flush, since this one's map may still name it."""
        if not self.writable:
            return None
        if self.broken is not None:
            raise StorageError(f"{self.name}: an earlier flush failed ({self.broken}); reopen the disk")
        rows = []
        gone = []
        for cidx in sorted(self.dirty):
            blob = self.active.cluster_blob(cidx)
            if blob is None:
                gone.append((self.active_layer, cidx))
            else:
                rows.append((self.active_layer, cidx, blob))
        job = FlushJob(self, self.append_fd, self.active_layer, rows, gone, self.free_after_flush)  # type: ignore[arg-type]
        self.dirty = set()
        self.free_after_flush = []
        self.unflushed = set()
        self.writes_since_flush = 0
        return job

    def end_flush(self, job: FlushJob) -> None:
        """After the flush thread committed ``job`` (on the owner's thread)."""
        self.free.extend(job.freed_after)

    def submit_flush(self) -> concurrent.futures.Future[None] | None:
        job = self.begin_flush()
        if job is None:
            return None
        future = self.store.submit_flush(job)
        future.job = job  # type: ignore[attr-defined]
        return future

    def flush(self) -> None:
        """Make every completed write durable: data first (fsync), then the map entries (one transaction).
        Waits for the flush thread (the CLI and tests use this; the NBD server awaits the future instead)."""
        future = self.submit_flush()
        if future is None:
            return
        future.result()
        self.end_flush(future.job)  # type: ignore[attr-defined]

    # -- status -----------------------------------------------------------------------------------------
    def extents(self, offset: int, length: int, context: str, limit: int = 1024) -> list[tuple[int, int]]:
        """(length, flags) runs from offset. base:allocation: 1 hole, 2 zero. xenswap:layer: 0 golden,
        1 base (migration) delta, 2 active delta. Covers at most 64 Ki blocks per call (the protocol lets a
        server describe less than asked; the client asks again from where we stopped)."""
        if context == "base:allocation":
            return self._allocation(offset, length, limit)
        bs = self.block_size
        out: list[tuple[int, int]] = []
        pos = offset
        end = min(offset + length, (offset // bs + 65536) * bs)
        while pos < end and len(out) < limit:
            vba = pos // bs
            flags = self.locate(vba)[0]  # xenswap:layer
            run_end = min(end, (vba + 1) * bs)
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + run_end - pos, flags)
            else:
                out.append((run_end - pos, flags))
            pos = run_end
        return out

    def _allocation(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        """base:allocation for up to 4 GiB worth of blocks per call: delta data is allocated (0), zero
        entries and holes of the golden file (found with SEEK_DATA/SEEK_HOLE, which are certain to read as
        zero) are hole|zero (3), other golden data is 0."""
        bs = self.block_size
        first = offset // bs
        end_block = min(-(-(offset + length) // bs), first + (1 << 20))
        runs: list[list[int]] = []

        def add(start: int, count: int, flags: int) -> None:
            if runs and runs[-1][2] == flags and runs[-1][0] + runs[-1][1] == start:
                runs[-1][1] += count
            else:
                runs.append([start, count, flags])

        fd = self.golden.fd
        golden_blocks = self.golden.size // bs
        cursor = first
        for seg in self._segments(first, end_block):
            kind, start, count = seg[0], seg[1], seg[2]
            if start > cursor:
                add(cursor, start - cursor, 3)  # zero entries leave gaps between segments
            if kind != GOLDEN:
                add(start, count, 0)
            else:
                pos, seg_end = start, start + count
                while pos < seg_end:
                    try:
                        data_block = os.lseek(fd, pos * bs, os.SEEK_DATA) // bs
                    except OSError:  # ENXIO: only a hole up to the end of the file
                        data_block = golden_blocks
                    if data_block > pos:
                        nxt = min(data_block, seg_end)
                        add(pos, nxt - pos, 3)
                    else:
                        hole_block = -(-os.lseek(fd, pos * bs, os.SEEK_HOLE) // bs)
                        nxt = min(max(hole_block, pos + 1), seg_end)
                        add(pos, nxt - pos, 0)
                    pos = nxt
            cursor = start + count
        if cursor < end_block:
            add(cursor, end_block - cursor, 3)
        out: list[tuple[int, int]] = []
        stop = offset + length
        for start, count, flags in runs[:limit]:
            lo = max(start * bs, offset)
            hi = min((start + count) * bs, stop)
            if hi > lo:
                out.append((hi - lo, flags))
        return out

    def map_bytes(self) -> int:
        """Memory of this disk's own lookup structures (the base map may be shared with other disks)."""
        return self.active.nbytes() + self.base.nbytes()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
            self.golden.close()
            if self.lock_fd is not None:
                os.close(self.lock_fd)
                self.lock_fd = None


def iter_blocks(disk: Disk) -> Iterator[int]:
    """VBAs that differ from the golden image (for tools and tests)."""
    seen = {vba for vba, _ in disk.base.entries()} | {vba for vba, _ in disk.active.entries()}
    return iter(sorted(seen))
