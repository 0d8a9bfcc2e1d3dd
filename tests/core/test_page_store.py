"""Fast tier: the page store (xenswap.core.page_store): round trips, dedup with reference counts, corruption is
refused, and a writer killed with SIGKILL mid-stream loses no acknowledged page and leaves no partial batch."""

from __future__ import annotations

import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenswap.core.page_store import PAGE_SIZE, PageStore, PageStoreCorrupt, PageStoreError, StoreStats, page_digest


def page(seed: int) -> bytes:
    return (seed.to_bytes(8, "little") * (PAGE_SIZE // 8))


ZERO = bytes(PAGE_SIZE)


def test_round_trip_and_remove(tmp_path):
    with PageStore(tmp_path / "pages.db") as store:
        assert store.put_pages("dom-a", {5: page(1), 7: page(2)}) == 2
        assert store.get_page("dom-a", 5) == page(1)
        assert store.get_page("dom-a", 7) == page(2)
        assert store.get_page("dom-a", 6) is None
        assert store.get_page("dom-b", 5) is None  # domains are separate
        assert store.gfns("dom-a") == [5, 7]
        assert ("dom-a", 7) in store and ("dom-a", 8) not in store
        assert store.remove_pages("dom-a", [5, 99]) == 1
        assert store.gfns("dom-a") == [7]
        assert store.check() == []


def test_rejects_a_page_that_is_not_4096_bytes(tmp_path):
    with PageStore(tmp_path / "pages.db") as store, pytest.raises(PageStoreError, match="4096"):
        store.put_pages("d", {1: b"short"})


def test_identical_pages_are_stored_once_and_freed_with_their_last_user(tmp_path):
    with PageStore(tmp_path / "pages.db") as store:
        store.put_pages("a", {g: ZERO for g in range(100)})
        store.put_pages("b", {g: ZERO for g in range(50)} | {50: page(9)})
        stats = store.stats()
        assert (stats.pages, stats.blobs, stats.blob_bytes) == (151, 2, 2 * PAGE_SIZE)
        assert stats.dedup_ratio == pytest.approx(151 / 2)
        store.drop_domain("a")
        assert store.stats().blobs == 2
        store.remove_pages("b", range(50))
        assert store.stats().blobs == 1  # the zero page had no user left
        # overwriting a gfn moves its reference from the old content to the new
        store.put_pages("b", {50: page(10)})
        assert store.get_page("b", 50) == page(10)
        assert store.stats().blobs == 1
        assert store.check() == []


def test_a_corrupted_page_is_never_returned(tmp_path):
    path = tmp_path / "pages.db"
    with PageStore(path) as store:
        store.put_pages("d", {3: page(3)})
    with sqlite3.connect(path) as db:
        db.execute("UPDATE blobs SET data = ?", (page(4),))
    with PageStore(path) as store:
        with pytest.raises(PageStoreCorrupt, match="d:0x3"):
            store.get_page("d", 3)
        assert any("does not match its digest" in p for p in store.check())


def test_a_store_with_the_old_without_rowid_blobs_is_converted_and_loses_nothing(tmp_path):
    """Stores made before blobs became a rowid table (page_store docstring) open, are converted once, and every
    page and reference count is what it was."""
    path = tmp_path / "pages.db"
    with sqlite3.connect(path) as db:  # the old layout, written as the earlier PageStore did
        db.executescript("""
            CREATE TABLE blobs (digest BLOB PRIMARY KEY, data BLOB NOT NULL, refs INTEGER NOT NULL) WITHOUT ROWID;
            CREATE TABLE pages (domain TEXT NOT NULL, gfn INTEGER NOT NULL, digest BLOB NOT NULL,
                                PRIMARY KEY (domain, gfn)) WITHOUT ROWID;""")
        contents = {g: page(g % 5) for g in range(40)}
        for seed in range(5):
            db.execute("INSERT INTO blobs VALUES (?, ?, 8)", (page_digest(page(seed)), page(seed)))
        db.executemany("INSERT INTO pages VALUES ('d', ?, ?)", [(g, page_digest(c)) for g, c in contents.items()])
    with PageStore(path) as store:
        assert store.get_pages("d", range(40)) == contents
        assert store.stats() == StoreStats(40, 5, 5 * PAGE_SIZE)
        assert store.check() == []
        store.put_pages("d", {40: page(1), 41: page(77)})  # the new table deduplicates against the old rows
        assert store.stats().blobs == 6 and store.check() == []
    with sqlite3.connect(path) as db:
        tables = dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type='table'").fetchall())
    assert set(tables) == {"blobs", "pages"} and "WITHOUT ROWID" not in tables["blobs"].upper()
    with PageStore(path) as store:  # opening a converted store again changes nothing
        assert store.get_pages("d", [0, 40, 41]) == {0: page(0), 40: page(1), 41: page(77)}


def test_get_pages_reads_a_batch_in_one_query_and_leaves_out_what_is_not_stored(tmp_path):
    with PageStore(tmp_path / "pages.db") as store:
        store.put_pages("a", {g: page(g % 7) for g in range(0, 1200, 2)})  # even gfns; 7 distinct contents
        store.put_pages("b", {1: page(99)})
        wanted = [*range(1201), 1]  # odd (not stored) and even gfns, one past the last, a repeat
        statements = []
        store._db.set_trace_callback(statements.append)
        got = store.get_pages("a", wanted)
        store._db.set_trace_callback(None)
        assert got == {g: page(g % 7) for g in range(0, 1200, 2)}
        assert 1 not in got  # domain b's gfn 1 is not domain a's
        assert len([s for s in statements if s.startswith("SELECT")]) == 3  # 500 gfns per query
        assert store.get_pages("a", []) == {}
        assert store.get_pages("nobody", range(10)) == {}


def test_remove_pages_in_one_call_keeps_reference_counts_exact(tmp_path):
    with PageStore(tmp_path / "pages.db") as store:
        store.put_pages("a", {g: page(g % 3) for g in range(1200)})
        store.put_pages("b", {0: page(0)})
        assert store.remove_pages("a", [*range(5, 1300), 7]) == 1195  # spans three queries; unknown and repeats
        assert store.gfns("a") == [0, 1, 2, 3, 4]
        assert store.stats().blobs == 3  # still used by a's first five and b
        assert store.check() == []
        assert store.remove_pages("a", range(5)) == 5
        assert store.stats().blobs == 1 and store.get_page("b", 0) == page(0)
        assert store.check() == []


def test_get_pages_refuses_a_corrupted_page_in_a_batch(tmp_path):
    path = tmp_path / "pages.db"
    with PageStore(path) as store:
        store.put_pages("d", {3: page(3), 4: page(4)})
    with sqlite3.connect(path) as db:
        db.execute("UPDATE blobs SET data = ? WHERE data = ?", (page(5), page(4)))
    with PageStore(path) as store:
        assert store.get_pages("d", [3]) == {3: page(3)}
        with pytest.raises(PageStoreCorrupt, match="d:0x4"):
            store.get_pages("d", [3, 4])


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 512 KiB tmpfs: a disk that fills up after a few dozen pages."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_write_with_its_own_error_and_loses_nothing_acknowledged(small_tmpfs):
    """SQLite rolls a transaction back by itself on SQLITE_FULL; the store's own ROLLBACK then used to fail and
    replace "database or disk is full" with "cannot rollback - no transaction is active" (seen in the Xen rig's
    dom0 with /tmp full; reproduced on this tmpfs)."""
    with PageStore(small_tmpfs / "pages.db") as store:
        acknowledged = 0
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            while True:
                store.put_pages("d", {g: page(g) for g in range(acknowledged, acknowledged + 8)})
                acknowledged += 8
        assert acknowledged > 0
        assert store.gfns("d") == list(range(acknowledged))  # the failed batch left nothing behind
        assert store.get_pages("d", range(acknowledged)) == {g: page(g) for g in range(acknowledged)}
        assert store.check() == []
        subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
        store.put_pages("d", {acknowledged: page(acknowledged)})  # and it takes writes again once there is room
        assert store.get_page("d", acknowledged) == page(acknowledged)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["x", "y"]), st.integers(0, 20), st.integers(0, 4), st.booleans()),
                max_size=60))
def test_matches_a_dict_model_under_any_sequence(tmp_path_factory, operations):
    """Puts and removes in any order: the store answers like a plain dict, reference counts stay exact."""
    store = PageStore(tmp_path_factory.mktemp("model") / "pages.db")
    model: dict[tuple[str, int], bytes] = {}
    try:
        for domain, gfn, content, remove in operations:
            if remove:  # a gfn, its neighbour and the gfn again: removes are batched and deduplicated
                expected = sum((domain, g) in model for g in (gfn, gfn + 1))
                assert store.remove_pages(domain, [gfn, gfn + 1, gfn]) == expected
                model.pop((domain, gfn), None)
                model.pop((domain, gfn + 1), None)
            else:
                store.put_pages(domain, {gfn: page(content)})
                model[(domain, gfn)] = page(content)
        for domain in ("x", "y"):
            assert store.gfns(domain) == sorted(g for d, g in model if d == domain)
            for gfn in store.gfns(domain):
                assert store.get_page(domain, gfn) == model[(domain, gfn)]
            assert store.get_pages(domain, range(21)) == {g: v for (d, g), v in model.items() if d == domain}
        assert store.stats().blobs == len(set(model.values()))
        assert store.check() == []
    finally:
        store.close()


WRITER = textwrap.dedent("""
    import sys
    from xenswap.core.page_store import PageStore, PAGE_SIZE
    store = PageStore(sys.argv[1])
    batch = 0
    while True:
        # batch b: gfns b*8 .. b*8+7, content derived from (batch, gfn); every 3rd page a shared zero page
        pages = {b: (bytes(PAGE_SIZE) if b % 3 == 0 else (batch * 1000 + b).to_bytes(8, "little") * 512)
                 for b in range(batch * 8, batch * 8 + 8)}
        store.put_pages("victim", pages)
        print(batch, flush=True)  # acknowledged: only after the commit returned
        batch += 1
""")


def expected_batch(batch: int) -> dict[int, bytes]:
    return {b: (bytes(PAGE_SIZE) if b % 3 == 0 else (batch * 1000 + b).to_bytes(8, "little") * 512)
            for b in range(batch * 8, batch * 8 + 8)}


@pytest.mark.parametrize("kill_after", [0.3, 0.7, 1.1])
def test_kill_9_of_the_writer_loses_no_acknowledged_page(tmp_path, kill_after):
    path = tmp_path / "pages.db"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parents[2])
    fd = writer.stdout.fileno()
    acknowledged = -1
    output = b""
    started = time.monotonic()
    while time.monotonic() - started < kill_after or acknowledged < 2:
        assert time.monotonic() - started < 60, "the writer acknowledged nothing"
        if select.select([fd], [], [], 0.05)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, "the writer died by itself"
            output += chunk
            acknowledged = int(output.rsplit(b"\n", 2)[-2]) if output.count(b"\n") else -1
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    output += writer.stdout.read()  # acknowledgements written just before the kill
    writer.stdout.close()
    acknowledged = int(output.strip().rsplit(b"\n", 1)[-1])
    assert acknowledged >= 2

    with PageStore(path) as store:
        stored = set(store.gfns("victim"))
        for batch in range(acknowledged + 1):
            for gfn, data in expected_batch(batch).items():
                assert store.get_page("victim", gfn) == data, f"acknowledged batch {batch} lost gfn {gfn}"
        # the batch in flight when the kill came is all there or not at all
        in_flight = set(expected_batch(acknowledged + 1))
        assert in_flight <= stored or not (in_flight & stored)
        assert stored <= set(range((acknowledged + 2) * 8))
        assert store.check() == []
