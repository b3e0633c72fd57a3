"""The index behind the CA, on both engines: versioned schema, upgrades in place, a newer schema refused,
`ca migrate --to postgresql://...`, and a second machine (an empty DIR) working from the database alone."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import psycopg
import pytest
from support.ca_cli import assert_one_line_error, ca_env, run_ca
from support.certs import NOW, TD, WEB

from ca import generations, issuance
from ca.errors import InputError
from ca.index import SCHEMA_VERSION
from ca.store import StateDir

# The index as the release before versioned schemas made it (meta, certs, tokens; no schema_version).
_UNVERSIONED = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE certs (serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, not_before TEXT NOT NULL,
    not_after TEXT NOT NULL, issued_at TEXT NOT NULL, revoked_at TEXT, reason TEXT, cert_pem TEXT NOT NULL);
CREATE INDEX certs_by_spiffe_id ON certs (spiffe_id);
CREATE TABLE tokens (token_hash TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, cert_ttl_s INTEGER NOT NULL,
    created_at TEXT NOT NULL, expires_at TEXT NOT NULL, used_at TEXT, used_serial TEXT);
"""


def _init(path, db=None):
    return generations.init_ca(
        path, trust_domain=TD, key_type="ec-p256", root_ttl=timedelta(days=3650), ttl=timedelta(days=365),
        passphrase=None, now=NOW, db=db,
    )


def _schema_version(state: StateDir) -> int:
    with state.index.reading() as db:
        return state.index.schema_version(db)


def test_init_records_the_current_schema_version(tmp_path, ca_db):
    assert _schema_version(_init(tmp_path / "ca", ca_db)) == SCHEMA_VERSION


def test_an_index_of_the_previous_release_upgrades_in_place(tmp_path):
    state = _init(tmp_path / "ca")
    issued = issuance.issue(state, WEB, ttl=timedelta(hours=1), now=NOW, out_dir=tmp_path / "web")
    index = state.file("ca.db")
    with sqlite3.connect(index) as old:  # rebuild it the way the previous release left it
        rows = old.execute("SELECT serial, spiffe_id, not_before, not_after, issued_at, cert_pem FROM certs").fetchall()
        meta = old.execute("SELECT key, value FROM meta WHERE key != 'schema_version'").fetchall()
    index.unlink()
    with sqlite3.connect(index) as old:
        old.executescript(_UNVERSIONED)
        old.executemany("INSERT INTO meta VALUES (?, ?)", meta)
        old.executemany(
            "INSERT INTO certs (serial, spiffe_id, not_before, not_after, issued_at, cert_pem) VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
    reopened = StateDir.open(tmp_path / "ca")
    assert _schema_version(reopened) == SCHEMA_VERSION
    assert [record.serial for record in reopened.records()] == [issued.cert.serial_number]
    with sqlite3.connect(index) as upgraded:
        columns = [row[1] for row in upgraded.execute("PRAGMA table_info(certs)")]
    assert "parent_serial" in columns


def test_a_newer_schema_is_refused_naming_both_versions(tmp_path, ca_db):
    state = _init(tmp_path / "ca", ca_db)
    with state.transaction() as db:
        StateDir.set_meta(db, "schema_version", str(SCHEMA_VERSION + 1))
    with pytest.raises(InputError, match=rf"schema version {SCHEMA_VERSION + 1}, but this ca knows versions up to "
                       rf"{SCHEMA_VERSION}"):
        StateDir.open(tmp_path / "ca", ca_db)


@pytest.mark.e2e
def test_ca_refuses_a_newer_schema_with_one_line(tmp_path):
    state = _init(tmp_path / "ca")
    with state.transaction() as db:
        StateDir.set_meta(db, "schema_version", "99")
    message = assert_one_line_error(run_ca("list", ca_dir=tmp_path / "ca", check=False), 2)
    assert f"schema version 99, but this ca knows versions up to {SCHEMA_VERSION}" in message


@pytest.mark.e2e
def test_migrate_copies_an_sqlite_ca_into_postgresql(tmp_path, postgres):
    ca_dir, url = tmp_path / "ca", postgres.new_database()
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    run_ca("issue", WEB, "--out", tmp_path / "web", ca_dir=ca_dir)
    run_ca("revoke", WEB, "--reason", "keyCompromise", ca_dir=ca_dir)
    run_ca("token", f"spiffe://{TD}/ns/prod/sa/api", ca_dir=ca_dir)
    before = run_ca("list", "--json", ca_dir=ca_dir).stdout

    copied = run_ca("migrate", "--to", url, ca_dir=ca_dir)
    assert "1 certificate(s), 1 token(s)" in copied.stdout

    # Another machine: an empty directory and the database URL are enough.
    replica = tmp_path / "replica"
    assert run_ca("list", "--json", ca_dir=replica, env=ca_env(CA_DB=url)).stdout == before
    assert (replica / "intermediate.key").read_bytes() == (ca_dir / "intermediate.key").read_bytes()
    assert (replica / "crl.pem").read_bytes() == (ca_dir / "crl.pem").read_bytes()
    with psycopg.connect(url) as db:
        (crl_number,) = db.execute("SELECT value FROM meta WHERE key = 'crl_number'").fetchone()
    with sqlite3.connect(ca_dir / "ca.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'crl_number'").fetchone() == (crl_number,)

    again = run_ca("migrate", "--to", url, ca_dir=ca_dir, check=False)
    assert "a CA already exists in the database" in assert_one_line_error(again, 1)


@pytest.mark.e2e
def test_an_unreachable_database_is_one_line(tmp_path, postgres):
    url = postgres.url("postgres").replace(str(postgres.port), "1")
    result = run_ca("--db", url, "list", ca_dir=tmp_path / "ca", check=False)
    assert "cannot connect to postgresql://postgres@127.0.0.1:1/postgres" in assert_one_line_error(result, 1)
