"""The state directory: CA certificates and keys as files, issued certificates in an index (SQLite or PostgreSQL).

Layout of DIR (mode 0700)::

    root.pem  root.key            the root (its key is only used by init and rotate)
    intermediate.pem  intermediate.key   the online CA that signs leaves and the CRL
    bundle.pem                    the trust roots to hand to every sidecar (several after a rotation)
    crl.pem                       the current CRL(s), rewritten on every revoke and by `ca crl`
    ca.db                         SQLite: `meta` (trust domain, key type, CRL number, generation),
                                  `certs` (the issued-certificate index), `tokens` (enrollment tokens)
    generations/N/                after `ca rotate`: the four CA files of generation N, kept so that
                                  its intermediate can still sign CRLs for the leaves it issued

Generations: `ca init` makes generation 1; each `ca rotate` archives the current root and
intermediate under generations/N/ and puts generation N+1 in their place. A generation is *live*
while its root is still in bundle.pem (until `ca bundle --drop-old`): sidecars trust its leaves,
so its intermediate keeps signing a CRL for them.

Keys are created with mode 0600 from their first byte and appear under their final name only once
complete (temporary file, fsync, rename or link, fsync of the directory). `ca.db` is the last file
init creates, so its presence means "a CA lives here".

Concurrency: every write is one transaction that has the index to itself (SQLite: ``BEGIN
IMMEDIATE`` under a generous busy timeout; PostgreSQL: an advisory lock, see ``ca.index``), so two
admins or replicas writing at once queue for a moment instead of losing a record. Serial numbers are
the primary key: a collision is detected, never silently overwritten.

PostgreSQL (``ca --db postgresql://...``): the database holds the index *and* the CA's shared files
(the certificates, the keys as written, encrypted when there is a passphrase, bundle.pem, crl.pem,
generations/N/), so that several ``ca serve`` replicas on several machines act as one CA. A write
transaction that changed any of those files stores them in table ``files`` before it commits;
``sync_shared_files`` (on every open, and every second in ``ca serve``) brings DIR up to date from
it. DIR is then a per-machine copy: an empty directory is enough for a new replica.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ca.authority import Issuer, PrivateKey, Revocation, format_serial, format_time
from ca.errors import InputError, Refused
from ca.index import (
    POSTGRESQL,
    SCHEMA_VERSION,
    Conflict,
    Index,
    Transaction,
    engine_of,
    issuer_key,
)
from ca.index_postgres import PostgresIndex
from ca.index_sqlite import SqliteIndex
from ca.keycrypt import KDF_ROUNDS, encrypted_pkcs8_pem, kdf_rounds
from mtls.files import KEY_MODE, PUBLIC_MODE, fsync_directory, write_atomically
from mtls.spiffe import IdPattern

DB_NAME = "ca.db"
ROOT_CERT = "root.pem"
ROOT_KEY = "root.key"
INTERMEDIATE_CERT = "intermediate.pem"
INTERMEDIATE_KEY = "intermediate.key"
BUNDLE = "bundle.pem"
CRL = "crl.pem"
GENERATIONS = "generations"
CA_FILES = (ROOT_CERT, ROOT_KEY, INTERMEDIATE_CERT, INTERMEDIATE_KEY)
SHARED_FILES = (*CA_FILES, BUNDLE, CRL)  # plus generations/N/ of CA_FILES; in the database with PostgreSQL

VALID = "valid"
EXPIRED = "expired"
REVOKED = "revoked"
_IN_LIST = 500  # values per SQL IN (...) list

def _parse_time(text: str) -> datetime:
    """A time as ``format_time`` stored it (``2026-11-28T10:00:00Z``): aware, UTC. (fromisoformat: 30 times
    faster than strptime, which was half the cost of reading 100,000 revocations for a CRL.)"""
    return datetime.fromisoformat(text)


@dataclass(frozen=True)
class CaGeneration:
    """One root and its intermediate. The current one lives in DIR itself, older ones in DIR/generations/N."""

    number: int
    directory: Path
    root: x509.Certificate
    intermediate: x509.Certificate
    current: bool


@dataclass(frozen=True, slots=True)
class Token:
    """An enrollment token as the index knows it (never the token itself)."""

    spiffe_id: str
    cert_ttl_s: int
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    used_serial: str | None


@dataclass(frozen=True, slots=True)
class Record:
    """One issued certificate as the index knows it."""

    serial: int
    spiffe_id: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    revoked_at: datetime | None
    reason: str | None
    parent_serial: int | None = None  # the certificate this one renewed (None: issued or enrolled anew)

    def status(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return REVOKED
        return EXPIRED if now > self.not_after else VALID


def _record(row: Any) -> Record:
    return Record(
        serial=int(row["serial"], 16),
        spiffe_id=row["spiffe_id"],
        not_before=_parse_time(row["not_before"]),
        not_after=_parse_time(row["not_after"]),
        issued_at=_parse_time(row["issued_at"]),
        revoked_at=_parse_time(row["revoked_at"]) if row["revoked_at"] else None,
        reason=row["reason"],
        parent_serial=int(row["parent_serial"], 16) if row["parent_serial"] else None,
    )


def open_index(url: str | None, directory: Path) -> Index:
    """The index at ``url`` (``ca --db``), by default the SQLite file DIR/ca.db."""
    if url is None:
        return SqliteIndex(Path(directory) / DB_NAME)
    if engine_of(url) == POSTGRESQL:
        return PostgresIndex(url)
    return SqliteIndex(Path(url.removeprefix("sqlite://")))


class StateDir:
    """A CA's state directory and its index. ``StateDir.open`` for an existing CA; ``create`` during ``ca init``.

    ``db`` is the index URL (``ca --db``); None means DIR/ca.db.
    """

    def __init__(self, path: Path, db: str | None = None):
        self.path = Path(path)
        self.index = open_index(db, self.path)
        self.shared = self.index.engine == POSTGRESQL  # the CA files live in the database too

    def file(self, name: str | Path) -> Path:
        return self.path / name

    # --- creation ------------------------------------------------------------------------------

    def ensure_free(self) -> None:
        """Refuse if this directory or the index already holds a CA, or any CA key (never overwrite a key)."""
        if self.shared and self.index.exists():
            raise Refused(f"a CA already exists in the database {self.index}; refusing to overwrite it")
        if not self.shared and self.index.exists():
            where = f"{self.path} ({DB_NAME})" if self.index.path == self.file(DB_NAME) else str(self.index)
            raise Refused(f"a CA already exists in {where}; refusing to overwrite it")
        for name in (ROOT_KEY, INTERMEDIATE_KEY):
            if self.file(name).exists():
                raise Refused(
                    f"{self.file(name)} exists but the index {self.index} does not (an interrupted 'ca init'?); "
                    "refusing to overwrite a CA key: move it away first"
                )

    def create(
        self,
        *,
        trust_domain: str,
        key_type: str,
        root: x509.Certificate,
        root_key_pem: bytes,
        intermediate: x509.Certificate,
        intermediate_key_pem: bytes,
        crls: list[x509.CertificateRevocationList],
    ) -> None:
        """Write a new CA (``crls``: the intermediate's, then the root's). On any failure the files written
        so far are removed again."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create state directory {self.path}: {exc.strerror}") from None
        self.ensure_free()
        pem = serialization.Encoding.PEM
        files = [
            (ROOT_KEY, root_key_pem, KEY_MODE, False),
            (INTERMEDIATE_KEY, intermediate_key_pem, KEY_MODE, False),
            (ROOT_CERT, root.public_bytes(pem), PUBLIC_MODE, True),
            (INTERMEDIATE_CERT, intermediate.public_bytes(pem), PUBLIC_MODE, True),
            (BUNDLE, root.public_bytes(pem), PUBLIC_MODE, True),
            (CRL, b"".join(crl.public_bytes(pem) for crl in crls), PUBLIC_MODE, True),
        ]
        written: list[Path] = []
        try:
            for name, data, mode, replace in files:
                try:
                    write_atomically(self.file(name), data, mode=mode, replace=replace)
                except FileExistsError:
                    raise Refused(f"{self.file(name)} already exists; refusing to overwrite it") from None
                except OSError as exc:
                    raise InputError(f"cannot write {self.file(name)}: {exc.strerror}") from None
                written.append(self.file(name))
            self._create_database(trust_domain=trust_domain, key_type=key_type)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise

    def _create_database(self, *, trust_domain: str, key_type: str) -> None:
        """Create the index with its first rows. SQLite: built under a temporary name, then linked into
        place, so it appears complete or not at all; PostgreSQL: one transaction, which also stores the
        shared files."""

        def setup(db: Transaction) -> None:
            self.index.upgrade(db)
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("trust_domain", trust_domain), ("key_type", key_type), ("crl_number", "1")],
            )

        if self.shared:
            with self.index.transaction() as db:
                if self.index.exists_in(db):
                    raise Refused(f"a CA already exists in the database {self.index}; refusing to overwrite it")
                setup(db)
                self._publish_shared_files(db)
            return
        target = self.index.path
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE))
        try:
            self.index.create_at(temporary, setup)
            os.link(temporary, target)
        except FileExistsError:
            raise Refused(f"a CA already exists in {target}; refusing to overwrite it") from None
        finally:
            temporary.unlink(missing_ok=True)
        fsync_directory(target.parent)

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, db: str | None = None) -> "StateDir":
        """An existing CA: its index brought to this program's schema version (refusing a newer one), and
        with PostgreSQL its shared files copied into DIR."""
        state = cls(path, db)
        if not state.index.exists():
            if state.shared:
                raise InputError(f"no CA in the database {state.index}: run 'ca --db URL init --trust-domain TD' first")
            if state.index.path != state.file(DB_NAME):
                raise InputError(f"no CA index at {state.index}: run 'ca --db URL init --trust-domain TD' first")
            raise InputError(f"no CA in {state.path}: run 'ca init --trust-domain TD' first")
        with state.index.reading() as reading:
            current = state.index.schema_version(reading)
        if current != SCHEMA_VERSION:
            with state.index.transaction() as writing:
                state.index.upgrade(writing)  # refuses an index newer than this program
        state.sync_shared_files()
        state.meta  # read now: a damaged index is reported before anything else happens
        return state

    @contextmanager
    def _connect(self) -> Iterator[Transaction]:
        with self.index.reading() as db:
            yield db

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One write transaction that has the index to itself, so concurrent writers queue. With
        PostgreSQL, shared files it changed are stored in the database before it commits."""
        with self._dir_lock() if self.shared else nullcontext(), self.index.transaction() as db:
            before = self._shared_stamps() if self.shared else None
            yield db
            if self.shared and self._shared_stamps() != before:
                self._publish_shared_files(db)

    @contextmanager
    def _dir_lock(self) -> Iterator[None]:
        """(PostgreSQL.) Exclusive use of DIR's files among the processes of this machine: a sync from the
        database must not overwrite a file that a transaction here has written but not yet stored."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.file(".sync.lock"), os.O_RDWR | os.O_CREAT, KEY_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def copy_index_to(self, url: str) -> dict[str, int]:
        """``ca migrate --to URL``: copy this SQLite index, and the CA's shared files, into an empty PostgreSQL
        database, in one transaction there. Returns how many rows each table got."""
        if self.shared:
            raise InputError(f"this CA's index is already in PostgreSQL ({self.index}); ca migrate copies an SQLite one")
        target = StateDir(self.path, url)
        if not target.shared:
            raise InputError(f"--to {url!r}: give the postgresql://USER@HOST/DB to copy the index into")
        with self._connect() as source:
            tables = {
                table: source.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
                for table in ("meta", "certs", "tokens")
            }
        try:
            with target.index.transaction() as db:
                if target.index.exists_in(db):
                    raise Refused(f"a CA already exists in the database {target.index}; refusing to overwrite it")
                target.index.upgrade(db)
                db.execute("DELETE FROM meta")  # the target's schema_version row; the copy brings its own
                for table, rows in tables.items():
                    if rows:
                        columns = list(rows[0].keys())
                        db.executemany(
                            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                            [tuple(row) for row in rows],
                        )
                target._publish_shared_files(db)
        finally:
            target.index.close()
        return {table: len(rows) for table, rows in tables.items()}

    def check_index(self) -> None:
        """Raise (DatabaseUnavailable, InputError) unless the index answers a query now."""
        with self._connect() as db:
            db.execute("SELECT value FROM meta WHERE key = 'trust_domain'").fetchone()

    # --- the shared files (PostgreSQL) ---------------------------------------------------------

    def _shared_names(self) -> list[str]:
        names = list(SHARED_FILES)
        archive = self.file(GENERATIONS)
        if archive.is_dir():
            for entry in sorted(archive.iterdir()):
                if entry.name.isdigit() and entry.is_dir():
                    names += [f"{GENERATIONS}/{entry.name}/{name}" for name in CA_FILES]
        return names

    def _shared_stamps(self) -> dict[str, tuple[int, int, int] | None]:
        stamps = {}
        for name in self._shared_names():
            try:
                st = os.stat(self.file(name))
            except FileNotFoundError:
                stamps[name] = None
            else:
                stamps[name] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return stamps

    def _publish_shared_files(self, db: Transaction) -> None:
        for name in self._shared_names():
            if self.file(name).is_file():
                db.execute(
                    "INSERT INTO files (name, data) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET data = excluded.data",
                    (name, self.file(name).read_bytes()),
                )

    def sync_shared_files(self) -> bool:
        """(PostgreSQL.) Write into DIR every shared file whose copy in the database differs; True if any did.
        With SQLite, DIR is the only copy: nothing to do."""
        if not self.shared:
            return False
        with self._dir_lock():
            return self._sync_locked()

    def _sync_locked(self) -> bool:
        with self._connect() as db:
            rows = db.execute("SELECT name, data FROM files").fetchall()
        changed = False
        for row in rows:
            target = self.file(row["name"])
            data = bytes(row["data"])
            try:
                if target.read_bytes() == data:
                    continue
            except FileNotFoundError:
                pass
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(target, data, mode=KEY_MODE if target.suffix == ".key" else PUBLIC_MODE)
            changed = True
        return changed

    @cached_property
    def meta(self) -> dict[str, str]:
        with self._connect() as db:
            return {row["key"]: row["value"] for row in db.execute("SELECT key, value FROM meta")}

    @property
    def trust_domain(self) -> str:
        return self.meta["trust_domain"]

    @property
    def key_type(self) -> str:
        """The CA's key type; leaves get a fresh key of the same type."""
        return self.meta["key_type"]

    def _read(self, name: str | Path) -> bytes:
        path = self.file(name)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from None

    def load_certificate(self, name: str | Path) -> x509.Certificate:
        data = self._read(name)
        try:
            return x509.load_pem_x509_certificate(data)
        except ValueError:
            raise InputError(f"{self.file(name)} is not a PEM certificate (damaged?)") from None

    def load_private_key(self, name: str | Path, passphrase: bytes | None) -> PrivateKey:
        """Load a CA key; a passphrase is used only if the key is encrypted.

        An encrypted key weaker than ``ca.keycrypt`` writes (PBKDF2 under ``KDF_ROUNDS`` rounds, or
        another scheme) is re-encrypted in place, atomically, now that the passphrase is known; if
        the file cannot be rewritten the key is still used and the upgrade is tried next time.
        """
        path, data = self.file(name), self._read(name)
        encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
        if encrypted and not passphrase:
            raise InputError(f"{path} is encrypted: give --passphrase-file FILE or set $CA_PASSPHRASE")
        try:
            key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            if encrypted:
                raise InputError(f"cannot decrypt {path}: wrong passphrase (or the file is damaged)") from None
            raise InputError(f"{path} is not a valid PEM private key (damaged?)") from None
        if encrypted and (kdf_rounds(data) or 0) < KDF_ROUNDS:
            try:
                write_atomically(path, encrypted_pkcs8_pem(key, passphrase), mode=KEY_MODE)
            except OSError:
                pass  # a read-only state directory: the key works as it is, the upgrade waits for a writable one
        return key

    def load_issuer(self, passphrase: bytes | None, generation: CaGeneration | None = None) -> Issuer:
        """The intermediate (the current one, or that of ``generation``) and its key, checked to belong together."""
        where = Path(".") if generation is None else generation.directory.relative_to(self.path)
        cert = self.load_certificate(where / INTERMEDIATE_CERT)
        key = self.load_private_key(where / INTERMEDIATE_KEY, passphrase)
        raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*raw) != cert.public_key().public_bytes(*raw):
            raise InputError(
                f"{self.file(where / INTERMEDIATE_KEY)} is not the key of {self.file(where / INTERMEDIATE_CERT)}"
            )
        return Issuer(cert, key, self.trust_domain)

    def live_issuers(self, passphrase: bytes | None) -> list[Issuer]:
        """The intermediates of every live generation, current first, keys loaded."""
        return [self.load_issuer(passphrase, generation) for generation in self.live_generations()]

    # --- the index -----------------------------------------------------------------------------

    @staticmethod
    def insert(
        db: Transaction, cert: x509.Certificate, spiffe_id: str, *, now: datetime, parent_serial: int | None = None
    ) -> bool:
        """Record an issued certificate (``parent_serial``: the one it renewed) inside the caller's
        transaction. False if its serial is already taken (the caller signs again with another); the
        transaction stays usable."""
        try:
            with db.savepoint("insert_cert"):
                db.execute(
                    "INSERT INTO certs (serial, spiffe_id, not_before, not_after, issued_at, cert_pem, parent_serial,"
                    " issuer) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        format_serial(cert.serial_number),
                        spiffe_id,
                        format_time(cert.not_valid_before_utc),
                        format_time(cert.not_valid_after_utc),
                        format_time(now),
                        cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
                        format_serial(parent_serial) if parent_serial is not None else None,
                        issuer_key(cert.issuer),
                    ),
                )
        except Conflict:
            return False
        return True

    def record(self, serial: int) -> Record | None:
        """The index entry of one serial, or None."""
        with self._connect() as db:
            found = StateDir.find(db, serial=serial)
        return found[0] if found else None

    def valid_certificates(self, now: datetime) -> list[tuple[Record, x509.Certificate]]:
        """Every unexpired, unrevoked certificate of the index, with the certificate itself."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM certs WHERE revoked_at IS NULL AND not_after >= ? ORDER BY not_after, rowid",
                (format_time(now),),
            ).fetchall()
        records = [(_record(row), row["cert_pem"]) for row in rows]
        return [
            (record, x509.load_pem_x509_certificate(pem.encode("ascii")))
            for record, pem in records
            if record.status(now) == VALID
        ]

    def records(self) -> list[Record]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM certs ORDER BY issued_at, rowid").fetchall()
        return [_record(row) for row in rows]

    def stream_records(
        self, *, now: datetime, status: str | None = None, pattern: IdPattern | None = None
    ) -> Iterator[Record]:
        """The records in issuing order, read from the index a batch at a time (``ca list``): only those
        of ``status`` (as of ``now``) and of IDs ``pattern`` matches, when given."""
        where, params = [], []
        if status == REVOKED:
            where.append("revoked_at IS NOT NULL")
        elif status in (VALID, EXPIRED):
            where.append("revoked_at IS NULL AND not_after " + (">= ?" if status == VALID else "< ?"))
            params.append(format_time(now))
        elif status is not None:
            raise ValueError(f"unknown status {status!r}")
        if pattern is not None and pattern.wildcard:
            prefix = f"{pattern.base}/"
            where.append("substr(spiffe_id, 1, ?) = ? AND length(spiffe_id) > ?")
            params += [len(prefix), prefix, len(prefix)]
        elif pattern is not None:
            where.append("spiffe_id = ?")
            params.append(str(pattern.base))
        query = (
            "SELECT serial, spiffe_id, not_before, not_after, issued_at, revoked_at, reason, parent_serial FROM certs"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + " ORDER BY issued_at, rowid"
        )
        with self._connect() as db:
            for row in db.stream(query, params):
                yield _record(row)

    @staticmethod
    def find(db: Transaction, *, serial: int | None = None, spiffe_id: str | None = None) -> list[Record]:
        """The records of one serial, or of one SPIFFE ID (oldest first)."""
        if serial is not None:
            rows = db.execute("SELECT * FROM certs WHERE serial = ?", (format_serial(serial),))
        else:
            rows = db.execute(
                "SELECT * FROM certs WHERE spiffe_id = ? ORDER BY issued_at, rowid", (spiffe_id,)
            )
        return [_record(row) for row in rows]

    @staticmethod
    def renewals_of(db: Transaction, serials: list[int]) -> list[Record]:
        """The certificates renewed from any of ``serials`` (one generation of descendants)."""
        found = []
        for start in range(0, len(serials), _IN_LIST):  # a bulk revocation's thousands, in bounded IN lists
            chunk = serials[start : start + _IN_LIST]
            rows = db.execute(
                f"SELECT * FROM certs WHERE parent_serial IN ({', '.join('?' * len(chunk))})",
                tuple(format_serial(serial) for serial in chunk),
            )
            found += [_record(row) for row in rows]
        return found

    @staticmethod
    def mark_revoked(db: Transaction, serials: list[int], *, at: datetime, reason: str) -> None:
        db.executemany(
            "UPDATE certs SET revoked_at = ?, reason = ? WHERE serial = ? AND revoked_at IS NULL",
            [(format_time(at), reason, format_serial(serial)) for serial in serials],
        )

    @staticmethod
    def revocations(
        db: Transaction, *, now: datetime, issuer: x509.Name | None = None
    ) -> list[Revocation]:
        """Revoked certificates that have not expired yet: the ones a CRL must list.

        With ``issuer``, only those that CA issued (a CRL speaks for its own issuer's certificates).
        Read from columns alone (index ``certs_revoked``): no certificate is parsed.
        """
        query = "SELECT serial, revoked_at, reason FROM certs WHERE revoked_at IS NOT NULL AND not_after >= ?"
        params: tuple[str, ...] = (format_time(now),)
        if issuer is not None:
            query += " AND issuer = ?"
            params += (issuer_key(issuer),)
        rows = db.execute(query + " ORDER BY revoked_at, rowid", params)
        return [Revocation(int(row["serial"], 16), _parse_time(row["revoked_at"]), row["reason"]) for row in rows]

    @staticmethod
    def next_crl_number(db: Transaction) -> int:
        """Take the next CRL number (meta 'crl_number' holds the last one used; init's CRL is 1)."""
        last = db.execute("SELECT value FROM meta WHERE key = 'crl_number'").fetchone()["value"]
        number = int(last) + 1
        db.execute("UPDATE meta SET value = ? WHERE key = 'crl_number'", (str(number),))
        return number

    # --- generations (ca rotate) -----------------------------------------------------------------

    @staticmethod
    def generation_number(db: Transaction) -> int:
        """The current generation (1 until the first ``ca rotate``)."""
        row = db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row["value"]) if row else 1

    @staticmethod
    def set_meta(db: Transaction, key: str, value: str) -> None:
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def generations(self, db: Transaction | None = None) -> list[CaGeneration]:
        """Every generation whose files are here: the current one first, then older ones, newest first.

        Inside a transaction that changes the generation (``ca rotate``), pass its ``db``.
        """
        if db is None:
            with self._connect() as db:
                current = StateDir.generation_number(db)
        else:
            current = StateDir.generation_number(db)
        found = [
            CaGeneration(
                current, self.path, self.load_certificate(ROOT_CERT), self.load_certificate(INTERMEDIATE_CERT), True
            )
        ]
        archive = self.file(GENERATIONS)
        numbers = sorted(
            (int(entry.name) for entry in archive.iterdir() if entry.name.isdigit() and entry.is_dir()),
            reverse=True,
        ) if archive.is_dir() else []
        for number in numbers:
            if number >= current:
                continue  # left over by a rotation that did not complete: not a generation
            directory = archive / str(number)
            found.append(
                CaGeneration(
                    number,
                    directory,
                    self.load_certificate(directory.relative_to(self.path) / ROOT_CERT),
                    self.load_certificate(directory.relative_to(self.path) / INTERMEDIATE_CERT),
                    False,
                )
            )
        return found

    def bundle_roots(self) -> list[x509.Certificate]:
        try:
            return x509.load_pem_x509_certificates(self._read(BUNDLE))
        except ValueError:
            raise InputError(f"{self.file(BUNDLE)} holds no readable certificate (damaged?)") from None

    def live_generations(self, db: Transaction | None = None) -> list[CaGeneration]:
        """The current generation and every older one whose root is still in bundle.pem."""
        roots = self.bundle_roots()
        return [gen for gen in self.generations(db) if gen.current or gen.root in roots]

    # --- enrollment tokens ------------------------------------------------------------------------

    @staticmethod
    def add_token(
        db: Transaction, token_hash: str, spiffe_id: str, *, cert_ttl_s: int, now: datetime,
        expires_at: datetime,
    ) -> None:
        db.execute(
            "INSERT INTO tokens (token_hash, spiffe_id, cert_ttl_s, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
            (token_hash, spiffe_id, cert_ttl_s, format_time(now), format_time(expires_at)),
        )

    @staticmethod
    def find_token(db: Transaction, token_hash: str) -> Token | None:
        row = db.execute("SELECT * FROM tokens WHERE token_hash = ?", (token_hash,)).fetchone()
        if row is None:
            return None
        return Token(
            spiffe_id=row["spiffe_id"],
            cert_ttl_s=int(row["cert_ttl_s"]),
            created_at=_parse_time(row["created_at"]),
            expires_at=_parse_time(row["expires_at"]),
            used_at=_parse_time(row["used_at"]) if row["used_at"] else None,
            used_serial=row["used_serial"],
        )

    @staticmethod
    def mark_token_used(db: Transaction, token_hash: str, *, at: datetime, serial: int) -> None:
        """Consume a token; raise Refused if another transaction consumed it first (cannot happen
        under BEGIN IMMEDIATE, but the UPDATE says so itself rather than trusting the caller)."""
        cursor = db.execute(
            "UPDATE tokens SET used_at = ?, used_serial = ? WHERE token_hash = ? AND used_at IS NULL",
            (format_time(at), format_serial(serial), token_hash),
        )
        if cursor.rowcount != 1:
            raise Refused("this token was used by a concurrent request", code="token_used")
