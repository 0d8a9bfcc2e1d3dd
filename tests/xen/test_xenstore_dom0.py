"""Real xenstored in the nested dom0, through pyxs over its unix socket."""

from __future__ import annotations

import threading

import pytest

from xenswap.hv.xen.xenstore import XenStore, XenStoreError

pytestmark = pytest.mark.dom0


def test_write_read_list_remove(scratch):
    with XenStore() as store:
        store.write(f"{scratch}/a", "1")
        store.write(f"{scratch}/b", "two words")
        assert store.read(f"{scratch}/a") == "1"
        assert store.read(f"{scratch}/b") == "two words"
        assert sorted(store.list(scratch)) == ["a", "b"]
        store.remove(f"{scratch}/a")
        assert store.read(f"{scratch}/a") is None
        assert store.read(f"{scratch}/a", "gone") == "gone"
    # a second connection sees what the first wrote
    with XenStore() as other:
        assert other.read(f"{scratch}/b") == "two words"


def test_watch_sees_another_clients_write(scratch):
    with XenStore() as watcher, watcher.watch(scratch, "tok1") as watch:
        watch.skip_initial()  # xenstored fires every new watch once

        def writer() -> None:
            with XenStore() as other:
                other.write(f"{scratch}/key", "value")

        thread = threading.Thread(target=writer)
        thread.start()
        path, token = watch.next(timeout=20)
        thread.join()
        assert (path, token) == (f"{scratch}/key", "tok1")
        assert watcher.read(path) == "value"
        with pytest.raises(TimeoutError):
            watch.next(timeout=0.5)  # nothing else changed


def test_dom0_has_name_and_domid():
    with XenStore() as store:
        assert store.read("/local/domain/0/name") == "Domain-0"
        assert store.read("/local/domain/0/domid") == "0"


def test_missing_socket_is_a_clear_error(tmp_path):
    with pytest.raises(XenStoreError, match="does not exist"):
        XenStore(tmp_path / "no-socket")
