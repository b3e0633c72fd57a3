"""The PostgreSQL engine: one database shared by every ``ca serve`` replica and every admin's ``ca``.

Connections come from a psycopg pool (checked before each use, so a restarted server is reconnected
to on the next request). Each write transaction takes the advisory lock ``WRITE_LOCK`` first, for
the rest of the transaction: writers run one at a time across all replicas, as with SQLite's
``BEGIN IMMEDIATE``, and a transaction cut off by a lost connection is rolled back by the server,
never half-applied. A lost or unreachable server is ``DatabaseUnavailable``.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from ca.errors import InputError
from ca.index import POSTGRESQL, Conflict, DatabaseUnavailable, Index

WRITE_LOCK = 0x6D746C73  # "mtls": the advisory lock key every write transaction holds
POOL_SIZE = 10  # ca serve runs at most 8 worker threads at once, plus its state watcher
STREAM_BATCH = 250  # rows per round trip of PostgresTransaction.stream (about 1 KiB each in Python)
CONNECT_TIMEOUT_S = 3.0  # how long a request waits for a connection before it is answered 503

# The pool reports failed connection attempts through logging; ours are reported as DatabaseUnavailable.
logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())
logging.getLogger("psycopg.pool").propagate = False


class PostgresTransaction:
    engine = POSTGRESQL

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        try:
            return self.conn.execute(sql.replace("?", "%s"), params)
        except psycopg.errors.UniqueViolation as exc:
            raise Conflict(str(exc)) from None

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> psycopg.Cursor:
        cursor = self.conn.cursor()
        cursor.executemany(sql.replace("?", "%s"), rows)
        return cursor

    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[dict[str, Any]]:
        """A server-side cursor, read STREAM_BATCH rows at a time, in a read transaction of its own (or
        the caller's)."""
        with self.conn.transaction(), self.conn.cursor(name="ca_stream") as cursor:
            cursor.itersize = STREAM_BATCH
            cursor.execute(sql.replace("?", "%s"), params)
            yield from cursor

    @contextmanager
    def savepoint(self, name: str) -> Iterator[None]:
        self.conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self.conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
            self.conn.execute(f"RELEASE SAVEPOINT {name}")
            raise
        self.conn.execute(f"RELEASE SAVEPOINT {name}")


class PostgresIndex(Index):
    engine = POSTGRESQL

    def __init__(self, url: str):
        super().__init__(url)
        self._pool: ConnectionPool | None = None
        self._opening = threading.Lock()

    def _connections(self) -> ConnectionPool:
        with self._opening:
            if self._pool is None:
                pool = ConnectionPool(
                    self.url, min_size=1, max_size=POOL_SIZE, open=False, timeout=CONNECT_TIMEOUT_S,
                    kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": int(CONNECT_TIMEOUT_S)},
                    check=ConnectionPool.check_connection, name="ca-index",
                )
                try:
                    pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
                except PoolTimeout:
                    pool.close()
                    raise DatabaseUnavailable(f"cannot connect to {self}: {self._why_not()}") from None
                self._pool = pool
            return self._pool

    def _why_not(self) -> str:
        """The server's (or the network's) reason for refusing a connection, as one line."""
        try:
            psycopg.connect(self.url, connect_timeout=int(CONNECT_TIMEOUT_S)).close()
        except psycopg.Error as exc:
            return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"no connection within {CONNECT_TIMEOUT_S:g} s"

    def close(self) -> None:
        with self._opening:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection; any failure of the database becomes one clear CaError."""
        try:
            with self._connections().connection() as conn:
                yield conn
        except PoolTimeout:
            raise DatabaseUnavailable(
                f"the CA database {self} is unavailable (no connection within {CONNECT_TIMEOUT_S:g} s)"
            ) from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DatabaseUnavailable(f"the CA database {self} is unavailable: {detail}") from None
        except psycopg.Error as exc:
            raise InputError(f"{self}: {str(exc).strip().splitlines()[0]}") from None

    @contextmanager
    def reading(self) -> Iterator[PostgresTransaction]:
        with self._connection() as conn:
            yield PostgresTransaction(conn)

    @contextmanager
    def transaction(self) -> Iterator[PostgresTransaction]:
        with self._connection() as conn:
            conn.execute("BEGIN")
            try:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                yield PostgresTransaction(conn)
            except BaseException:
                if not conn.closed:
                    try:
                        conn.execute("ROLLBACK")
                    except psycopg.Error:
                        pass  # the connection broke: the server has rolled back already
                raise
            conn.execute("COMMIT")

    def exists(self) -> bool:
        with self.reading() as db:
            return self.exists_in(db)

    def exists_in(self, db: PostgresTransaction) -> bool:
        if "meta" not in self._tables(db):
            return False
        return db.execute("SELECT 1 FROM meta WHERE key = 'trust_domain'").fetchone() is not None

    def _tables(self, db: PostgresTransaction) -> set[str]:
        rows = db.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        return {row["tablename"] for row in rows}
