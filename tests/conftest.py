"""Shared test set-up: every test session gets its own state and run directories (the download/image
cache is shared on purpose, so guest images and Xen builds are made once per machine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_dirs(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("xenswap")
    os.environ["XENSWAP_STATE"] = str(base / "state")
    os.environ["XENSWAP_RUN"] = str(base / "run")
    os.environ.setdefault("XENSWAP_CACHE", "/var/cache/xenswap")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """dom0 tests only make sense inside the nested Xen rig's dom0; elsewhere they are deselected
    (the rig tier runs them there and asserts on their outcome)."""
    in_dom0 = Path("/proc/xen/capabilities").exists() and "control_d" in Path(
        "/proc/xen/capabilities"
    ).read_text()
    if in_dom0:
        return
    kept = [i for i in items if "dom0" not in i.keywords]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if "dom0" in i.keywords])
        items[:] = kept
