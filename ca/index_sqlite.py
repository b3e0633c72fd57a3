"""The SQLite engine: one file (default DIR/ca.db), WAL mode, writers queue on ``BEGIN IMMEDIATE``."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from ca.errors import InputError
from ca.index import SQLITE, Conflict, Index

BUSY_TIMEOUT_S = 60.0  # generous: two admins issuing at once queue for a moment instead of failing


class SqliteTransaction:
    engine = SQLITE

    def __init__(self, db: sqlite3.Connection, path: Path):
        self.db = db
        self.path = path

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self.db.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise Conflict(str(exc)) from None

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> sqlite3.Cursor:
        return self.db.executemany(sql, rows)

    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[sqlite3.Row]:
        """SQLite steps through the result as it is read (one snapshot for the whole statement)."""
        yield from self.db.execute(sql, params)

    @contextmanager
    def savepoint(self, name: str) -> Iterator[None]:
        """A nested transaction: an exception rolls back what it did, and the outer one stays usable."""
        self.db.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self.db.execute(f"ROLLBACK TO {name}")
            self.db.execute(f"RELEASE {name}")
            raise
        self.db.execute(f"RELEASE {name}")


class SqliteIndex(Index):
    engine = SQLITE

    def __init__(self, path: Path):
        super().__init__(f"sqlite://{Path(path).absolute()}")
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.is_file()

    @contextmanager
    def reading(self) -> Iterator[SqliteTransaction]:
        if not self.path.is_file():
            raise InputError(f"no CA index at {self.path}: run 'ca init --trust-domain TD' first")
        try:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise InputError(f"cannot open {self.path}: {exc}") from None
        db.row_factory = sqlite3.Row
        try:
            yield SqliteTransaction(db, self.path)
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{self.path}: {exc}") from None
        finally:
            db.close()

    @contextmanager
    def transaction(self) -> Iterator[SqliteTransaction]:
        with self.reading() as tx:
            tx.db.execute("BEGIN IMMEDIATE")
            try:
                yield tx
            except BaseException:
                tx.db.execute("ROLLBACK")
                raise
            tx.db.execute("COMMIT")

    @staticmethod
    def create_at(path: Path, setup) -> None:
        """Build a new index file at ``path`` (WAL mode) with ``setup(tx)``; the caller moves it into place."""
        with closing_connection(path) as db:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: recorded in the file header
            db.execute("BEGIN IMMEDIATE")
            setup(SqliteTransaction(db, path))
            db.execute("COMMIT")

    def _tables(self, db: SqliteTransaction) -> set[str]:
        return {row["name"] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@contextmanager
def closing_connection(path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(path, isolation_level=None)
    db.row_factory = sqlite3.Row
    try:
        yield db
    finally:
        db.close()
