"""The small record of what xenswap built: one sqlite file under state_dir()/net.

A topology gets a short number (tid) when first applied; every kernel object it owns carries it in its
name (namespaces ``xs<tid>-<node>``, host-side devices ``xs<tid>...``), host-side devices also carry an
ifalias ``xenswap <topology> ...`` and the netdev group ``GROUP_BASE + tid``. ``destroy`` removes exactly those.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from xenswap.config import state_dir

GROUP_BASE = 0x58530000  # "XS" in the high half: netdev groups for our host-side devices
MAX_TID = 999


def db_path() -> Path:
    return state_dir() / "net" / "net.db"


class Store:
    def __init__(self, path: Path | None = None):
        self.path = path or db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS topologies (name TEXT PRIMARY KEY, tid INTEGER UNIQUE NOT NULL, "
            "source TEXT, document TEXT, shaping TEXT NOT NULL DEFAULT '{}', applied REAL)"
        )
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tid(self, name: str) -> int | None:
        row = self.db.execute("SELECT tid FROM topologies WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def allocate(self, name: str, source: str, taken: set[int] | None = None) -> int:
        """The topology's number; a new one avoids numbers recorded here and ``taken`` (numbers whose objects
        exist in the kernel, e.g. made with another state directory)."""
        existing = self.tid(name)
        if existing is not None:
            return existing
        used = {row[0] for row in self.db.execute("SELECT tid FROM topologies")} | (taken or set())
        tid = next((n for n in range(1, MAX_TID + 1) if n not in used), None)
        if tid is None:
            raise RuntimeError(f"more than {MAX_TID} topologies recorded")
        self.db.execute("INSERT INTO topologies (name, tid, source) VALUES (?, ?, ?)", (name, tid, source))
        self.db.commit()
        return tid

    def record_applied(self, name: str, source: str, document: str, shaping: dict[str, str]) -> None:
        self.db.execute(
            "UPDATE topologies SET source = ?, document = ?, shaping = ?, applied = ? WHERE name = ?",
            (source, document, json.dumps(shaping, sort_keys=True), time.time(), name),
        )
        self.db.commit()

    def shaping(self, name: str) -> dict[str, str]:
        row = self.db.execute("SELECT shaping FROM topologies WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else {}

    def forget(self, name: str) -> None:
        self.db.execute("DELETE FROM topologies WHERE name = ?", (name,))
        self.db.commit()

    def entries(self) -> list[dict[str, object]]:
        rows = self.db.execute("SELECT name, tid, source, applied FROM topologies ORDER BY tid").fetchall()
        return [{"name": n, "tid": t, "source": s, "applied": a} for n, t, s, a in rows]

    def document(self, name: str) -> str | None:
        row = self.db.execute("SELECT document FROM topologies WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None
