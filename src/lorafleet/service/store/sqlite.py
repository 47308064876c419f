"""``SQLiteStore``: the embedded default, one file (``sqlite:///DATA_DIR/lorafleet.db``) shared by the
processes of one machine.

WAL mode: readers never block the writer, and API processes and workers can all hold the file open. One
connection per thread (sqlite3 connections are not shared across threads); writes take the write lock up
front (``BEGIN IMMEDIATE``), so two processes never deadlock upgrading a read lock, and every write
transaction excludes all others: claims and fenced writes need no row locks here.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._sql import SQLStore
from .base import StoreUnavailable
from .migrations import Dialect

__all__ = ["SQLiteStore"]


_BUSY_S = 30.0  # how long a connection waits for another one's lock


def _set_wal(conn: sqlite3.Connection) -> None:
    """Put the file in WAL mode (persistent: a no-op once any connection has done it).

    Switching a new file's journal mode needs its exclusive lock, and SQLite answers "database is locked"
    at once, without waiting out the busy timeout, when another connection holds a lock then (processes of
    a fleet opening a new store together): so the switch is retried here, for as long as that timeout.
    """
    deadline = time.monotonic() + _BUSY_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class _SQLiteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, args: tuple | list = ()) -> int:
        return self._conn.execute(sql, tuple(args)).rowcount

    def query(self, sql: str, args: tuple | list = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self._conn.execute(sql, tuple(args)).fetchall()]


class SQLiteStore(SQLStore):
    """``Store`` on one SQLite file (see the module docstring)."""

    NOW = "((julianday('now') - 2440587.5) * 86400.0)"
    SKIP_LOCKED = ""
    ROW_LOCK = ""
    DIALECT = Dialect(
        id="INTEGER PRIMARY KEY AUTOINCREMENT", int="INTEGER", real="REAL",
        spec_model="json_extract(spec, '$.model')",
    )  # fmt: skip

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._migrate()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=_BUSY_S, isolation_level=None)
                conn.row_factory = sqlite3.Row
                _set_wal(conn)
                # NORMAL is durable in WAL mode against process crashes (SIGKILL); FULL would add an fsync
                # per commit, needed only against power loss.
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(f"PRAGMA busy_timeout={int(_BUSY_S * 1000)}")
            except sqlite3.OperationalError as e:
                raise StoreUnavailable(f"cannot open {self.path}: {e}") from e
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[_SQLiteTx]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:  # locked past busy_timeout, disk gone...
            raise StoreUnavailable(f"{self.path}: {e}") from e
        try:
            yield _SQLiteTx(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _read(self, sql: str, args: tuple | list = ()) -> list[dict[str, Any]]:
        try:
            return [dict(r) for r in self._conn().execute(sql, tuple(args)).fetchall()]
        except sqlite3.OperationalError as e:
            if "no such" in str(e) or "syntax" in str(e):
                raise
            raise StoreUnavailable(f"{self.path}: {e}") from e
