"""``ca`` driven the way an admin does: subprocesses in a temporary directory (plus ``main()`` in-process
for the many one-line error paths)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support.ca_cli import assert_one_line_error, ca_env, files_under, mode_of, run_ca
from support.certs import WEB

from ca import issuance
from ca.cli import main
from ca.inspection import read_certificates, read_crls
from ca.store import StateDir
from mtls.spiffe import svid_id


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One CA made by `ca init` (its main(), in this process) per module; each test gets its own copy."""
    directory = tmp_path_factory.mktemp("template") / "ca-data"
    assert main(["init", "--trust-domain", "example.org", "--dir", str(directory)]) == 0
    return directory


@pytest.fixture
def admin(tmp_path, template):
    """A working directory holding a CA in ./ca-data, the default state directory."""
    shutil.copytree(template, tmp_path / "ca-data")
    return tmp_path


@pytest.fixture
def admin_db(tmp_path, template, ca_db):
    """``admin`` once per index engine, for the tests whose outcome the index decides; its commands take
    ``db=ca_db``. On SQLite a copy of ``template``; on PostgreSQL a CA of its own in ./ca-data, made by
    `ca init --db URL` in a fresh database."""
    if ca_db is None:
        shutil.copytree(template, tmp_path / "ca-data")
    else:
        assert main(["init", "--trust-domain", "example.org", "--dir", str(tmp_path / "ca-data"), "--db", ca_db]) == 0
    return tmp_path


def _issue_json(cwd, *args, db=None):
    result = run_ca("issue", *args, "--json", cwd=cwd, db=db)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _issue_quietly(cwd, spiffe_id, out, db=None):
    """Issue with the library, for tests about what comes after issuing."""
    issued = issuance.issue(
        StateDir.open(cwd / "ca-data", db), spiffe_id, ttl=timedelta(hours=1), now=_now(), out_dir=cwd / out
    )
    return format(issued.cert.serial_number, "x")


def _now():
    return datetime.now(timezone.utc).replace(microsecond=0)


def _statuses(cwd, db=None):
    """serial -> (status, reason), read from the index with the library."""
    records = StateDir.open(cwd / "ca-data", db).records()
    return {format(r.serial, "x"): (r.status(_now()), r.reason) for r in records}


# --- init --------------------------------------------------------------------------------------


def test_init_writes_bundle_of_roots_and_0600_keys(admin_db):
    state = admin_db / "ca-data"
    assert mode_of(state / "root.key") == 0o600
    assert mode_of(state / "intermediate.key") == 0o600
    (root,) = read_certificates(state / "bundle.pem")
    assert root.subject == root.issuer
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.e2e
def test_init_refuses_to_overwrite_existing_ca(admin_db, ca_db):
    before = (admin_db / "ca-data" / "intermediate.key").read_bytes()
    result = run_ca("init", "--trust-domain", "example.org", cwd=admin_db, db=ca_db, check=False)
    assert "a CA already exists" in assert_one_line_error(result, 1)
    assert (admin_db / "ca-data" / "intermediate.key").read_bytes() == before


@pytest.mark.e2e
def test_init_uses_dir_then_env_then_default(tmp_path):
    assert run_ca("init", "--trust-domain", "a.org", "--dir", "explicit", cwd=tmp_path).returncode == 0
    env = ca_env(CA_DIR=str(tmp_path / "from-env"))
    env_result = run_ca("init", "--trust-domain", "b.org", cwd=tmp_path, env=env)
    assert env_result.returncode == 0, env_result.stderr
    assert (tmp_path / "explicit" / "ca.db").exists()
    assert (tmp_path / "from-env" / "ca.db").exists()
    assert not (tmp_path / "ca-data").exists()


@pytest.mark.e2e
def test_init_honours_key_type_and_lifetimes(tmp_path):
    result = run_ca(
        "init", "--trust-domain", "example.org", "--key-type", "ed25519", "--root-ttl", "30d", "--ttl", "10d",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    root = read_certificates(tmp_path / "ca-data" / "root.pem")[0]
    intermediate = read_certificates(tmp_path / "ca-data" / "intermediate.pem")[0]
    assert root.signature_algorithm_oid == x509.SignatureAlgorithmOID.ED25519
    lifetime = intermediate.not_valid_after_utc - intermediate.not_valid_before_utc
    assert lifetime.days == 10  # plus the minute of clock-skew backdating
    issued = _issue_json(tmp_path, "spiffe://example.org/x")
    assert "ed25519" in run_ca("inspect", issued["files"]["cert"], cwd=tmp_path).stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trust-domain", "Example.org"], "invalid trust domain 'Example.org': trust domain must be lower-case"),
        (["--trust-domain", "spiffe://example.org"], "give the bare name"),
        (
            ["--trust-domain", "example.org", "--ttl", "20d", "--root-ttl", "10d"],
            "must not be longer than --root-ttl",
        ),
        (["--trust-domain", "example.org", "--key-type", "dsa"], "invalid choice: 'dsa'"),
        (["--trust-domain", "example.org", "--root-ttl", "10y"], "'10y' is not a duration"),
    ],
)
def test_init_rejects_bad_input_in_one_line_and_creates_nothing(tmp_path, capsys, args, message):
    assert main(["init", "--dir", str(tmp_path / "ca"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ca: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "ca").exists()


def test_init_into_a_path_that_is_a_file_is_one_line_error(tmp_path, capsys):
    (tmp_path / "ca-data").write_text("not a directory")
    assert main(["init", "--trust-domain", "example.org", "--dir", str(tmp_path / "ca-data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ca: cannot create state directory {tmp_path / 'ca-data'}: ") and err.count("\n") == 1


# --- issue -------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_issue_writes_leaf_then_intermediate_key_0600_and_bundle(admin_db, ca_db):
    issued = _issue_json(admin_db, WEB, "--out", "web", "--dns", "web.prod.svc", db=ca_db)
    out = admin_db / "web"
    assert issued["files"] == {"cert": "web/cert.pem", "key": "web/key.pem", "bundle": "web/bundle.pem"}
    leaf, intermediate = read_certificates(out / "cert.pem")
    assert intermediate == read_certificates(admin_db / "ca-data" / "intermediate.pem")[0]
    assert str(svid_id(leaf)) == WEB
    assert format(leaf.serial_number, "x") == issued["serial"]
    assert mode_of(out / "key.pem") == 0o600
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), password=None)
    assert key.public_key() == leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert (out / "bundle.pem").read_bytes() == (admin_db / "ca-data" / "bundle.pem").read_bytes()


@pytest.mark.e2e
def test_issue_json_has_serial_id_validity_and_files(admin_db, ca_db):
    issued = _issue_json(admin_db, WEB, "--ttl", "90m", db=ca_db)
    assert set(issued) == {"serial", "spiffe_id", "not_before", "not_after", "files"}
    assert issued["spiffe_id"] == WEB
    assert issued["not_after"].endswith("Z") and issued["not_before"] < issued["not_after"]


@pytest.mark.e2e
def test_issue_defaults_out_to_last_path_segment_and_says_so(admin):
    result = run_ca("issue", WEB, cwd=admin)
    assert result.returncode == 0, result.stderr
    assert "web/cert.pem" in result.stdout and "web/key.pem" in result.stdout
    assert (admin / "web" / "key.pem").exists()


@pytest.mark.e2e
def test_issue_again_renews_in_place(admin_db, ca_db):
    first = _issue_json(admin_db, WEB, db=ca_db)
    second = _issue_json(admin_db, WEB, db=ca_db)
    assert first["serial"] != second["serial"]
    assert format(read_certificates(admin_db / "web" / "cert.pem")[0].serial_number, "x") == second["serial"]


@pytest.mark.e2e
def test_issue_refuses_to_overwrite_another_identity(admin_db, ca_db):
    _issue_json(admin_db, WEB, db=ca_db)
    before = (admin_db / "web" / "key.pem").read_bytes()
    result = run_ca("issue", "spiffe://example.org/ns/dev/sa/web", cwd=admin_db, db=ca_db, check=False)
    assert f"holds {WEB}" in assert_one_line_error(result, 1)
    assert (admin_db / "web" / "key.pem").read_bytes() == before
    assert len(_statuses(admin_db, ca_db)) == 1


@pytest.mark.e2e
def test_issue_refuses_id_outside_trust_domain(admin):
    before = files_under(admin)
    result = run_ca("issue", "spiffe://other.org/ns/prod/sa/web", cwd=admin, check=False)
    message = assert_one_line_error(result, 2)
    assert message == (
        "ca: invalid SPIFFE ID 'spiffe://other.org/ns/prod/sa/web': outside this CA's trust domain 'example.org'"
    )
    assert files_under(admin) == before


@pytest.mark.e2e
def test_issue_refuses_ttl_beyond_intermediate_with_exit_1_and_writes_nothing(admin):
    before = files_under(admin)
    result = run_ca("issue", WEB, "--ttl", "9000h", cwd=admin, check=False)
    assert "would outlive the intermediate CA" in assert_one_line_error(result, 1)
    assert files_under(admin) == before
    assert _statuses(admin) == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([WEB, "--ttl", "5x"], "argument --ttl: '5x' is not a duration"),
        ([WEB, "--ttl", "0s"], "must be greater than zero"),
        (["spiffe://example.org"], "must have a path"),
        (["SPIFFE://example.org/a"], "scheme must be lower-case"),
        ([WEB, "--dns", "not a name"], "--dns: 'not a name' is not a DNS name"),
        ([WEB, "--csr", "missing.csr"], "cannot read CSR missing.csr"),
        ([], "required: SPIFFE_ID"),
    ],
)
def test_issue_rejects_bad_input_in_one_line_and_writes_nothing(admin, monkeypatch, capsys, args, message):
    monkeypatch.chdir(admin)
    before = files_under(admin)
    assert main(["issue", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ca: ") and err.count("\n") == 1 and message in err, err
    assert files_under(admin) == before


@pytest.mark.parametrize("command", [["issue", WEB], ["list"], ["revoke", "1a"], ["crl"], ["bundle"]])
def test_commands_without_a_ca_say_to_run_init(tmp_path, capsys, command):
    assert main([*command, "--dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err == f"ca: no CA in {tmp_path / 'nowhere'}: run 'ca init --trust-domain TD' first\n"
    assert not (tmp_path / "nowhere").exists()


def test_issue_help_documents_default_out(capsys):
    assert main(["issue", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: ./NAME, NAME the ID's last path segment" in help_text


# --- passphrase and damaged files ----------------------------------------------------------------


@pytest.mark.e2e
def test_passphrase_encrypts_ca_keys_and_is_needed_to_issue(tmp_path):
    (tmp_path / "pass").write_text("correct horse\n")
    (tmp_path / "wrong").write_text("battery staple\n")
    init = run_ca("init", "--trust-domain", "example.org", "--passphrase-file", "pass", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    for name in ("root.key", "intermediate.key"):
        data = (tmp_path / "ca-data" / name).read_bytes()
        assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        serialization.load_pem_private_key(data, password=b"correct horse")
    before = files_under(tmp_path)

    missing = run_ca("issue", WEB, cwd=tmp_path, check=False)
    assert "is encrypted: give --passphrase-file FILE or set $CA_PASSPHRASE" in assert_one_line_error(missing, 2)
    wrong = run_ca("issue", WEB, "--passphrase-file", "wrong", cwd=tmp_path, check=False)
    assert "wrong passphrase" in assert_one_line_error(wrong, 2)
    assert files_under(tmp_path) == before

    by_file = run_ca("--passphrase-file", "pass", "issue", WEB, cwd=tmp_path)
    assert by_file.returncode == 0, by_file.stderr
    by_env = run_ca("issue", WEB, cwd=tmp_path, env=ca_env(CA_PASSPHRASE="correct horse"))
    assert by_env.returncode == 0, by_env.stderr
    assert mode_of(tmp_path / "web" / "key.pem") == 0o600
    workload_key = (tmp_path / "web" / "key.pem").read_bytes()
    assert not workload_key.startswith(b"-----BEGIN ENCRYPTED")  # only the CA keys are encrypted


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            ("intermediate.key", b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n"),
            "is not a valid PEM private key",
        ),
        (("intermediate.pem", b"garbage"), "intermediate.pem is not a PEM certificate"),
        (("ca.db", b"garbage" * 200), "ca.db: file is not a database"),
    ],
)
def test_damaged_state_file_is_one_line_input_error(admin, damage, message):
    name, content = damage
    (admin / "ca-data" / name).write_bytes(content)
    result = run_ca("issue", WEB, cwd=admin, check=False)
    assert message in assert_one_line_error(result, 2)
    assert not (admin / "web").exists()


@pytest.mark.e2e
def test_intermediate_key_of_another_ca_is_refused(admin, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    assert run_ca("init", "--trust-domain", "example.org", cwd=other).returncode == 0
    (admin / "ca-data" / "intermediate.key").write_bytes((other / "ca-data" / "intermediate.key").read_bytes())
    result = run_ca("issue", WEB, cwd=admin, check=False)
    assert "is not the key of" in assert_one_line_error(result, 2)


# --- CSR ---------------------------------------------------------------------------------------


def _csr(key, *, uri="spiffe://evil.org/admin", common_name="admin"):
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .sign(key, hashes.SHA256())
    )


@pytest.mark.e2e
def test_csr_key_is_certified_identity_from_command_line_and_no_key_written(admin):
    key = ec.generate_private_key(ec.SECP256R1())
    (admin / "req.pem").write_bytes(_csr(key).public_bytes(serialization.Encoding.PEM))
    issued = _issue_json(admin, WEB, "--csr", "req.pem", "--out", "svc")
    assert issued["files"]["key"] is None
    assert files_under(admin / "svc") == ["bundle.pem", "cert.pem"]
    leaf = read_certificates(admin / "svc" / "cert.pem")[0]
    assert leaf.public_key() == key.public_key()
    assert str(svid_id(leaf)) == WEB  # not the CSR's spiffe://evil.org/admin
    assert leaf.subject.rfc4514_string() == "CN=web,O=example.org"  # not the CSR's CN


@pytest.mark.e2e
def test_csr_with_bad_signature_is_refused_and_nothing_written(admin):
    der = bytearray(_csr(ec.generate_private_key(ec.SECP256R1())).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    (admin / "req.der").write_bytes(bytes(der))
    before = files_under(admin)
    result = run_ca("issue", WEB, "--csr", "req.der", "--out", "svc", cwd=admin, check=False)
    assert "has a bad signature" in assert_one_line_error(result, 2)
    assert files_under(admin) == before
    assert _statuses(admin) == {}


@pytest.mark.e2e
def test_file_that_is_not_a_csr_is_refused(admin):
    (admin / "req.pem").write_text("hello\n")
    result = run_ca("issue", WEB, "--csr", "req.pem", cwd=admin, check=False)
    assert "req.pem is not a certificate signing request" in assert_one_line_error(result, 2)


# --- list, revoke, crl, bundle, inspect ---------------------------------------------------------


@pytest.mark.e2e
def test_revoke_shows_in_list_and_crl_and_verify(admin_db, ca_db):
    web = _issue_quietly(admin_db, WEB, "web", ca_db)
    api = _issue_quietly(admin_db, "spiffe://example.org/ns/prod/sa/api", "api", ca_db)
    result = run_ca("revoke", web, "--reason", "keyCompromise", cwd=admin_db, db=ca_db)
    assert result.returncode == 0, result.stderr
    assert f"revoked {web} {WEB} (keyCompromise)" in result.stdout

    listed = json.loads(run_ca("list", "--json", cwd=admin_db, db=ca_db).stdout)
    assert {entry["serial"]: entry["status"] for entry in listed} == {web: "revoked", api: "valid"}

    crl, root_crl = read_crls(admin_db / "ca-data" / "crl.pem")  # the intermediate's, and the root's over it
    assert len(root_crl) == 0
    intermediate = read_certificates(admin_db / "ca-data" / "intermediate.pem")[0]
    assert crl.is_signature_valid(intermediate.public_key())
    entry = crl.get_revoked_certificate_by_serial_number(int(web, 16))
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(int(api, 16)) is None

    trust = ("--bundle", "ca-data/bundle.pem", "--crl", "ca-data/crl.pem")
    verdict = run_ca("verify", "web/cert.pem", *trust, cwd=admin_db, check=False)
    assert verdict.returncode == 1
    assert verdict.stdout.startswith(f"revoked: certificate serial {web} ")
    assert verdict.stdout.rstrip().endswith("(keyCompromise)")
    still_fine = run_ca("verify", "api/cert.pem", *trust, cwd=admin_db)
    assert still_fine.returncode == 0
    assert still_fine.stdout.startswith("valid: spiffe://example.org/ns/prod/sa/api ")


@pytest.mark.e2e
def test_revoke_by_id_revokes_every_valid_certificate_of_it(admin_db, ca_db):
    serials = {_issue_quietly(admin_db, WEB, "web", ca_db) for _ in range(2)}
    other = _issue_quietly(admin_db, "spiffe://example.org/ns/prod/sa/api", "api", ca_db)
    result = run_ca("revoke", WEB, "--reason", "superseded", cwd=admin_db, db=ca_db)
    assert result.returncode == 0, result.stderr
    assert _statuses(admin_db, ca_db) == {**{s: ("revoked", "superseded") for s in serials}, other: ("valid", None)}


def test_revoke_twice_changes_nothing_the_second_time(admin, monkeypatch, capsys):
    serial = _issue_quietly(admin, WEB, "web")
    monkeypatch.chdir(admin)
    assert main(["revoke", serial, "--reason", "keyCompromise"]) == 0
    crl_before = (admin / "ca-data" / "crl.pem").read_bytes()
    capsys.readouterr()
    assert main(["revoke", serial, "--reason", "superseded"]) == 0
    out = capsys.readouterr().out
    assert "already revoked" in out and "(keyCompromise)" in out
    assert (admin / "ca-data" / "crl.pem").read_bytes() == crl_before


@pytest.mark.parametrize(
    ("target", "exit_code", "message"),
    [
        ("1a2b3c", 1, "no certificate in ca-data has serial 1a2b3c"),
        ("spiffe://example.org/nobody", 1, "no certificate in ca-data was issued for spiffe://example.org/nobody"),
        ("spiffe://example.org/a/", 2, "path must not end with '/'"),
        ("web", 2, "'web' is neither a certificate serial number (hex) nor a SPIFFE ID"),
    ],
)
def test_revoke_of_unknown_or_malformed_target_is_one_line(
    admin, monkeypatch, capsys, target, exit_code, message
):
    monkeypatch.chdir(admin)
    assert main(["revoke", target]) == exit_code
    err = capsys.readouterr().err
    assert err.startswith("ca: ") and err.count("\n") == 1 and message in err, err


def test_revoke_rejects_unknown_reason(admin, monkeypatch, capsys):
    monkeypatch.chdir(admin)
    assert main(["revoke", "1a", "--reason", "bored"]) == 2
    assert "invalid choice: 'bored'" in capsys.readouterr().err


@pytest.mark.e2e
def test_crl_writes_a_fresh_crl_to_out_and_state_dir(admin_db, ca_db):
    before = read_crls(admin_db / "ca-data" / "crl.pem")[0]
    result = run_ca("crl", "--out", "current.crl", cwd=admin_db, db=ca_db)
    assert result.returncode == 0, result.stderr
    crl, root_crl = read_crls(admin_db / "current.crl")
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number > before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert crl.next_update_utc is not None and crl.next_update_utc > crl.last_update_utc
    assert root_crl.issuer == read_certificates(admin_db / "ca-data" / "root.pem")[0].subject
    assert read_crls(admin_db / "ca-data" / "crl.pem") == [crl, root_crl]


def test_crl_and_bundle_print_pem_to_stdout(admin, monkeypatch, capsys):
    monkeypatch.chdir(admin)
    assert main(["crl"]) == 0
    assert capsys.readouterr().out == (admin / "ca-data" / "crl.pem").read_text()
    assert main(["bundle"]) == 0
    assert capsys.readouterr().out == (admin / "ca-data" / "bundle.pem").read_text()


@pytest.mark.e2e
def test_bundle_out_writes_the_roots(admin):
    assert run_ca("bundle", "--out", "roots.pem", cwd=admin).returncode == 0
    assert (admin / "roots.pem").read_bytes() == (admin / "ca-data" / "bundle.pem").read_bytes()


@pytest.mark.e2e
def test_list_json_is_an_array_with_the_contract_fields(admin_db, ca_db):
    assert json.loads(run_ca("list", "--json", cwd=admin_db, db=ca_db).stdout) == []
    issued = _issue_json(admin_db, WEB, db=ca_db)
    (entry,) = json.loads(run_ca("list", "--json", cwd=admin_db, db=ca_db).stdout)
    assert {"serial", "spiffe_id", "not_before", "not_after", "status"} <= set(entry)
    assert (entry["serial"], entry["spiffe_id"], entry["status"]) == (issued["serial"], WEB, "valid")
    assert (entry["not_before"], entry["not_after"]) == (issued["not_before"], issued["not_after"])


def test_list_text_is_a_table(admin, monkeypatch, capsys):
    serial = _issue_quietly(admin, WEB, "web")
    monkeypatch.chdir(admin)
    assert main(["list"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["SERIAL", "STATUS", "NOT_AFTER", "SPIFFE_ID"]
    assert row.split()[:2] == [serial, "valid"] and row.split()[3] == WEB


@pytest.mark.e2e
def test_list_into_a_closed_pipe_exits_without_a_traceback(admin):
    """`ca list | head -1`: the reader is gone before `ca list` writes; one quiet exit, code 1."""
    _issue_quietly(admin, WEB, "web")
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ca", "list"],
            cwd=admin, env=ca_env(), stdout=writer, stderr=subprocess.PIPE, text=True, timeout=60,
        )
    finally:
        os.close(writer)
    assert result.stderr == ""  # neither a traceback nor "Exception ignored ... BrokenPipeError"
    assert result.returncode == 1


@pytest.mark.e2e
def test_inspect_shows_id_serial_issuer_validity_key_and_fingerprint(admin):
    serial = _issue_quietly(admin, WEB, "web")
    leaf = read_certificates(admin / "web" / "cert.pem")[0]
    text = run_ca("inspect", "web/cert.pem", cwd=admin)
    assert text.returncode == 0, text.stderr
    fields = dict(line.split(None, 1) for line in text.stdout.splitlines())
    assert fields["spiffe_id"] == WEB
    assert fields["serial"] == serial
    assert fields["issuer"] == "CN=mtls-sidecar intermediate CA,O=example.org"
    assert fields["not_after"].startswith(f"{leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}  (valid)")
    assert fields["key_type"] == "ec-p256"
    expected = leaf.fingerprint(hashes.SHA256()).hex(":").upper()
    assert fields["sha256"] == expected

    as_json = json.loads(run_ca("inspect", "web/cert.pem", "--json", cwd=admin).stdout)
    assert as_json["spiffe_id"] == WEB and as_json["sha256_fingerprint"] == expected
    assert as_json["chain"] == ["CN=mtls-sidecar intermediate CA,O=example.org"]


@pytest.mark.e2e
def test_inspect_explains_why_a_ca_certificate_has_no_id(admin):
    facts = json.loads(run_ca("inspect", "ca-data/bundle.pem", "--json", cwd=admin).stdout)
    assert facts["spiffe_id"] is None and facts["ca"] is True
    assert "CA certificate" in facts["not_svid"]


@pytest.mark.e2e
def test_inspect_of_a_non_certificate_is_one_line(admin):
    (admin / "notes.txt").write_text("not a certificate")
    result = run_ca("inspect", "notes.txt", cwd=admin, check=False)
    assert "holds no readable certificate" in assert_one_line_error(result, 2)


@pytest.mark.e2e
def test_console_script_is_the_same_program(admin):
    script = os.path.join(os.path.dirname(os.sys.executable), "ca")
    if not os.path.exists(script):
        pytest.skip("console script not installed in this environment")
    via_script = subprocess.run([script, "bundle"], cwd=admin, env=ca_env(), capture_output=True, text=True)
    assert via_script.returncode == 0
    assert via_script.stdout == (admin / "ca-data" / "bundle.pem").read_text()
