"""The server's state database: SQLite in WAL mode at the data root (state.db), so jobs and uploads survive a
restart. Each store (server.jobs.store, the Files service) owns its tables and creates them if missing."""
from __future__ import annotations

import sqlite3
from pathlib import Path

BUSY_TIMEOUT_MS = 5000


def connect(path: Path, schema: str = "") -> sqlite3.Connection:
    """A connection in autocommit mode with WAL and foreign keys on; `schema` (CREATE ... IF NOT EXISTS) run once.
    Each connection is used from one thread at a time (check_same_thread off for executor threads)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    if schema:
        db.executescript(schema)
    return db
