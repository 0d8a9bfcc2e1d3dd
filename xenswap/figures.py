"""The manager's published per-domain figures, so ``xenswap list`` in any shell shows what the manager knows."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from xenswap.config import state_dir
from xenswap.hv.base import DomainInfo


class DomainFigures:
    """The manager's published per-domain figures (sqlite, WAL: readers never block the manager)."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS domain_figures (
            hv TEXT NOT NULL, name TEXT NOT NULL,
            resident_mib REAL, wss_mib REAL, idle_since REAL, updated REAL NOT NULL,
            PRIMARY KEY (hv, name))
    """

    def __init__(self, path: Path | None = None):
        self.path = path or state_dir() / "manager.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(self.SCHEMA)

    def publish(self, hv: str, domains: list[DomainInfo]) -> None:
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM domain_figures WHERE hv = ?", (hv,))
            self.db.executemany(
                "INSERT INTO domain_figures VALUES (?, ?, ?, ?, ?, ?)",
                [(hv, d.name, d.resident_mib, d.wss_mib, d.idle_since, now) for d in domains],
            )

    def fill(self, hv: str, domains: list[DomainInfo]) -> list[DomainInfo]:
        """Fill the columns a port leaves empty with the manager's latest figures."""
        rows = {
            name: (res, wss, idle)
            for name, res, wss, idle in self.db.execute(
                "SELECT name, resident_mib, wss_mib, idle_since FROM domain_figures WHERE hv = ?", (hv,)
            )
        }
        for dom in domains:
            res, wss, idle = rows.get(dom.name, (None, None, None))
            dom.resident_mib = dom.resident_mib if dom.resident_mib is not None else res
            dom.wss_mib = dom.wss_mib if dom.wss_mib is not None else wss
            dom.idle_since = dom.idle_since if dom.idle_since is not None else idle
        return domains

    def close(self) -> None:
        self.db.close()
