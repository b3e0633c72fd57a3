"""Our output checked by a tool we did not write: the ``openssl`` command line."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from support.ca_cli import run_ca
from support.certs import WEB

from ca.authority import Issuer, certificate_pem
from ca.inspection import read_certificates

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]

_EXTENSION = re.compile(r"^ {12}(?P<name>[^ ].*?):(?P<critical> critical)? ?$")


def openssl(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=30)


def extensions_from_text(text: str) -> dict[str, tuple[bool, str]]:
    """``openssl x509 -text -noout`` -> {extension name: (critical, its value lines joined)}."""
    found: dict[str, tuple[bool, list[str]]] = {}
    current = None
    for line in text[text.index("X509v3 extensions:") :].splitlines()[1:]:
        match = _EXTENSION.match(line)
        if match:
            current = match["name"]
            found[current] = (bool(match["critical"]), [])
        elif line.startswith(" " * 16) and current:
            found[current][1].append(line.strip())
        else:
            break
    return {name: (critical, " ".join(lines)) for name, (critical, lines) in found.items()}


@pytest.fixture(scope="module", params=["ec-p256", "ed25519", "rsa-3072"])
def issued(request, tmp_path_factory):
    """A CA of each key type, made with `ca init`, and one leaf made with `ca issue --dns`."""
    directory = tmp_path_factory.mktemp(request.param)
    init = run_ca("init", "--trust-domain", "example.org", "--key-type", request.param, cwd=directory)
    assert init.returncode == 0, init.stderr
    issue = run_ca("issue", WEB, "--out", "web", "--dns", "web.prod.svc", cwd=directory)
    assert issue.returncode == 0, issue.stderr
    leaf, intermediate = read_certificates(directory / "web" / "cert.pem")
    (directory / "leaf.pem").write_bytes(certificate_pem(leaf))
    (directory / "intermediate.pem").write_bytes(certificate_pem(intermediate))
    return directory


@pytest.mark.parametrize("purpose", ["sslclient", "sslserver"])
def test_openssl_verifies_leaf_for_purpose(issued, purpose):
    result = openssl(
        "verify", "-x509_strict", "-CAfile", "web/bundle.pem", "-untrusted", "intermediate.pem",
        "-purpose", purpose, "leaf.pem", cwd=issued,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "leaf.pem: OK"


def test_openssl_shows_leaf_extensions_with_svid_criticality(issued):
    text = openssl("x509", "-in", "leaf.pem", "-text", "-noout", cwd=issued).stdout
    extensions = extensions_from_text(text)
    assert extensions["X509v3 Basic Constraints"] == (True, "CA:FALSE")
    assert extensions["X509v3 Key Usage"] == (True, "Digital Signature")
    assert extensions["X509v3 Extended Key Usage"] == (
        False,
        "TLS Web Server Authentication, TLS Web Client Authentication",
    )
    assert extensions["X509v3 Subject Alternative Name"] == (False, f"URI:{WEB}, DNS:web.prod.svc")
    assert "X509v3 Subject Key Identifier" in extensions
    assert "X509v3 Authority Key Identifier" in extensions
    assert text.count("URI:") == 1


def test_openssl_shows_leaf_subject_with_trust_domain_and_workload_name(issued):
    """What nginx, haproxy and stunnel log as the client DN."""
    result = openssl("x509", "-in", "leaf.pem", "-noout", "-subject", "-nameopt", "RFC2253", cwd=issued)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "subject=CN=web,O=example.org"


def test_openssl_shows_intermediate_as_pathlen_zero_ca_for_the_trust_domain(issued):
    text = openssl("x509", "-in", "intermediate.pem", "-text", "-noout", cwd=issued).stdout
    extensions = extensions_from_text(text)
    assert extensions["X509v3 Basic Constraints"] == (True, "CA:TRUE, pathlen:0")
    assert extensions["X509v3 Key Usage"] == (True, "Certificate Sign, CRL Sign")
    assert extensions["X509v3 Name Constraints"] == (True, "Permitted: URI:example.org")


def test_openssl_shows_root_as_critical_ca(issued):
    text = openssl("x509", "-in", "ca-data/root.pem", "-text", "-noout", cwd=issued).stdout
    assert extensions_from_text(text)["X509v3 Basic Constraints"] == (True, "CA:TRUE, pathlen:1")


def test_openssl_enforces_the_intermediate_name_constraint(issued):
    """Even with the intermediate's key, a certificate for another trust domain does not verify."""
    state = issued / "ca-data"
    key = serialization.load_pem_private_key((state / "intermediate.key").read_bytes(), password=None)
    intermediate = read_certificates(state / "intermediate.pem")[0]
    rogue = Issuer(intermediate, key, "other.org")  # skips the CA's own trust-domain check
    leaf = read_certificates(issued / "leaf.pem")[0]
    foreign = rogue.issue(
        "spiffe://other.org/web", leaf.public_key(), ttl=leaf.not_valid_after_utc - leaf.not_valid_before_utc,
        now=leaf.not_valid_before_utc,
    )
    (issued / "foreign.pem").write_bytes(certificate_pem(foreign))
    result = openssl(
        "verify", "-CAfile", "web/bundle.pem", "-untrusted", "intermediate.pem", "foreign.pem", cwd=issued
    )
    assert result.returncode != 0
    assert "permitted subtree violation" in result.stdout + result.stderr


def test_openssl_sees_revocation_in_our_crl(tmp_path):
    assert run_ca("init", "--trust-domain", "example.org", cwd=tmp_path).returncode == 0
    for name in ("web", "api"):
        assert run_ca("issue", f"spiffe://example.org/{name}", cwd=tmp_path).returncode == 0
    serial = format(read_certificates(tmp_path / "web" / "cert.pem")[0].serial_number, "x")
    assert run_ca("revoke", serial, "--reason", "keyCompromise", cwd=tmp_path).returncode == 0

    def verify_with_crl(name):
        return openssl(
            "verify", "-crl_check", "-CAfile", "ca-data/bundle.pem", "-CRLfile", "ca-data/crl.pem",
            "-untrusted", "ca-data/intermediate.pem", f"{name}/cert.pem", cwd=tmp_path,
        )

    revoked = verify_with_crl("web")
    assert revoked.returncode != 0 and "certificate revoked" in revoked.stdout + revoked.stderr
    assert verify_with_crl("api").returncode == 0
    crl_check = openssl(
        "crl", "-in", "ca-data/crl.pem", "-CAfile", "ca-data/intermediate.pem", "-noout", cwd=tmp_path
    )
    assert "verify OK" in crl_check.stdout + crl_check.stderr


def test_openssl_made_csr_is_certified_with_our_identity(tmp_path):
    assert run_ca("init", "--trust-domain", "example.org", cwd=tmp_path).returncode == 0
    made = openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "workload.key", "-subj", "/CN=whatever", "-out", "workload.csr", cwd=tmp_path,
    )
    assert made.returncode == 0, made.stderr
    result = run_ca("issue", WEB, "--csr", "workload.csr", "--out", "svc", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    matches = openssl("x509", "-in", "svc/cert.pem", "-noout", "-pubkey", cwd=tmp_path).stdout
    assert matches == openssl("pkey", "-in", "workload.key", "-pubout", cwd=tmp_path).stdout
    assert not (tmp_path / "svc" / "key.pem").exists()


def _strict_tls13_context(side: int, identity: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(side)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(identity / "cert.pem", identity / "key.pem")
    context.load_verify_locations(identity / "bundle.pem")
    context.check_hostname = False  # SPIFFE identities are URIs, not host names
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default; stricter than 3.11's
    return context


def test_python_ssl_completes_strict_tls13_mutual_handshake(issued):
    """What the sidecar will do with these files: TLS 1.3, client certificate required, both chains verified."""
    identity = issued / "web"
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server_context = _strict_tls13_context(ssl.PROTOCOL_TLS_SERVER, identity)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    client = _strict_tls13_context(ssl.PROTOCOL_TLS_CLIENT, identity).wrap_bio(client_in, client_out)
    pending = {"client": client, "server": server}
    for _ in range(10):  # each round moves the bytes written so far to the other side
        for name, connection in list(pending.items()):
            try:
                connection.do_handshake()
                del pending[name]
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if not pending:
            break
    assert not pending
    for connection in (client, server):
        assert connection.version() == "TLSv1.3"
        assert ("URI", WEB) in connection.getpeercert()["subjectAltName"]
