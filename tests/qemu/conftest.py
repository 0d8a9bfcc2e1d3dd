"""Safety net for the QEMU tests: whatever VM a failed test left in this session's private state directory is
destroyed (QEMU killed, tap removed) when the module ends."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="module")
def _destroy_leftover_vms() -> Iterator[None]:
    yield
    from xenswap.hv.qemu.vm import list_vms

    for vm in list_vms():
        with contextlib.suppress(Exception):
            vm.destroy()
