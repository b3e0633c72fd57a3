"""The state directory: atomic 0600 key files, a CA is never overwritten, the index keeps every record."""

from __future__ import annotations

import os
import sqlite3
import stat
from datetime import timedelta

import pytest
from cryptography import x509
from support.ca_cli import files_under, mode_of
from support.certs import NOW, WEB

from ca import generations, inspection, issuance, revocation
from ca.authority import generate_key
from ca.errors import InputError, Refused
from ca.store import StateDir
from mtls import files
from mtls.files import KEY_MODE, write_atomically


def _init(path, passphrase=None, db=None):
    return generations.init_ca(
        path,
        trust_domain="example.org",
        key_type="ec-p256",
        root_ttl=timedelta(days=3650),
        ttl=timedelta(days=365),
        passphrase=passphrase,
        now=NOW,
        db=db,
    )


@pytest.fixture
def wide_umask():
    """Umask 0: a key that is 0600 then owes it to its creation mode, not to the umask."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_key_file_is_0600_before_its_first_byte_is_written(tmp_path, monkeypatch, wide_umask):
    modes_at_first_write = []
    real_write = os.write

    def spying_write(fd, data):
        modes_at_first_write.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(files.os, "write", spying_write)
    write_atomically(tmp_path / "key.pem", b"secret", mode=KEY_MODE)
    assert modes_at_first_write and set(modes_at_first_write) == {0o600}
    assert mode_of(tmp_path / "key.pem") == 0o600


def test_atomic_write_replaces_content_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "cert.pem"
    target.write_bytes(b"old")
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert files_under(tmp_path) == ["cert.pem"]


def test_failed_atomic_write_keeps_old_content_and_removes_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        write_atomically(target, b"new", mode=KEY_MODE)
    assert target.read_bytes() == b"old"
    assert files_under(tmp_path) == ["key.pem"]


def test_write_without_replace_refuses_existing_file(tmp_path):
    target = tmp_path / "root.key"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        write_atomically(target, b"new", mode=KEY_MODE, replace=False)
    assert target.read_bytes() == b"precious"
    assert files_under(tmp_path) == ["root.key"]


def test_init_creates_private_state_dir_with_0600_keys(tmp_path, wide_umask):
    state = _init(tmp_path / "ca-data")
    assert mode_of(state.path) == 0o700
    assert mode_of(state.file("root.key")) == 0o600
    assert mode_of(state.file("intermediate.key")) == 0o600
    assert mode_of(state.file("ca.db")) == 0o600
    assert files_under(state.path) == [
        "bundle.pem", "ca.db", "crl.pem", "intermediate.key", "intermediate.pem", "root.key", "root.pem"
    ]
    assert state.file("bundle.pem").read_bytes() == state.file("root.pem").read_bytes()


def test_init_refuses_to_overwrite_an_existing_ca(tmp_path, ca_db):
    state = _init(tmp_path, db=ca_db)
    before = {name: state.file(name).read_bytes() for name in ("root.key", "intermediate.key", "bundle.pem")}
    with pytest.raises(Refused, match="a CA already exists"):
        _init(tmp_path, db=ca_db)
    assert before == {name: state.file(name).read_bytes() for name in before}


def test_init_refuses_to_overwrite_a_leftover_ca_key(tmp_path):
    (tmp_path / "root.key").write_bytes(b"a key from an interrupted init")
    with pytest.raises(Refused, match="refusing to overwrite a CA key"):
        _init(tmp_path)
    assert files_under(tmp_path) == ["root.key"]


def test_failed_init_removes_what_it_wrote(tmp_path, monkeypatch, ca_db):
    def failing_database(self, **_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StateDir, "_create_database", failing_database)
    with pytest.raises(OSError):
        _init(tmp_path / "ca-data", db=ca_db)
    assert files_under(tmp_path / "ca-data") == []


def test_open_without_ca_tells_to_run_init(tmp_path):
    with pytest.raises(InputError, match=r"no CA in .*: run 'ca init --trust-domain TD' first"):
        StateDir.open(tmp_path / "missing")


def test_open_reports_damaged_index_as_input_error(tmp_path):
    state = _init(tmp_path)
    state.file("ca.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(InputError, match="ca.db"):
        StateDir.open(tmp_path)


def test_index_is_in_wal_mode(tmp_path):
    state = _init(tmp_path)
    with sqlite3.connect(state.file("ca.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_issue_records_certificate_in_index(tmp_path, ca_db):
    _init(tmp_path / "ca", db=ca_db)
    state = StateDir.open(tmp_path / "ca", ca_db)
    issued = issuance.issue(state, WEB, ttl=timedelta(hours=1), now=NOW, out_dir=tmp_path / "web")
    (record,) = state.records()
    assert record.serial == issued.cert.serial_number
    assert record.spiffe_id == WEB
    assert record.not_after == NOW + timedelta(hours=1)
    assert record.status(NOW) == "valid"
    assert record.status(NOW + timedelta(hours=2)) == "expired"


def test_duplicate_serial_is_detected_not_overwritten(tmp_path, ca_db):
    _init(tmp_path / "ca", db=ca_db)
    state = StateDir.open(tmp_path / "ca", ca_db)
    issuer = state.load_issuer(None)
    key = generate_key()
    first = issuer.issue(WEB, key.public_key(), ttl=timedelta(hours=1), now=NOW, serial=12345)
    again = issuer.issue(WEB, key.public_key(), ttl=timedelta(hours=2), now=NOW, serial=12345)
    with state.transaction() as db:
        assert StateDir.insert(db, first, WEB, now=NOW) is True
        assert StateDir.insert(db, again, WEB, now=NOW) is False
    (record,) = state.records()
    assert record.not_after == NOW + timedelta(hours=1)


def test_revoke_marks_record_and_rewrites_crl(tmp_path, ca_db):
    _init(tmp_path / "ca", db=ca_db)
    state = StateDir.open(tmp_path / "ca", ca_db)
    issued = issuance.issue(state, WEB, ttl=timedelta(hours=1), now=NOW, out_dir=tmp_path / "web")
    result = revocation.revoke(state, format(issued.cert.serial_number, "x"), reason="keyCompromise", now=NOW)
    assert [r.serial for r in result.newly_revoked] == [issued.cert.serial_number]
    (record,) = state.records()
    assert (record.status(NOW), record.reason, record.revoked_at) == ("revoked", "keyCompromise", NOW)
    crl = inspection.read_crls(state.file("crl.pem"))[0]
    assert crl.get_revoked_certificate_by_serial_number(issued.cert.serial_number) is not None


def test_crl_numbers_increase_with_every_crl(tmp_path, ca_db):
    _init(tmp_path, db=ca_db)
    state = StateDir.open(tmp_path, ca_db)
    crls = [revocation.refresh_crl(state, now=NOW) for _ in range(3)]
    numbers = [crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number for crl in crls]
    assert numbers == [2, 3, 4]  # init signed number 1
    intermediate_crl, root_crl = inspection.read_crls(state.file("crl.pem"))  # and the root's over the intermediate
    assert intermediate_crl == crls[-1]
    assert root_crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 4


@pytest.mark.parametrize(
    ("text", "serial"),
    [("1a2b", 0x1A2B), ("1A:2B", 0x1A2B), ("0x1a2b", 0x1A2B), (" 001a2b ", 0x1A2B)],
)
def test_serial_accepts_the_usual_spellings(text, serial):
    assert revocation.parse_serial(text) == serial


@pytest.mark.parametrize("text", ["", "0", "xyz", "1_2", "+12", "12 34"])
def test_serial_rejects_non_hex(text):
    with pytest.raises(InputError, match="neither a certificate serial number"):
        revocation.parse_serial(text)
