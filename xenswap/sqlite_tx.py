"""One helper for the project's explicit SQLite transactions (``BEGIN IMMEDIATE`` ... ``COMMIT``)."""

from __future__ import annotations

import sqlite3


def rollback(db: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already done so.

    Why: on some errors (SQLITE_FULL "database or disk is full", SQLITE_IOERR, SQLITE_NOMEM) SQLite rolls the
    whole transaction back itself; a ROLLBACK then fails with "cannot rollback - no transaction is active", and
    that second error replaced the real one (seen with a full dom0 /tmp under the Xen pager's page store)."""
    if db.in_transaction:
        db.execute("ROLLBACK")
