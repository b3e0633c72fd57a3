"""The state directory: CA certificates and keys as files, issued certificates in a SQLite index.

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

Concurrency: the database runs in WAL mode and every write is one ``BEGIN IMMEDIATE`` transaction
under a generous busy timeout, so two admins issuing at once queue for a moment instead of losing a
record. Serial numbers are the primary key: a collision is detected, never silently overwritten.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Iterator

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ca.authority import Issuer, PrivateKey, Revocation, format_serial, format_time
from ca.errors import InputError, Refused
from mtls.files import KEY_MODE, PUBLIC_MODE, fsync_directory, write_atomically

DB_NAME = "ca.db"
ROOT_CERT = "root.pem"
ROOT_KEY = "root.key"
INTERMEDIATE_CERT = "intermediate.pem"
INTERMEDIATE_KEY = "intermediate.key"
BUNDLE = "bundle.pem"
CRL = "crl.pem"
GENERATIONS = "generations"
CA_FILES = (ROOT_CERT, ROOT_KEY, INTERMEDIATE_CERT, INTERMEDIATE_KEY)
BUSY_TIMEOUT_S = 60.0

VALID = "valid"
EXPIRED = "expired"
REVOKED = "revoked"

_SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE certs (
    serial     TEXT PRIMARY KEY,  -- lower-case hex, see ca.authority.format_serial
    spiffe_id  TEXT NOT NULL,
    not_before TEXT NOT NULL,     -- ISO 8601 UTC, 'YYYY-MM-DDTHH:MM:SSZ' (sorts as time)
    not_after  TEXT NOT NULL,
    issued_at  TEXT NOT NULL,
    revoked_at TEXT,
    reason     TEXT,
    cert_pem   TEXT NOT NULL
);
CREATE INDEX certs_by_spiffe_id ON certs (spiffe_id);
"""
# Created by init, and on first use in an index made before tokens existed.
_TOKENS_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    token_hash  TEXT PRIMARY KEY,  -- SHA-256 of the token, hex: the token itself is never stored
    spiffe_id   TEXT NOT NULL,
    cert_ttl_s  INTEGER NOT NULL,  -- lifetime of the certificate the token buys
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    used_at     TEXT,              -- set, in the same transaction that records the certificate
    used_serial TEXT
);
"""


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


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

    def status(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return REVOKED
        return EXPIRED if now > self.not_after else VALID


def _record(row: sqlite3.Row) -> Record:
    return Record(
        serial=int(row["serial"], 16),
        spiffe_id=row["spiffe_id"],
        not_before=_parse_time(row["not_before"]),
        not_after=_parse_time(row["not_after"]),
        issued_at=_parse_time(row["issued_at"]),
        revoked_at=_parse_time(row["revoked_at"]) if row["revoked_at"] else None,
        reason=row["reason"],
    )


class StateDir:
    """A CA's state directory. ``StateDir.open`` for an existing CA; ``create`` during ``ca init``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def file(self, name: str | Path) -> Path:
        return self.path / name

    # --- creation ------------------------------------------------------------------------------

    def ensure_free(self) -> None:
        """Refuse if this directory already holds a CA, or any CA key (never overwrite a key)."""
        if self.file(DB_NAME).exists():
            raise Refused(f"a CA already exists in {self.path} ({DB_NAME}); refusing to overwrite it")
        for name in (ROOT_KEY, INTERMEDIATE_KEY):
            if self.file(name).exists():
                raise Refused(
                    f"{self.file(name)} exists but {DB_NAME} does not (an interrupted 'ca init'?); "
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
        crl: x509.CertificateRevocationList,
    ) -> None:
        """Write a new CA. On any failure the files written so far are removed again."""
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
            (CRL, crl.public_bytes(pem), PUBLIC_MODE, True),
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
        """Build the index under a temporary name, then link it into place: it appears complete or not at all."""
        temporary = self.file(f".{DB_NAME}.{secrets.token_hex(6)}.tmp")
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE))
        try:
            with closing(sqlite3.connect(temporary, isolation_level=None)) as db:
                db.execute("PRAGMA journal_mode=WAL")  # persistent: recorded in the file header
                db.executescript(_SCHEMA + _TOKENS_SCHEMA)
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("trust_domain", trust_domain), ("key_type", key_type), ("crl_number", "1")],
                )
            os.link(temporary, self.file(DB_NAME))
        except FileExistsError:
            raise Refused(f"a CA already exists in {self.path} ({DB_NAME}); refusing to overwrite it") from None
        finally:
            temporary.unlink(missing_ok=True)
        fsync_directory(self.path)

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> "StateDir":
        state = cls(path)
        if not state.file(DB_NAME).is_file():
            raise InputError(f"no CA in {state.path}: run 'ca init --trust-domain TD' first")
        state.meta  # read now: a damaged index is reported before anything else happens
        return state

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.file(DB_NAME), timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise InputError(f"cannot open {self.file(DB_NAME)}: {exc}") from None
        db.row_factory = sqlite3.Row
        try:
            yield db
        except sqlite3.IntegrityError:
            raise  # a constraint the caller handles, not a damaged file
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{self.file(DB_NAME)}: {exc}") from None
        finally:
            db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front (BEGIN IMMEDIATE) so concurrent writers queue."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

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
        """Load a CA key; a passphrase is used only if the key is encrypted."""
        path, data = self.file(name), self._read(name)
        encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
        if encrypted and not passphrase:
            raise InputError(f"{path} is encrypted: give --passphrase-file FILE or set $CA_PASSPHRASE")
        try:
            return serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            if encrypted:
                raise InputError(f"cannot decrypt {path}: wrong passphrase (or the file is damaged)") from None
            raise InputError(f"{path} is not a valid PEM private key (damaged?)") from None

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
    def insert(db: sqlite3.Connection, cert: x509.Certificate, spiffe_id: str, *, now: datetime) -> bool:
        """Record an issued certificate inside the caller's transaction. False if its serial is already
        taken (the caller signs again with another); the transaction stays usable."""
        try:
            db.execute("SAVEPOINT insert_cert")
            db.execute(
                "INSERT INTO certs (serial, spiffe_id, not_before, not_after, issued_at, cert_pem)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    format_serial(cert.serial_number),
                    spiffe_id,
                    format_time(cert.not_valid_before_utc),
                    format_time(cert.not_valid_after_utc),
                    format_time(now),
                    cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
                ),
            )
        except sqlite3.IntegrityError:
            db.execute("ROLLBACK TO insert_cert")
            db.execute("RELEASE insert_cert")
            return False
        db.execute("RELEASE insert_cert")
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

    @staticmethod
    def find(db: sqlite3.Connection, *, serial: int | None = None, spiffe_id: str | None = None) -> list[Record]:
        """The records of one serial, or of one SPIFFE ID (oldest first)."""
        if serial is not None:
            rows = db.execute("SELECT * FROM certs WHERE serial = ?", (format_serial(serial),))
        else:
            rows = db.execute(
                "SELECT * FROM certs WHERE spiffe_id = ? ORDER BY issued_at, rowid", (spiffe_id,)
            )
        return [_record(row) for row in rows]

    @staticmethod
    def mark_revoked(db: sqlite3.Connection, serials: list[int], *, at: datetime, reason: str) -> None:
        db.executemany(
            "UPDATE certs SET revoked_at = ?, reason = ? WHERE serial = ? AND revoked_at IS NULL",
            [(format_time(at), reason, format_serial(serial)) for serial in serials],
        )

    @staticmethod
    def revocations(
        db: sqlite3.Connection, *, now: datetime, issuer: x509.Name | None = None
    ) -> list[Revocation]:
        """Revoked certificates that have not expired yet: the ones a CRL must list.

        With ``issuer``, only those that CA issued (a CRL speaks for its own issuer's certificates).
        """
        rows = db.execute(
            "SELECT serial, revoked_at, reason, cert_pem FROM certs"
            " WHERE revoked_at IS NOT NULL AND not_after >= ? ORDER BY revoked_at, rowid",
            (format_time(now),),
        )
        return [
            Revocation(int(row["serial"], 16), _parse_time(row["revoked_at"]), row["reason"])
            for row in rows
            if issuer is None
            or x509.load_pem_x509_certificate(row["cert_pem"].encode("ascii")).issuer == issuer
        ]

    @staticmethod
    def next_crl_number(db: sqlite3.Connection) -> int:
        """Take the next CRL number (meta 'crl_number' holds the last one used; init's CRL is 1)."""
        (last,) = db.execute("SELECT value FROM meta WHERE key = 'crl_number'").fetchone()
        number = int(last) + 1
        db.execute("UPDATE meta SET value = ? WHERE key = 'crl_number'", (str(number),))
        return number

    # --- generations (ca rotate) -----------------------------------------------------------------

    @staticmethod
    def generation_number(db: sqlite3.Connection) -> int:
        """The current generation (1 until the first ``ca rotate``)."""
        row = db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 1

    @staticmethod
    def set_meta(db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def generations(self, db: sqlite3.Connection | None = None) -> list[CaGeneration]:
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

    def live_generations(self, db: sqlite3.Connection | None = None) -> list[CaGeneration]:
        """The current generation and every older one whose root is still in bundle.pem."""
        roots = self.bundle_roots()
        return [gen for gen in self.generations(db) if gen.current or gen.root in roots]

    # --- enrollment tokens ------------------------------------------------------------------------

    @staticmethod
    def add_token(
        db: sqlite3.Connection, token_hash: str, spiffe_id: str, *, cert_ttl_s: int, now: datetime,
        expires_at: datetime,
    ) -> None:
        db.execute(_TOKENS_SCHEMA)
        db.execute(
            "INSERT INTO tokens (token_hash, spiffe_id, cert_ttl_s, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
            (token_hash, spiffe_id, cert_ttl_s, format_time(now), format_time(expires_at)),
        )

    @staticmethod
    def find_token(db: sqlite3.Connection, token_hash: str) -> Token | None:
        db.execute(_TOKENS_SCHEMA)
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
    def mark_token_used(db: sqlite3.Connection, token_hash: str, *, at: datetime, serial: int) -> None:
        """Consume a token; raise Refused if another transaction consumed it first (cannot happen
        under BEGIN IMMEDIATE, but the UPDATE says so itself rather than trusting the caller)."""
        cursor = db.execute(
            "UPDATE tokens SET used_at = ?, used_serial = ? WHERE token_hash = ? AND used_at IS NULL",
            (format_time(at), format_serial(serial), token_hash),
        )
        if cursor.rowcount != 1:
            raise Refused("this token was used by a concurrent request", code="token_used")
