"""Fixtures for the net tests: real namespaces and devices, always removed, and a check that nothing is left."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from netutil import ours, wait_until_gone

from xenswap.net import build, kernel
from xenswap.net.kernel import NetError
from xenswap.net.topology import Topology, parse


@pytest.fixture
def nothing_left() -> Iterator[tuple[set[str], set[str]]]:
    """Asserts after the test that our namespaces and host devices are exactly as before (i.e. none)."""
    before = ours()
    yield before
    assert wait_until_gone(before) == before


@pytest.fixture
def topologies(nothing_left) -> Iterator[Callable[[str], Topology]]:
    """apply(text) -> Topology; everything applied is destroyed at the end, even when the test fails."""
    applied: list[str] = []

    def apply(text: str) -> Topology:
        topology = parse(text, source="test", features=kernel.probe())
        applied.append(topology.name)
        build.apply(topology, text)
        return topology

    yield apply
    for name in reversed(applied):
        try:
            build.destroy_topology(name)
        except NetError:
            pass
