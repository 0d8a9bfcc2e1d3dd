"""Fast tests of the Xen sharer's pure parts: which merges are safe for Xen 4.17's share_pages(), how candidate
groups are chunked, and the explanations of memshr_control's refusals."""

from __future__ import annotations

import errno

from hypothesis import given
from hypothesis import strategies as st

from xenswap.core.sharing import PageRef
from xenswap.hv.xen.sharer import Frame, ShareReport, explain_control_error, group_chunks, merge_order


def test_single_domain_client_frames_merge_with_any_source_page():
    source = Frame(1, [(1, 10), (2, 20)])
    client = Frame(2, [(1, 11), (1, 12)])
    picks = list(merge_order(source, [client], ShareReport([1, 2])))
    assert picks == [(client, (1, 10), (1, 11))]


def test_two_domain_client_frame_names_a_source_page_in_the_other_domain():
    source = Frame(1, [(2, 20)])
    client = Frame(3, [(2, 21), (3, 31)])
    report = ShareReport([2, 3])
    [(frame, source_page, client_page)] = merge_order(source, [client], report)
    assert frame is client
    assert (source_page, client_page) == ((2, 20), (3, 31))  # Xen locks the p2ms of domains 2 and 3: all of it
    assert report.unsafe_skipped == 0


def test_frames_reaching_beyond_the_two_locked_domains_are_left_alone():
    source = Frame(1, [(1, 10)])
    report = ShareReport([1])
    clients = [Frame(2, [(2, 1), (3, 1)]), Frame(3, [(1, 2), (2, 2), (3, 2)])]
    assert list(merge_order(source, clients, report)) == []
    assert report.unsafe_skipped == 2


frames = st.lists(st.tuples(st.integers(1, 4), st.integers(0, 50)), min_size=1, max_size=6, unique=True)


@given(source_pages=frames, client_pages=st.lists(frames, min_size=1, max_size=5))
def test_every_merge_stays_within_the_domains_xen_locks(source_pages, client_pages):
    source = Frame(0, source_pages)
    clients = [Frame(i + 1, pages) for i, pages in enumerate(client_pages)]
    report = ShareReport([1])
    picks = list(merge_order(source, clients, report))
    for client, source_page, client_page in picks:
        assert source_page in source.pages and client_page in client.pages
        assert client.domains <= {source_page[0], client_page[0]}
    assert len(picks) + report.unsafe_skipped == len(clients)
    # what could be merged safely is merged
    for client in clients:
        safe = len(client.domains) == 1 or (len(client.domains) == 2 and client.domains & source.domains)
        assert (client in [p[0] for p in picks]) == bool(safe)


def test_group_chunks_keep_groups_whole_and_in_order():
    groups = [[PageRef("1", i) for i in range(n)] for n in (3, 700, 2, 2000, 5, 5)]
    chunks = list(group_chunks(groups, 1024))
    assert [g for chunk in chunks for g in chunk] == groups
    assert [sum(len(g) for g in chunk) for chunk in chunks] == [3 + 700 + 2 + 2000, 10]
    assert list(group_chunks([], 1024)) == []


def test_control_refusals_are_explained():
    message = explain_control_error(7, OSError(errno.EOPNOTSUPP, "Operation not supported"))
    assert message.startswith("Xen refuses page sharing for domain 7: the domain is not HVM/PVH")
    assert message.endswith("(EOPNOTSUPP)")
    assert "CONFIG_MEM_SHARING" in explain_control_error(7, OSError(errno.ENOSYS, "Function not implemented"))
    assert "(HAP: EPT/NPT)" in explain_control_error(7, OSError(errno.ENODEV, "No such device"))
    assert "IOMMU" in explain_control_error(7, OSError(errno.EXDEV, "Invalid cross-device link"))
    assert "(EIO)" in explain_control_error(7, OSError(errno.EIO, "Input/output error"))
