"""Copies of paged-out pages held in RAM for the next wake: one budget for every domain of a process, and a page
whose content several domains hold is held once.

Pure engine (no I/O). Why it exists: a wake whose prefetch reads its pages from RAM instead of the page store is
several times faster (docs/xen.md, "Staged copies"), but hundreds of idle VMs each holding ~1,000 pages would
cost the memory that paging them out freed. So:

- each owner (one domain's pager) says which pages it wants held, most wanted first (``want``), at most
  ``per_owner`` of them, and offers their contents as it has them (``hold``);
- all owners' copies together hold at most ``budget`` distinct contents. Guests of one image have many identical
  pages in their wake sets (the same kernel code runs the same event); a content held for several owners is one
  bytes object. The index is a dict keyed by the content itself: Python hashes the bytes and, on a hash match,
  compares them in full, so two different pages never share a copy (the poster's content hash + compare);
- when a new content would go over the budget, room is made in the copies of the owners that said what they
  want longest ago, least wanted pages first, and only among contents no one else holds (dropping a shared
  content frees nothing). Owners ask at page-out time, so the longest ago is the longest idle, and idle periods
  are heavy-tailed (Golding et al., "Idleness is not sloth"): the least likely to wake next. An owner never
  makes room in the copies of one that asked after it; when nothing can go, the new content is not held and that
  page is read from the store on the wake, as it would be without staging.

Thread-safe: the ring, event and manager threads of several pagers share one instance.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Hashable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class StagingStats:
    owners: int  # owners holding at least one copy
    pages: int  # (owner, page) pairs held
    contents: int  # distinct contents behind them: the RAM used, in pages
    budget: int
    evicted: int  # copies dropped to make room for another owner's (since the start)
    refused: int  # copies not held: no room could be made

    @property
    def pages_saved(self) -> int:
        """Pages of RAM that holding each identical content once saves."""
        return self.pages - self.contents


class _Content:
    """One distinct page content and how many (owner, page) pairs hold it."""

    __slots__ = ("data", "holders")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.holders = 0


class StagedCopies:
    """The copies, their owners' wishes and the budget (see the module's docstring)."""

    def __init__(self, budget: int, per_owner: int) -> None:
        if budget < 1 or per_owner < 1:
            raise ValueError(f"budget and per_owner must be at least 1 page (got {budget}, {per_owner})")
        self.budget = budget
        self.per_owner = per_owner
        self._wanted: dict[Hashable, dict[int, int]] = {}  # owner -> page -> rank (0: most wanted), in rank order
        self._held: dict[Hashable, dict[int, _Content]] = {}  # owner -> page -> its content
        self._contents: dict[bytes, _Content] = {}  # the index: content -> the one held copy
        self._asked: dict[Hashable, int] = {}  # owner -> when it last said what it wants (a sequence number)
        self._clock = itertools.count()
        self._evicted = 0
        self._refused = 0
        self._lock = threading.Lock()

    # -- an owner's side

    def want(self, owner: Hashable, pages: Iterable[int]) -> list[int]:
        """Replace what ``owner`` wants held with these pages, most wanted first (the first ``per_owner`` of them);
        copies it holds of pages it no longer wants are dropped. Returns the pages now wanted, in rank order."""
        wanted = list(dict.fromkeys(int(p) for p in pages))[:self.per_owner]
        with self._lock:
            ranks = {page: rank for rank, page in enumerate(wanted)}
            self._wanted[owner] = ranks
            self._asked[owner] = next(self._clock)
            held = self._held.setdefault(owner, {})
            for page in [p for p in held if p not in ranks]:
                self._drop(owner, page)
        return wanted

    def wants(self, owner: Hashable, page: int) -> bool:
        return page in self._wanted.get(owner, ())

    def hold(self, owner: Hashable, page: int, data: bytes) -> bool:
        """Hold ``data`` as the copy of ``page`` for ``owner`` if it wants that page; False if it does not, or if
        the budget is full and no room could be made. A copy it held already is replaced."""
        data = bytes(data)  # (the same object if it is bytes already)
        with self._lock:
            if page not in self._wanted.get(owner, ()):
                return False
            held = self._held[owner]
            if page in held:
                if held[page].data == data:
                    return True
                self._drop(owner, page)
            content = self._contents.get(data)
            if content is None:
                if len(self._contents) >= self.budget and not self._make_room(owner):
                    self._refused += 1
                    return False
                content = self._contents[data] = _Content(data)
            content.holders += 1
            held[page] = content
            return True

    def get(self, owner: Hashable, page: int) -> bytes | None:
        """The copy ``owner`` holds of ``page``, or None."""
        content = self._held.get(owner, {}).get(page)
        return None if content is None else content.data

    def release(self, owner: Hashable, page: int) -> None:
        """Drop the copy of a page that is back in its guest (which may change it from now on). It stays wanted:
        the owner's next page-out holds it again."""
        with self._lock:
            if page in self._held.get(owner, ()):
                self._drop(owner, page)

    def forget(self, owner: Hashable) -> None:
        """Drop everything of ``owner`` (its domain is gone, or its pager closed)."""
        with self._lock:
            for page in list(self._held.get(owner, ())):
                self._drop(owner, page)
            self._held.pop(owner, None)
            self._wanted.pop(owner, None)
            self._asked.pop(owner, None)

    def held(self, owner: Hashable) -> dict[int, bytes]:
        """A snapshot of ``owner``'s copies: page -> content."""
        with self._lock:
            return {page: content.data for page, content in self._held.get(owner, {}).items()}

    def held_count(self, owner: Hashable) -> int:
        return len(self._held.get(owner, ()))

    def stats(self) -> StagingStats:
        with self._lock:
            return StagingStats(owners=sum(1 for held in self._held.values() if held),
                                pages=sum(len(held) for held in self._held.values()),
                                contents=len(self._contents), budget=self.budget,
                                evicted=self._evicted, refused=self._refused)

    # -- inside (the lock held)

    def _drop(self, owner: Hashable, page: int) -> None:
        content = self._held[owner].pop(page)
        content.holders -= 1
        if content.holders == 0:
            del self._contents[content.data]

    def _make_room(self, asking: Hashable) -> bool:
        """Drop unshared copies of owners that asked before ``asking``, the longest ago first and each one's least
        wanted first, until a new content fits. It frees a little more than one (1/64 of the budget) so that a
        page-out offering many new contents does not walk the owners once for each."""
        target = self.budget - max(1, self.budget // 64)
        asked_at = self._asked[asking]
        older = sorted((o for o in self._held if self._held[o] and self._asked[o] < asked_at), key=self._asked.get)
        for owner in older:
            held = self._held[owner]
            for page in reversed(self._wanted[owner]):  # rank order reversed: least wanted first
                if len(self._contents) <= target:
                    return True
                content = held.get(page)
                if content is not None and content.holders == 1:
                    self._drop(owner, page)
                    self._evicted += 1
        return len(self._contents) < self.budget
