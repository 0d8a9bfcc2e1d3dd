"""Block maps: virtual block address (VBA) -> where the block lives.

An entry is 16 bytes, ``<IIQ``: the data file id, the CRC32 of the block, and the block's index in that
file. File id 0 means "no entry here" (fall through to the layer below); ``ZERO_FILE`` means the block reads
as zeroes and has no data at all (WRITE_ZEROES, or a written block that was all zero).

Two structures hold the entries, with the same interface:

* ``ClusterHashMap`` -- a hash table keyed by cluster (``CLUSTER_BLOCKS`` neighbouring blocks share one
  entry holding their 16-byte slots), so a disk's locality turns into few, dense table entries.
* ``GuardedPageTable`` -- a radix tree over leaf pages of ``LEAF_BLOCKS`` slots, 64-way interior nodes,
  where a node carries a guard (the key prefix all keys below it share) so that runs of single-child
  levels are skipped instead of stored. Used once a delta is large: it stores dense deltas at 16 bytes a
  block with no per-entry hashing overhead.

``DeltaMap`` starts as a hash table and switches to the page table when it outgrows ``switch_clusters``.
Lookups cost the same whatever the history of the disk: snapshots are flattened when they are taken, so a
disk reads through at most its active map, its base (migration) map and the golden image.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator

ENTRY = struct.Struct("<IIQ")
ENTRY_SIZE = ENTRY.size
ZERO_FILE = 0xFFFFFFFF
CLUSTER_SHIFT = 4
CLUSTER_BLOCKS = 1 << CLUSTER_SHIFT
CLUSTER_MASK = CLUSTER_BLOCKS - 1
CLUSTER_BYTES = CLUSTER_BLOCKS * ENTRY_SIZE
EMPTY_CLUSTER = bytes(CLUSTER_BYTES)

LEAF_SHIFT = 8  # 256 blocks a leaf page (4 KiB of slots)
LEAF_BLOCKS = 1 << LEAF_SHIFT
LEAF_MASK = LEAF_BLOCKS - 1
NODE_BITS = 6  # 64-way interior nodes
NODE_FANOUT = 1 << NODE_BITS
NODE_MASK = NODE_FANOUT - 1
CLUSTERS_PER_LEAF = LEAF_BLOCKS // CLUSTER_BLOCKS

Entry = tuple[int, int, int]  # (file id, crc32, block index in file)


class ClusterHashMap:
    """Clustered hash table: cluster index -> bytearray of CLUSTER_BLOCKS 16-byte slots."""

    kind = "hash"

    def __init__(self) -> None:
        self.clusters: dict[int, bytearray] = {}

    def get(self, vba: int) -> Entry | None:
        cluster = self.clusters.get(vba >> CLUSTER_SHIFT)
        if cluster is None:
            return None
        entry = ENTRY.unpack_from(cluster, (vba & CLUSTER_MASK) * ENTRY_SIZE)
        return entry if entry[0] else None

    def set(self, vba: int, file_id: int, crc: int, index: int) -> None:
        key = vba >> CLUSTER_SHIFT
        cluster = self.clusters.get(key)
        if cluster is None:
            cluster = self.clusters[key] = bytearray(CLUSTER_BYTES)
        ENTRY.pack_into(cluster, (vba & CLUSTER_MASK) * ENTRY_SIZE, file_id, crc, index)

    def delete(self, vba: int) -> None:
        key = vba >> CLUSTER_SHIFT
        cluster = self.clusters.get(key)
        if cluster is None:
            return
        offset = (vba & CLUSTER_MASK) * ENTRY_SIZE
        cluster[offset : offset + ENTRY_SIZE] = bytes(ENTRY_SIZE)
        if cluster == EMPTY_CLUSTER:
            del self.clusters[key]

    def has_cluster(self, cidx: int) -> bool:
        return cidx in self.clusters

    def cluster_view(self, cidx: int) -> bytearray | None:
        """The cluster's slots without copying (read them, do not keep them)."""
        return self.clusters.get(cidx)

    def cluster_blob(self, cidx: int) -> bytes | None:
        cluster = self.clusters.get(cidx)
        return None if cluster is None else bytes(cluster)

    def put_cluster(self, cidx: int, blob: bytes) -> None:
        if blob == EMPTY_CLUSTER:
            self.clusters.pop(cidx, None)
        else:
            self.clusters[cidx] = bytearray(blob)

    def cluster_indexes(self) -> Iterator[int]:
        return iter(sorted(self.clusters))

    def cluster_count(self) -> int:
        return len(self.clusters)

    def nbytes(self) -> int:
        return sys.getsizeof(self.clusters) + sum(sys.getsizeof(c) for c in self.clusters.values())


class _Node:
    """An interior node of the guarded page table. All keys below it share ``key >> (shift + NODE_BITS) ==
    guard``; ``children[(key >> shift) & NODE_MASK]`` is a _Node, or a leaf bytearray when shift == 0."""

    __slots__ = ("children", "guard", "shift")

    def __init__(self, shift: int, guard: int) -> None:
        self.shift = shift
        self.guard = guard
        self.children: list[_Node | bytearray | None] = [None] * NODE_FANOUT


class GuardedPageTable:
    """Radix tree with guards (path compression) over leaf pages keyed by ``vba >> LEAF_SHIFT``."""

    kind = "gpt"

    def __init__(self) -> None:
        self.root: _Node | None = None
        self.leaves = 0
        self.nodes = 0

    def _leaf(self, key: int) -> bytearray | None:
        node = self.root
        while node is not None:
            shift = node.shift
            if key >> (shift + NODE_BITS) != node.guard:
                return None
            child = node.children[(key >> shift) & NODE_MASK]
            if shift == 0:
                return child  # type: ignore[return-value]
            node = child  # type: ignore[assignment]
        return None

    def _leaf_for_write(self, key: int) -> bytearray:
        if self.root is None:
            self.root = _Node(0, key >> NODE_BITS)
            self.nodes += 1
        parent: _Node | None = None
        node = self.root
        while True:
            if key >> (node.shift + NODE_BITS) != node.guard:
                # The guard does not match: put a new node where the two key paths part.
                node_key = node.guard << (node.shift + NODE_BITS)
                shift = node.shift + NODE_BITS
                while key >> (shift + NODE_BITS) != node_key >> (shift + NODE_BITS):
                    shift += NODE_BITS
                split = _Node(shift, key >> (shift + NODE_BITS))
                self.nodes += 1
                split.children[(node_key >> shift) & NODE_MASK] = node
                if parent is None:
                    self.root = split
                else:
                    parent.children[(key >> parent.shift) & NODE_MASK] = split
                node = split
            index = (key >> node.shift) & NODE_MASK
            child = node.children[index]
            if node.shift == 0:
                if child is None:
                    child = node.children[index] = bytearray(LEAF_BLOCKS * ENTRY_SIZE)
                    self.leaves += 1
                return child  # type: ignore[return-value]
            if child is None:
                # A guarded jump straight to the leaf level: no single-child chain is stored.
                child = node.children[index] = _Node(0, key >> NODE_BITS)
                self.nodes += 1
            parent, node = node, child  # type: ignore[assignment]

    def get(self, vba: int) -> Entry | None:
        leaf = self._leaf(vba >> LEAF_SHIFT)
        if leaf is None:
            return None
        entry = ENTRY.unpack_from(leaf, (vba & LEAF_MASK) * ENTRY_SIZE)
        return entry if entry[0] else None

    def set(self, vba: int, file_id: int, crc: int, index: int) -> None:
        leaf = self._leaf_for_write(vba >> LEAF_SHIFT)
        ENTRY.pack_into(leaf, (vba & LEAF_MASK) * ENTRY_SIZE, file_id, crc, index)

    def delete(self, vba: int) -> None:
        leaf = self._leaf(vba >> LEAF_SHIFT)
        if leaf is not None:
            offset = (vba & LEAF_MASK) * ENTRY_SIZE
            leaf[offset : offset + ENTRY_SIZE] = bytes(ENTRY_SIZE)

    def has_cluster(self, cidx: int) -> bool:
        return self.cluster_blob(cidx) is not None

    def cluster_view(self, cidx: int) -> memoryview | None:
        leaf = self._leaf(cidx >> (LEAF_SHIFT - CLUSTER_SHIFT))
        if leaf is None:
            return None
        start = (cidx % CLUSTERS_PER_LEAF) * CLUSTER_BYTES
        return memoryview(leaf)[start : start + CLUSTER_BYTES]

    def cluster_blob(self, cidx: int) -> bytes | None:
        leaf = self._leaf(cidx >> (LEAF_SHIFT - CLUSTER_SHIFT))
        if leaf is None:
            return None
        start = (cidx % CLUSTERS_PER_LEAF) * CLUSTER_BYTES
        blob = bytes(leaf[start : start + CLUSTER_BYTES])
        return None if blob == EMPTY_CLUSTER else blob

    def put_cluster(self, cidx: int, blob: bytes) -> None:
        key = cidx >> (LEAF_SHIFT - CLUSTER_SHIFT)
        leaf = self._leaf(key) if blob == EMPTY_CLUSTER else self._leaf_for_write(key)
        if leaf is not None:
            start = (cidx % CLUSTERS_PER_LEAF) * CLUSTER_BYTES
            leaf[start : start + CLUSTER_BYTES] = blob

    def _walk(self, node: _Node) -> Iterator[tuple[int, bytearray]]:
        for index, child in enumerate(node.children):
            if child is None:
                continue
            if node.shift == 0:
                yield (node.guard << NODE_BITS) | index, child  # type: ignore[misc]
            else:
                yield from self._walk(child)  # type: ignore[arg-type]

    def cluster_indexes(self) -> Iterator[int]:
        if self.root is None:
            return
        for key, leaf in sorted(self._walk(self.root)):
            for i in range(CLUSTERS_PER_LEAF):
                if leaf[i * CLUSTER_BYTES : (i + 1) * CLUSTER_BYTES] != EMPTY_CLUSTER:
                    yield (key << (LEAF_SHIFT - CLUSTER_SHIFT)) | i

    def cluster_count(self) -> int:
        return sum(1 for _ in self.cluster_indexes())

    def depth(self) -> int:
        """Interior nodes on the longest root-to-leaf path (guards keep this short)."""

        def walk(node: _Node) -> int:
            if node.shift == 0:
                return 1
            return 1 + max((walk(c) for c in node.children if c is not None), default=0)  # type: ignore[arg-type]

        return 0 if self.root is None else walk(self.root)

    def nbytes(self) -> int:
        node_size = sys.getsizeof(_Node(0, 0)) + sys.getsizeof([None] * NODE_FANOUT)
        return self.nodes * node_size + self.leaves * sys.getsizeof(bytearray(LEAF_BLOCKS * ENTRY_SIZE))


class DeltaMap:
    """A delta's map: a clustered hash table that becomes a guarded page table once it is large."""

    def __init__(self, switch_clusters: int = 4096) -> None:
        self.switch_clusters = switch_clusters
        self.table: ClusterHashMap | GuardedPageTable = ClusterHashMap()
        # Bound methods cached: the read path calls get() once per block.
        self.get = self.table.get
        self.has_cluster = self.table.has_cluster
        self.cluster_view = self.table.cluster_view

    @property
    def kind(self) -> str:
        return self.table.kind

    def _maybe_switch(self) -> None:
        table = self.table
        if isinstance(table, ClusterHashMap) and len(table.clusters) > self.switch_clusters:
            gpt = GuardedPageTable()
            for cidx, cluster in table.clusters.items():
                gpt.put_cluster(cidx, bytes(cluster))
            self.table = gpt
            self.get = gpt.get
            self.has_cluster = gpt.has_cluster
            self.cluster_view = gpt.cluster_view

    def set(self, vba: int, file_id: int, crc: int, index: int) -> None:
        self.table.set(vba, file_id, crc, index)
        self._maybe_switch()

    def delete(self, vba: int) -> None:
        self.table.delete(vba)

    def cluster_blob(self, cidx: int) -> bytes | None:
        return self.table.cluster_blob(cidx)

    def put_cluster(self, cidx: int, blob: bytes) -> None:
        self.table.put_cluster(cidx, blob)
        self._maybe_switch()

    def cluster_indexes(self) -> Iterator[int]:
        return self.table.cluster_indexes()

    def cluster_count(self) -> int:
        return self.table.cluster_count()

    def nbytes(self) -> int:
        return self.table.nbytes()

    def entries(self) -> Iterator[tuple[int, Entry]]:
        """Every present (vba, entry), in VBA order."""
        for cidx in self.cluster_indexes():
            blob = self.cluster_blob(cidx)
            if blob is None:
                continue
            for i in range(CLUSTER_BLOCKS):
                entry = ENTRY.unpack_from(blob, i * ENTRY_SIZE)
                if entry[0]:
                    yield (cidx << CLUSTER_SHIFT) | i, entry

    def copy(self) -> DeltaMap:
        clone = DeltaMap(self.switch_clusters)
        for cidx in self.cluster_indexes():
            blob = self.cluster_blob(cidx)
            if blob is not None:
                clone.put_cluster(cidx, blob)
        return clone

    def overlay(self, upper: DeltaMap) -> None:
        """Fold ``upper``'s entries over ours, entry by entry (upper wins where it has one)."""
        for cidx in upper.cluster_indexes():
            top = upper.cluster_blob(cidx)
            if top is None:
                continue
            below = self.cluster_blob(cidx)
            if below is None:
                self.put_cluster(cidx, top)
                continue
            merged = bytearray(below)
            for i in range(CLUSTER_BLOCKS):
                slot = top[i * ENTRY_SIZE : (i + 1) * ENTRY_SIZE]
                if slot[:4] != b"\0\0\0\0":
                    merged[i * ENTRY_SIZE : (i + 1) * ENTRY_SIZE] = slot
            self.put_cluster(cidx, bytes(merged))
