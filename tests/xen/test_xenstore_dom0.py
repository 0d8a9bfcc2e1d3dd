"""Real xenstored in the nested dom0, through pyxs over its unix socket."""

from __future__ import annotations

import secrets
import threading

import pytest

from xenswap.hv.xen.xenstore import XenStore, XenStoreError

pytestmark = pytest.mark.dom0


@pytest.fixture
def base():
    path = f"/xenswap-test/{secrets.token_hex(4)}"
    yield path
    with XenStore() as store:
        store.remove(path)


def test_write_read_list_remove(base):
    with XenStore() as store:
        store.write(f"{base}/a", "1")
        store.write(f"{base}/b", "two words")
        assert store.read(f"{base}/a") == "1"
        assert store.read(f"{base}/b") == "two words"
        assert sorted(store.list(base)) == ["a", "b"]
        store.remove(f"{base}/a")
        assert store.read(f"{base}/a") is None
        assert store.read(f"{base}/a", "gone") == "gone"
    # a second connection sees what the first wrote
    with XenStore() as other:
        assert other.read(f"{base}/b") == "two words"


def test_watch_sees_another_clients_write(base):
    with XenStore() as watcher, watcher.watch(base, "tok1") as watch:
        watch.skip_initial()  # xenstored fires every new watch once

        def writer() -> None:
            with XenStore() as other:
                other.write(f"{base}/key", "value")

        thread = threading.Thread(target=writer)
        thread.start()
        path, token = watch.next(timeout=20)
        thread.join()
        assert (path, token) == (f"{base}/key", "tok1")
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
