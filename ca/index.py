"""The index engines behind ``ca.store``: one small interface, SQLite (embedded, the default) and PostgreSQL
(shared by several ``ca serve`` replicas).

``ca --db URL`` / ``$CA_DB`` chooses: ``sqlite:///PATH`` (default ``sqlite:///DIR/ca.db``) or
``postgresql://...``. The SQL of ``ca.store`` is written once, with ``?`` placeholders; an engine
runs it (the PostgreSQL one turns ``?`` into ``%s``), maps a unique-key violation to ``Conflict``
and a lost or unreachable database to ``DatabaseUnavailable`` (``ca serve`` answers it with 503).

Writes: ``Index.transaction()`` is one transaction that has the index to itself for its duration,
so the checks and writes of one operation (a token checked then consumed, a CRL number taken then
used) see no other writer: SQLite takes ``BEGIN IMMEDIATE``; PostgreSQL takes the transaction-level
advisory lock ``WRITE_LOCK`` first thing, which serializes writers across every replica the same way.

Schema: ``MIGRATIONS`` lists every version; meta ``schema_version`` records the one applied.
``upgrade`` applies the missing steps (SQL, then a step's ``fill`` for data SQL cannot compute,
such as each certificate's issuer) in one write transaction and refuses an index newer than
this program knows. An SQLite index made before versions existed counts as version 1 (no tokens
table) or 2 (the release that added tokens).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509

from ca.errors import CaError, InputError

SQLITE = "sqlite"
POSTGRESQL = "postgresql"


class Conflict(Exception):
    """A unique key is taken (e.g. a certificate serial): the caller decides what that means."""


class DatabaseUnavailable(CaError):
    """The database cannot be reached or went away mid-transaction; nothing of the transaction was kept."""

    default_code = "database_unavailable"


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Transaction(Protocol):
    """What ``ca.store`` runs its SQL on. Rows are read by column name (``row["serial"]``)."""

    engine: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Cursor: ...

    def stream(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Any]:
        """The rows of one query, fetched a batch at a time (never the whole result in memory)."""
        ...

    def savepoint(self, name: str): ...


@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    sqlite: str  # SQL script for each engine ("" when a step has nothing to do there)
    postgresql: str
    fill: Callable[[Transaction], None] | None = None  # then fills in what SQL alone cannot (both engines)


def issuer_key(name: x509.Name) -> str:
    """What column ``certs.issuer`` holds for a certificate issued by ``name``: its RFC 4514 string."""
    return name.rfc4514_string()


_FILL_BATCH = 1000


def _fill_issuers(db: Transaction) -> None:
    """Migration 5: read each recorded certificate's issuer once, so that no CRL has to parse them again."""
    last = ""
    while True:
        rows = db.execute(
            "SELECT serial, cert_pem FROM certs WHERE serial > ? ORDER BY serial LIMIT ?", (last, _FILL_BATCH)
        ).fetchall()
        if not rows:
            return
        db.executemany(
            "UPDATE certs SET issuer = ? WHERE serial = ?",
            [
                (issuer_key(x509.load_pem_x509_certificate(row["cert_pem"].encode("ascii")).issuer), row["serial"])
                for row in rows
            ],
        )
        last = rows[-1]["serial"]


MIGRATIONS = (
    Migration(
        1,
        "the certificate index",
        """
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS certs (
            serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, not_before TEXT NOT NULL, not_after TEXT NOT NULL,
            issued_at TEXT NOT NULL, revoked_at TEXT, reason TEXT, cert_pem TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS certs_by_spiffe_id ON certs (spiffe_id);
        """,
        # rowid: the insertion order, which SQLite keeps implicitly ("ORDER BY issued_at, rowid").
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE certs (
            serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, not_before TEXT NOT NULL, not_after TEXT NOT NULL,
            issued_at TEXT NOT NULL, revoked_at TEXT, reason TEXT, cert_pem TEXT NOT NULL,
            rowid BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE
        );
        CREATE INDEX certs_by_spiffe_id ON certs (spiffe_id);
        """,
    ),
    Migration(
        2,
        "enrollment tokens",
        *(
            """
            CREATE TABLE IF NOT EXISTS tokens (
                token_hash TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, cert_ttl_s INTEGER NOT NULL,
                created_at TEXT NOT NULL, expires_at TEXT NOT NULL, used_at TEXT, used_serial TEXT
            );
            """,
        ) * 2,
    ),
    Migration(
        3,
        "parent_serial: the serial of the certificate a renewal replaced",
        *("ALTER TABLE certs ADD COLUMN parent_serial TEXT;",) * 2,
    ),
    Migration(
        4,
        "the CA's shared files (certificates, encrypted keys, bundle, CRL), for replicas on PostgreSQL",
        "",
        "CREATE TABLE files (name TEXT PRIMARY KEY, data BYTEA NOT NULL);",
    ),
    Migration(
        5,
        "issuer: the issuing CA's name, and indexes of the revoked and of renewals, for CRLs and bulk revocation"
        " without reading every certificate",
        *(
            """
            ALTER TABLE certs ADD COLUMN issuer TEXT;
            CREATE INDEX certs_revoked ON certs (issuer, revoked_at) WHERE revoked_at IS NOT NULL;
            CREATE INDEX certs_by_parent ON certs (parent_serial) WHERE parent_serial IS NOT NULL;
            """,
        ) * 2,
        fill=_fill_issuers,
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


class Index:
    """One CA index. Subclasses connect; this class holds what both engines share."""

    engine: str

    def __init__(self, url: str):
        self.url = url

    def __str__(self) -> str:
        return redact(self.url)

    @contextmanager
    def reading(self) -> Iterator[Transaction]:
        """A connection for reads (each statement sees the latest commit)."""
        raise NotImplementedError

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One write transaction holding the index's write lock; rolled back on any exception."""
        raise NotImplementedError

    def exists(self) -> bool:
        """True if a CA's index is here (its meta table holds a trust domain)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections (a pool); the index is not used afterwards."""

    def _tables(self, db: Transaction) -> set[str]:
        raise NotImplementedError

    # --- schema ----------------------------------------------------------------------------------

    def schema_version(self, db: Transaction) -> int:
        """The version this index is at; 0 for an empty database."""
        tables = self._tables(db)
        if "meta" not in tables:
            return 0
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is not None:
            return int(row["value"])
        return 2 if "tokens" in tables else 1  # an SQLite index made before versions were recorded

    def upgrade(self, db: Transaction) -> int:
        """Apply the missing migrations inside ``db`` (a write transaction); return the version found.

        Raises InputError for an index newer than this program."""
        found = self.schema_version(db)
        if found > SCHEMA_VERSION:
            raise InputError(
                f"the CA index {self} has schema version {found}, but this ca knows versions up to "
                f"{SCHEMA_VERSION}: run a newer ca against it"
            )
        for step in MIGRATIONS[found:]:
            script = step.sqlite if self.engine == SQLITE else step.postgresql
            for statement in filter(str.strip, script.split(";")):
                db.execute(statement)
            if step.fill is not None:
                step.fill(db)
        if found < SCHEMA_VERSION:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
        return found


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))


def engine_of(url: str) -> str:
    """``sqlite`` or ``postgresql``; InputError names the URL forms understood."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite" and url.startswith("sqlite:///"):
        return SQLITE
    if scheme in ("postgresql", "postgres"):
        return POSTGRESQL
    raise InputError(
        f"--db {redact(url)!r}: give sqlite:///PATH (e.g. sqlite:///var/lib/ca/ca.db) or postgresql://USER@HOST/DB"
    )
