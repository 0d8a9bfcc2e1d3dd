"""Staged copies shared by the pagers of one process, on the patched hypervisor (runs in the nested rig's dom0):
two guests of one image hold their identical wake pages once, one budget bounds both, the domain that staged
first gives way, least wanted first, and both still get every frame back byte for byte."""

from __future__ import annotations

import contextlib

import pytest
from paging_helpers import frozen, serving

from xenswap.hv.xen import xl

pytestmark = [pytest.mark.dom0, pytest.mark.usefixtures("patched_xen")]

PER_DOMAIN = 1024
BUDGET = 1280  # one domain's 1,024 and half the other's own pages: the second one's make the first give way


def test_two_guests_hold_identical_staged_pages_once_within_one_budget(pvh_guest, pvh_twin, store):
    from xenswap.core.staging import StagedCopies
    from xenswap.hv.xen.memory import XenMemory

    staging = StagedCopies(BUDGET, PER_DOMAIN)
    with contextlib.ExitStack() as pagers_open:
        pagers = [pagers_open.enter_context(serving(xl.domid(spec.name), store, staging=staging))
                  for spec in (pvh_guest, pvh_twin)]
        first, second = pagers
        for pager in pagers:
            XenMemory(pager.domid, pager).page_out_cold(1.0, intervals=2)
        with contextlib.ExitStack() as paused:
            for pager in pagers:  # from here on no fault brings a chosen frame back (nor changes it) under the test
                paused.enter_context(frozen(pager))
            # A wake set for both: frames out in both, half with the same content in both guests (the image's kernel
            # and files), half with different contents; the same gfns, most wanted first. Every content in it occurs
            # once (per guest, and across the guests but for the identical half), so the counts below are exact: the
            # first guest's 1,024 contents, then the second's 512 new ones, 1,536 in all for a budget of 1,280.
            common = sorted(first.out & second.out)
            before = {pager.key: store.get_pages(pager.key, common) for pager in pagers}
            a, b = before[first.key], before[second.key]
            seen: set[bytes] = set()
            same: list[int] = []
            different: list[int] = []
            for g in common:
                if a[g] in seen or b[g] in seen:
                    continue
                if a[g] == b[g] and len(same) < 512:
                    same.append(g)
                elif a[g] != b[g] and len(different) < 512:
                    different.append(g)
                else:
                    continue
                seen.update((a[g], b[g]))
            print(f"\nout in both {len(common)}: {len(same)} identical and {len(different)} different contents")
            assert len(same) == 512 and len(different) == 512, "two guests of one image: a kernel and files alike"
            wanted = same + different

            with_first = first.stage(wanted)
            assert with_first == PER_DOMAIN and staging.stats().contents == PER_DOMAIN
            second.stage(wanted)  # later: the first one's copies give way
            held = {pager.key: pager.staged() for pager in pagers}
            stats = staging.stats()
            print("staged:", stats, f"saved {stats.pages_saved} pages")
            for pager in pagers:  # every copy is the stored page
                assert all(before[pager.key][g] == copy for g, copy in held[pager.key].items())
            contents = {copy for copies in held.values() for copy in copies.values()}
            assert stats.contents == len(contents) <= BUDGET
            assert stats.pages == sum(len(copies) for copies in held.values())
            assert stats.pages_saved == 512  # each identical page once
            assert len(held[second.key]) == PER_DOMAIN and stats.refused == 0
            assert set(same) <= set(held[first.key])  # shared with the second: dropping it frees nothing
            assert stats.evicted == PER_DOMAIN - len(held[first.key]) > 0
            rank = {g: i for i, g in enumerate(wanted)}
            own = [g for g, copy in held[first.key].items() if copy not in held[second.key].values()]
            dropped = [g for g in wanted if g not in held[first.key]]
            assert max(rank[g] for g in own) < min(rank[g] for g in dropped)  # its least wanted went

            for pager in pagers:
                staged_before = pager.stats.staged_loads
                assert pager.prefetch(wanted) == len(wanted)
                assert pager.stats.staged_loads - staged_before == len(held[pager.key])  # the rest from the store
                assert pager.staged() == {}  # back in the guest: copies released
                with pager.fmem.map(pager.domid, wanted) as mapping:
                    back = [bytes(mapping.page(i)) == before[pager.key][g] for i, g in enumerate(wanted)]
                assert back == [True] * len(wanted)
            assert staging.stats().contents == 0
        for spec in (pvh_guest, pvh_twin):
            assert "alive" in xl.console_command(spec.name, "echo al''ive")
