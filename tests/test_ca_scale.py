"""The CA at scale: CRLs built from index columns in one pass, bulk revocation, a streaming `ca list`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tracemalloc
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from support.ca_cli import assert_one_line_error, ca_env, run_ca
from support.certs import NOW, TD

import ca.index
from ca import generations, inspection, issuance, revocation
from ca.authority import Revocation, new_serial
from ca.cli import main
from ca.store import CRL, StateDir

HOUR = timedelta(hours=1)
WORKLOADS = f"spiffe://{TD}/ns/prod/sa"


def _init(path, db=None, *, now=NOW):
    return generations.init_ca(
        path, trust_domain=TD, key_type="ec-p256", root_ttl=timedelta(days=3650), ttl=timedelta(days=365),
        passphrase=None, now=now, db=db,
    )


def _issue(state, tmp_path, name, *, now=NOW, ttl=HOUR):
    return issuance.issue(state, f"spiffe://{TD}/ns/prod/sa/{name}", ttl=ttl, now=now, out_dir=tmp_path / name).cert


def _listed(state) -> dict[str, dict[int, str | None]]:
    """DIR/crl.pem as {issuer CN: {serial: reason or None}}."""
    found = {}
    for crl in inspection.read_crls(state.file(CRL)):
        entries = {}
        for entry in crl:
            reasons = [ext.value.reason.value for ext in entry.extensions]
            entries[entry.serial_number] = reasons[0] if reasons else None
        found[crl.issuer.rfc4514_string()] = entries
    return found


# --- CRLs from columns ---------------------------------------------------------------------------


def test_each_crl_lists_its_own_issuers_revocations_without_parsing_a_certificate(tmp_path, ca_db):
    state = _init(tmp_path / "ca", ca_db)
    old = _issue(state, tmp_path, "old")
    generations.rotate(state, now=NOW)
    new = _issue(state, tmp_path, "new")
    revocation.revoke(state, f"{old.serial_number:x}", reason="keyCompromise", now=NOW)
    revocation.revoke(state, f"{new.serial_number:x}", reason="unspecified", now=NOW)
    with state.transaction() as db:  # a CRL must not need them: damage every stored certificate
        db.execute("UPDATE certs SET cert_pem = 'damaged'")

    revocation.refresh_crl(state, now=NOW + HOUR / 2)

    listed = _listed(state)
    assert listed[old.issuer.rfc4514_string()] == {old.serial_number: "keyCompromise"}
    assert listed[new.issuer.rfc4514_string()] == {new.serial_number: None}  # unspecified: no reason extension
    roots = [name for name in listed if "root CA" in name]
    assert len(roots) == 2 and all(listed[name] == {} for name in roots)


def test_an_expired_revoked_certificate_leaves_the_crl(tmp_path, ca_db):
    state = _init(tmp_path / "ca", ca_db)
    short = _issue(state, tmp_path, "short", ttl=HOUR)
    long = _issue(state, tmp_path, "long", ttl=10 * HOUR)
    for cert in (short, long):
        revocation.revoke(state, f"{cert.serial_number:x}", reason="superseded", now=NOW)

    revocation.refresh_crl(state, now=NOW + 2 * HOUR)

    assert _listed(state)[long.issuer.rfc4514_string()] == {long.serial_number: "superseded"}


def test_an_index_of_schema_4_learns_every_certificates_issuer_when_opened(tmp_path, ca_db, monkeypatch):
    state = _init(tmp_path / "ca", ca_db)
    certs = [_issue(state, tmp_path, f"w{i}") for i in range(5)]
    revocation.revoke(state, f"{certs[3].serial_number:x}", reason="keyCompromise", now=NOW)
    with state.transaction() as db:  # back to what the release before issuer columns left
        db.execute("DROP INDEX certs_revoked")
        db.execute("DROP INDEX certs_by_parent")
        db.execute("ALTER TABLE certs DROP COLUMN issuer")
        StateDir.set_meta(db, "schema_version", "4")
    state.index.close()
    monkeypatch.setattr(ca.index, "_FILL_BATCH", 2)  # several batches out of five certificates

    reopened = StateDir.open(tmp_path / "ca", ca_db)

    with reopened.index.reading() as db:
        issuers = {row["serial"]: row["issuer"] for row in db.execute("SELECT serial, issuer FROM certs")}
        assert reopened.index.schema_version(db) == ca.index.SCHEMA_VERSION
    assert issuers == {f"{cert.serial_number:x}": cert.issuer.rfc4514_string() for cert in certs}
    revocation.refresh_crl(reopened, now=NOW)
    assert _listed(reopened)[certs[3].issuer.rfc4514_string()] == {certs[3].serial_number: "keyCompromise"}


def test_a_crl_of_many_entries_keeps_every_serial_and_reason(tmp_path):
    state = _init(tmp_path / "ca")
    issuer = state.load_issuer(None)
    reasons = ("unspecified", "keyCompromise", "superseded", "privilegeWithdrawn")
    revocations = [Revocation(new_serial(), NOW, reasons[i % len(reasons)]) for i in range(20_000)]

    crl = issuer.crl(revocations, number=7, now=NOW)

    assert crl.is_signature_valid(issuer.cert.public_key())
    got = {entry.serial_number: [ext.value.reason.value for ext in entry.extensions] for entry in crl}
    assert got == {
        r.serial: ([] if r.reason == "unspecified" else [r.reason]) for r in revocations
    }


# --- ca revoke --from ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One CA made by `ca init` per module; each test gets its own copy."""
    directory = tmp_path_factory.mktemp("template") / "ca"
    assert main(["init", "--trust-domain", TD, "--dir", str(directory)]) == 0
    return directory


@pytest.fixture
def ca_dir(tmp_path, template):
    shutil.copytree(template, tmp_path / "ca")
    return tmp_path / "ca"


def _now():
    return datetime.now(timezone.utc).replace(microsecond=0)


def _issued(ca_dir, *names) -> dict[str, int]:
    """Issue one certificate per name (with the library, as of now): {name: serial}."""
    state = StateDir.open(ca_dir)
    serials = {}
    for name in names:
        workload = name.split("#")[0]
        serials[name] = issuance.issue(
            state, f"spiffe://{TD}/ns/prod/sa/{workload}", ttl=HOUR, now=_now(), out_dir=ca_dir.parent / name
        ).cert.serial_number
    return serials


def _crl(ca_dir) -> x509.CertificateRevocationList:
    return inspection.read_crls(ca_dir / CRL)[0]


def _crl_number(ca_dir) -> int:
    return _crl(ca_dir).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def _statuses(ca_dir) -> dict[int, str]:
    return {record.serial: record.status(_now()) for record in StateDir.open(ca_dir).records()}


@pytest.mark.e2e
def test_revoke_from_a_file_revokes_serials_and_ids_in_one_transaction_and_one_crl(ca_dir, tmp_path):
    serials = _issued(ca_dir, "web#1", "web#2", "api", "db", "cache")
    api = f"{serials['api']:x}"
    listing = tmp_path / "compromised.txt"
    listing.write_text(
        "# incident 42\n"
        "\n"
        f"spiffe://{TD}/ns/prod/sa/web   # both of its certificates\n"
        f"  {':'.join(api[i:i + 2] for i in range(0, len(api), 2)).upper()}  \n"
        f"{serials['cache']:x}\n"
        f"{serials['cache']:x}\n"  # twice: once is enough
    )
    before = _crl_number(ca_dir)

    result = run_ca("revoke", "--from", listing, "--reason", "keyCompromise", ca_dir=ca_dir)

    revoked = {serials[name] for name in ("web#1", "web#2", "api", "cache")}
    assert result.stdout.count("revoked ") == 4 and "CRL updated" in result.stdout
    assert _crl_number(ca_dir) == before + 1  # one CRL for the whole file
    crl = _crl(ca_dir)
    assert {entry.serial_number for entry in crl} == revoked
    assert all(entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value == "keyCompromise"
               for entry in crl)
    statuses = _statuses(ca_dir)
    assert {serial for serial, status in statuses.items() if status == "revoked"} == revoked
    assert statuses[serials["db"]] == "valid"


@pytest.mark.e2e
def test_revoke_from_stdin(ca_dir):
    serials = _issued(ca_dir, "web", "api")
    result = subprocess.run(
        [sys.executable, "-m", "ca", "revoke", "--from", "-"], input=f"{serials['api']:x}\n",
        env=ca_env(CA_DIR=str(ca_dir)), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert {entry.serial_number for entry in _crl(ca_dir)} == {serials["api"]}


@pytest.mark.e2e
@pytest.mark.parametrize(
    "bad_line, exit_code, says",
    [
        ("not-a-serial", 2, "'not-a-serial' is neither a certificate serial number (hex) nor a SPIFFE ID"),
        (
            "spiffe://other.org/ns/prod/sa/web", 2,
            f"invalid SPIFFE ID 'spiffe://other.org/ns/prod/sa/web': outside this CA's trust domain '{TD}'",
        ),
        ("1a2b3c", 1, "no certificate in {ca_dir} has serial 1a2b3c"),
        (f"spiffe://{TD}/ns/prod/sa/nobody", 1, f"no certificate in {{ca_dir}} was issued for {WORKLOADS}/nobody"),
    ],
)
def test_a_bad_line_refuses_the_whole_file_naming_its_line(ca_dir, tmp_path, bad_line, exit_code, says):
    serials = _issued(ca_dir, "web", "api")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{serials['web']:x}\n# then\n\n{bad_line}\n{serials['api']:x}\n")
    crl_before = (ca_dir / CRL).read_bytes()

    message = assert_one_line_error(run_ca("revoke", "--from", listing, ca_dir=ca_dir, check=False), exit_code)

    assert message == f"ca: {listing} line 4: {says.format(ca_dir=ca_dir)}; nothing was revoked"
    assert set(_statuses(ca_dir).values()) == {"valid"}
    assert (ca_dir / CRL).read_bytes() == crl_before


@pytest.mark.parametrize(
    "args, says",
    [
        (["revoke"], "give either SERIAL|SPIFFE_ID or --from FILE"),
        (["revoke", "1a", "--from", "x"], "give either SERIAL|SPIFFE_ID or --from FILE"),
        (["revoke", "--from", "{missing}"], "cannot read --from {missing}: No such file or directory"),
        (["revoke", "--from", "{comments}"], "{comments} names no certificate"),
    ],
)
def test_revoke_from_usage_errors_are_one_line(ca_dir, tmp_path, capsys, args, says):
    comments = tmp_path / "comments.txt"
    comments.write_text("# nothing yet\n\n")
    names = {"missing": tmp_path / "missing.txt", "comments": comments}
    argv = [arg.format(**names) for arg in args] + ["--dir", str(ca_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says.format(**names) in err and err.count("\n") == 1


# --- ca list ---------------------------------------------------------------------------------------


def _record_many(state, count, *, start=0, now=NOW):
    """``count`` certificates of spiffe://TD/ns/bulk/sa/wN (N from ``start``), recorded as ``ca issue`` does."""
    issuer = state.load_issuer(None)
    public_key = issuer.key.public_key()
    with state.transaction() as db:
        for number in range(start, start + count):
            spiffe_id = f"spiffe://{TD}/ns/bulk/sa/w{number}"
            StateDir.insert(db, issuer.issue(spiffe_id, public_key, ttl=HOUR, now=now), spiffe_id, now=now)


def _list_json(capsys, ca_dir, db, *args) -> list[dict]:
    assert main(["list", "--json", "--dir", str(ca_dir), *(["--db", db] if db else []), *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_list_filters_by_status_and_id(tmp_path, ca_db, capsys):
    now = _now()
    state = _init(tmp_path / "ca", ca_db, now=now - 3 * HOUR)
    expired = issuance.issue(
        state, f"{WORKLOADS}/web", ttl=HOUR, now=now - 2 * HOUR, out_dir=tmp_path / "old-web"
    ).cert.serial_number
    web, api, db_id = (
        issuance.issue(state, spiffe_id, ttl=HOUR, now=now, out_dir=tmp_path / name).cert.serial_number
        for name, spiffe_id in (
            ("web", f"{WORKLOADS}/web"), ("api", f"{WORKLOADS}/api"), ("db", f"spiffe://{TD}/ns/dev/sa/db")
        )
    )
    revocation.revoke(state, f"{api:x}", reason="keyCompromise", now=now)

    def serials(*args):
        return [int(entry["serial"], 16) for entry in _list_json(capsys, tmp_path / "ca", ca_db, *args)]

    assert serials() == [expired, web, api, db_id]  # oldest first
    assert serials("--status", "valid") == [web, db_id]
    assert serials("--status", "expired") == [expired]
    assert serials("--status", "revoked") == [api]
    assert serials("--id", f"{WORKLOADS}/web") == [expired, web]
    assert serials("--id", f"{WORKLOADS}/*") == [expired, web, api]
    assert serials("--id", f"{WORKLOADS}/w/*") == []  # a prefix of whole segments, not of characters
    assert serials("--id", f"spiffe://{TD}/*", "--status", "valid") == [web, db_id]
    assert serials("--id", f"{WORKLOADS}/web/*") == []
    assert serials("--id", "spiffe://other.org/*") == []


def test_list_json_of_an_empty_index_is_an_empty_array(tmp_path, capsys):
    _init(tmp_path / "ca")
    assert main(["list", "--json", "--dir", str(tmp_path / "ca")]) == 0
    assert capsys.readouterr().out == "[]\n"


def test_list_refuses_a_malformed_pattern_in_one_line(tmp_path, capsys):
    _init(tmp_path / "ca")
    assert main(["list", "--id", f"spiffe://{TD}/ns/*/sa", "--dir", str(tmp_path / "ca")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ca: --id: invalid SPIFFE ID") and err.count("\n") == 1


def _peak_memory_of_list_json(tmp_path, db, monkeypatch) -> tuple[int, list[dict]]:
    """``ca list --json`` in this process, its output to a file: the most memory it held at once, and the list."""
    output = tmp_path / "list.json"
    with output.open("w") as out, monkeypatch.context() as patch:
        patch.setattr(sys, "stdout", out)
        tracemalloc.start()
        try:
            assert main(["list", "--json", "--dir", str(tmp_path / "ca"), *(["--db", db] if db else [])]) == 0
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    return peak, json.loads(output.read_text())


def test_list_streams_the_index_instead_of_loading_it(tmp_path, ca_db, monkeypatch):
    state = _init(tmp_path / "ca", ca_db)
    _record_many(state, 1000)
    peak_small, _ = _peak_memory_of_list_json(tmp_path, ca_db, monkeypatch)
    _record_many(state, 5000, start=1000)

    peak_large, listed = _peak_memory_of_list_json(tmp_path, ca_db, monkeypatch)

    assert len(listed) == 6000 and listed[-1]["spiffe_id"] == f"spiffe://{TD}/ns/bulk/sa/w5999"
    assert peak_large < 1.5 * peak_small, f"6000 records held {peak_large} bytes at once, 1000 held {peak_small}"
