"""Fast tier: the staged copies (xenswap.core.staging): what an owner wants bounds what it holds, identical
contents are held once across owners, the budget is never exceeded, and room is made in the longest idle owner's
least wanted unshared copies only."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenswap.core.staging import StagedCopies

PAGE = 4096


def page(seed: int) -> bytes:
    return seed.to_bytes(8, "little") * (PAGE // 8)


def test_only_wanted_pages_are_held_and_a_new_wish_replaces_the_old():
    copies = StagedCopies(budget=100, per_owner=3)
    assert copies.want("a", [5, 6, 5, 7, 8]) == [5, 6, 7]  # duplicates once, the first per_owner
    assert not copies.hold("a", 8, page(8)) and copies.get("a", 8) is None
    assert not copies.hold("b", 5, page(5))  # b wants nothing
    assert all(copies.hold("a", p, page(p)) for p in (5, 6, 7))
    assert copies.held("a") == {5: page(5), 6: page(6), 7: page(7)}
    copies.want("a", [7, 9])
    assert copies.held("a") == {7: page(7)}
    assert copies.stats().contents == 1


def test_identical_contents_of_two_owners_are_one_object():
    copies = StagedCopies(budget=100, per_owner=10)
    copies.want("a", [1, 2])
    copies.want("b", [1, 3])
    assert copies.hold("a", 1, page(42)) and copies.hold("a", 2, page(2))
    assert copies.hold("b", 1, bytearray(page(42))) and copies.hold("b", 3, page(42))  # any bytes-like offer
    assert copies.get("a", 1) is copies.get("b", 1) is copies.get("b", 3)
    stats = copies.stats()
    assert (stats.owners, stats.pages, stats.contents, stats.pages_saved) == (2, 4, 2, 2)
    copies.release("a", 1)  # back in a's guest: a's copy goes, b's stays
    assert copies.get("a", 1) is None and copies.get("b", 1) == page(42) and copies.wants("a", 1)
    copies.forget("b")
    assert copies.stats().contents == 1 and copies.held("b") == {} and not copies.wants("b", 1)


def test_a_page_held_again_with_new_content_replaces_its_copy():
    copies = StagedCopies(budget=100, per_owner=10)
    copies.want("a", [1])
    copies.hold("a", 1, page(1))
    copies.hold("a", 1, page(2))
    assert copies.get("a", 1) == page(2) and copies.stats().contents == 1


def test_room_is_made_in_the_longest_idle_owners_least_wanted_unshared_copies():
    copies = StagedCopies(budget=64, per_owner=64)
    copies.want("old", range(40))  # rank 0 = page 0 most wanted
    for p in range(40):
        assert copies.hold("old", p, page(p))
    copies.want("older-still-asking-later", [])  # (an owner that holds nothing is never a victim)
    copies.want("new", range(100, 130))
    # page 39 of "old" is shared with "new": dropping it frees nothing, so it stays
    assert copies.hold("new", 100, page(39))
    for p in range(101, 130):
        assert copies.hold("new", p, page(p))
    stats = copies.stats()
    assert stats.contents <= 64 and stats.refused == 0 and stats.evicted > 0
    old = copies.held("old")
    assert 39 in old  # shared
    kept = sorted(p for p in old if p != 39)
    assert kept == list(range(len(kept)))  # the most wanted of "old" are the ones left
    assert copies.held_count("new") == 30


def test_an_owner_never_makes_room_in_a_later_owners_copies():
    copies = StagedCopies(budget=8, per_owner=8)
    copies.want("first", range(8))
    copies.want("second", range(8))
    for p in range(8):
        assert copies.hold("second", p, page(100 + p))
    assert not copies.hold("first", 0, page(0))  # full, and "second" asked later
    stats = copies.stats()
    assert (stats.refused, stats.evicted, stats.contents) == (1, 0, 8)
    assert copies.held_count("second") == 8


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at least 1 page"):
        StagedCopies(budget=0, per_owner=1)


operations = st.lists(st.tuples(st.sampled_from(["want", "hold", "hold", "hold", "offer", "release", "forget"]),
                                st.integers(0, 2),  # owner
                                st.lists(st.integers(0, 30), min_size=1, max_size=12),  # pages (want) or a choice
                                st.integers(0, 12)),  # content seed: few seeds, so contents repeat
                      max_size=200)


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(1, 12), st.integers(1, 8))
def test_invariants_under_any_sequence(ops, budget, per_owner):
    """Whatever happens: at most ``budget`` contents; each held page is wanted; every held copy is the content
    offered last for it (or gone); the index's holder counts match the holders."""
    copies = StagedCopies(budget=budget, per_owner=per_owner)
    last_offer: dict[tuple[int, int], bytes] = {}
    wanted: dict[int, list[int]] = {}
    for op, owner, pages, seed in ops:
        if op == "want":
            wanted[owner] = copies.want(owner, pages)
        elif op in ("hold", "offer"):  # hold: a page the owner wants; offer: any page (mostly refused)
            choice = wanted.get(owner) or pages if op == "hold" else pages
            target = choice[pages[0] % len(choice)]
            if copies.hold(owner, target, page(seed)):
                last_offer[owner, target] = page(seed)
        elif op == "release":
            copies.release(owner, pages[0])
        elif op == "forget":
            copies.forget(owner)
            wanted.pop(owner, None)
        stats = copies.stats()
        assert stats.contents <= budget
        everything = {(o, p): d for o in range(3) for p, d in copies.held(o).items()}
        assert all(copies.wants(o, p) for o, p in everything)
        assert all(last_offer[key] == data for key, data in everything.items())
        assert stats.pages == len(everything) and stats.contents == len(set(everything.values()))
        assert all(copies.held_count(o) <= per_owner for o in range(3))


def test_threads_offering_the_same_contents_leave_consistent_counts():
    copies = StagedCopies(budget=10_000, per_owner=1_000)
    for owner in range(4):
        copies.want(owner, range(1_000))

    def offer(owner: int) -> None:
        for p in range(1_000):
            copies.hold(owner, p, page(p % 50))
            if p % 7 == 0:
                copies.release(owner, p)

    threads = [threading.Thread(target=offer, args=(owner,)) for owner in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = copies.stats()
    assert stats.pages == 4 * (1_000 - len(range(0, 1_000, 7))) and stats.contents == 50
    for owner in range(4):
        copies.forget(owner)
    assert copies.stats().contents == 0
