"""`ca serve` as a real process: renewal over mTLS, one-time-token enrollment, refusals, concurrency, logs,
rotation while serving, SIGTERM. The client side is the stdlib (`ssl`, `http.client`), not our own code."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import ssl
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support.ca_cli import issue, run_ca
from support.certs import TD, WEB, Authority
from support.polling import DEADLINE, wait_until
from support.processes import CaService

from ca import enrollment, issuance
from ca.store import StateDir

pytestmark = pytest.mark.e2e


def post(service: CaService, path: str, body: bytes, *, ident: Path | None = None,
         content_type: str = "application/pkcs10", bundle: Path | None = None):
    """POST over TLS 1.3, verifying the service against the CA's bundle; (status, body, server leaf)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the service is identified by its SPIFFE ID, checked below
    ctx.load_verify_locations(bundle or service.ca_dir / "bundle.pem")
    if ident is not None:
        ctx.load_cert_chain(ident / "cert.pem", ident / "key.pem")
    conn = http.client.HTTPSConnection("127.0.0.1", service.port, context=ctx, timeout=DEADLINE)
    try:
        conn.request("POST", path, body, {"content-type": content_type})
        response = conn.getresponse()
        data = response.read()
        server = x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True))
        return response.status, data, server
    finally:
        conn.close()


def csr_for(key=None, *, names=()) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")])
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(n) for n in names]), critical=False
        )
    return key, builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def bad_signature_csr() -> bytes:
    """A CSR whose signature does not verify: the last byte of the ECDSA signature flipped."""
    _, pem = csr_for()
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    lines = base64.encodebytes(bytes(der)).replace(b"\n", b"")
    body = b"\n".join(lines[i : i + 64] for i in range(0, len(lines), 64))
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"\n-----END CERTIFICATE REQUEST-----\n"


def error_of(body: bytes) -> str:
    return json.loads(body)["error"]


def uri_of(cert: x509.Certificate) -> str:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    (uri,) = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uri


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory):
    """The CA (SQLite) of ``service``, for tests where the index engine cannot matter."""
    directory = tmp_path_factory.mktemp("serve") / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=directory)
    return directory


@pytest.fixture(scope="module")
def service(ca_dir, tmp_path_factory):
    svc = CaService(ca_dir, tmp_path_factory.mktemp("serve-logs"))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def engine_service(request, module_ca_db, tmp_path_factory):
    """``service`` once per index engine, for the tests whose outcome the index decides: on SQLite it is
    ``service`` itself; on PostgreSQL a CA of its own, made by `ca init` with $CA_DB, served from the same
    database."""
    if module_ca_db is None:
        yield request.getfixturevalue("service")
        return
    directory = tmp_path_factory.mktemp("serve-postgresql") / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=directory, db=module_ca_db)
    svc = CaService(directory, tmp_path_factory.mktemp("serve-postgresql-logs"), db=module_ca_db)
    yield svc
    svc.stop()


def issue_web(svc: CaService, out: Path) -> Path:
    return issue(svc.ca_dir, out, WEB, "--ttl", "2h", "--dns", "web.prod.svc", db=svc.db)


@pytest.fixture
def web(service, tmp_path):
    return issue_web(service, tmp_path / "web")


@pytest.fixture
def engine_web(engine_service, tmp_path):
    """``web`` issued by ``engine_service``'s CA."""
    return issue_web(engine_service, tmp_path / "web")


def state_of(svc: CaService) -> StateDir:
    return StateDir.open(svc.ca_dir, svc.db)


def token(svc: CaService, spiffe_id: str, *extra: str) -> str:
    return run_ca("token", spiffe_id, *extra, ca_dir=svc.ca_dir, db=svc.db).stdout.strip()


def enroll_body(tok: str, csr_pem: bytes) -> bytes:
    return json.dumps({"token": tok, "csr": csr_pem.decode()}).encode()


# --- renewal ---------------------------------------------------------------------------------------


def test_service_presents_an_svid_for_spiffe_td_ca_chaining_to_the_bundle(engine_service, engine_web):
    # verify_mode=CERT_REQUIRED passed:
    status, _, server = post(engine_service, "/v1/renew", csr_for()[1], ident=engine_web)
    assert status == 200 and uri_of(server) == f"spiffe://{TD}/ca"


def test_renew_returns_a_new_certificate_for_the_same_id_over_the_csr_key(engine_service, engine_web):
    old = x509.load_pem_x509_certificates((engine_web / "cert.pem").read_bytes())[0]
    key, csr = csr_for(names=[f"spiffe://{TD}/ns/prod/sa/admin"])  # the CSR's names are ignored
    status, body, _ = post(engine_service, "/v1/renew", csr, ident=engine_web)
    assert status == 200, body
    leaf, intermediate = x509.load_pem_x509_certificates(body)
    assert uri_of(leaf) == WEB and leaf.subject.rfc4514_string() == f"CN=web,O={TD}"
    assert leaf.serial_number != old.serial_number
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert leaf.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    leaf.verify_directly_issued_by(intermediate)
    lifetime = leaf.not_valid_after_utc - _now()
    assert timedelta(hours=2) - timedelta(seconds=30) < lifetime <= timedelta(hours=2)  # same TTL as the old one
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web.prod.svc"]  # carried over, not from the CSR
    record = state_of(engine_service).record(leaf.serial_number)
    assert record is not None and record.spiffe_id == WEB


def test_renew_is_refused_403_for_a_revoked_certificate(engine_service, engine_web):
    serial = x509.load_pem_x509_certificates((engine_web / "cert.pem").read_bytes())[0].serial_number
    run_ca("revoke", format(serial, "x"), ca_dir=engine_service.ca_dir, db=engine_service.db)
    status, body, _ = post(engine_service, "/v1/renew", csr_for()[1], ident=engine_web)
    assert status == 403 and error_of(body) == "revoked"
    assert "revoked at" in json.loads(body)["detail"]


def test_renew_is_refused_403_for_an_expired_certificate(engine_service, tmp_path):
    state = state_of(engine_service)
    start = state.load_certificate("intermediate.pem").not_valid_before_utc + timedelta(seconds=1)
    issuance.issue(state, WEB, ttl=timedelta(seconds=10), now=start, out_dir=tmp_path / "expired")
    status, body, _ = post(engine_service, "/v1/renew", csr_for()[1], ident=tmp_path / "expired")
    assert status == 403 and error_of(body) == "expired"


def test_renew_without_a_client_certificate_is_refused_403(service):
    status, body, _ = post(service, "/v1/renew", csr_for()[1])
    assert status == 403 and error_of(body) == "no_client_cert"


def test_renew_with_a_certificate_of_another_ca_is_refused_403(service, tmp_path):
    foreign = Authority.create("Untrusted")
    ident = foreign.write_identity(tmp_path / "foreign", foreign.issue(WEB)).directory
    status, body, _ = post(service, "/v1/renew", csr_for()[1], ident=ident)
    assert status == 403 and error_of(body) == "untrusted_ca"


def test_renew_with_a_forged_certificate_unknown_to_the_index_is_refused_403(engine_service, tmp_path):
    ours = Authority.from_state_dir(engine_service.ca_dir)  # signed with the CA's key, never recorded:
    ident = ours.write_identity(tmp_path / "forged", ours.issue(WEB)).directory
    status, body, _ = post(engine_service, "/v1/renew", csr_for()[1], ident=ident)
    assert status == 403 and error_of(body) == "unknown_certificate"


def test_renew_with_a_bad_csr_signature_is_refused_400(service, web):
    status, body, _ = post(service, "/v1/renew", bad_signature_csr(), ident=web)
    assert status == 400 and error_of(body) == "bad_csr"
    assert "bad signature" in json.loads(body)["detail"]


def test_twenty_concurrent_renewals_all_succeed_with_unique_serials(engine_service, tmp_path):
    state = state_of(engine_service)
    idents = [
        issuance.issue(state, f"spiffe://{TD}/ns/load/sa/w{i}", ttl=timedelta(hours=1), now=_now(),
                         out_dir=tmp_path / f"w{i}").cert_path.parent
        for i in range(20)
    ]
    barrier = threading.Barrier(len(idents))
    results: dict[int, tuple] = {}

    def renew(i: int) -> None:
        csr = csr_for()[1]
        barrier.wait()
        results[i] = post(engine_service, "/v1/renew", csr, ident=idents[i])

    threads = [threading.Thread(target=renew, args=(i,)) for i in range(len(idents))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    assert sorted(results) == list(range(20))
    assert all(status == 200 for status, _, _ in results.values()), [b for s, b, _ in results.values() if s != 200]
    leaves = {i: x509.load_pem_x509_certificates(body)[0] for i, (_, body, _) in results.items()}
    assert len({leaf.serial_number for leaf in leaves.values()}) == 20
    assert all(uri_of(leaves[i]) == f"spiffe://{TD}/ns/load/sa/w{i}" for i in range(20))
    recorded = {record.serial for record in state.records()}
    assert all(leaf.serial_number in recorded for leaf in leaves.values())


# --- enrollment ------------------------------------------------------------------------------------


def test_enroll_with_a_token_works_once_and_the_second_use_is_refused(engine_service):
    spiffe_id = f"spiffe://{TD}/ns/prod/sa/new-{os.urandom(3).hex()}"
    tok = token(engine_service, spiffe_id, "--ttl", "10m")
    assert tok.startswith("mst1_") and len(tok) > 40
    key, csr = csr_for(names=[f"spiffe://{TD}/ns/prod/sa/admin"])
    status, body, _ = post(engine_service, "/v1/enroll", enroll_body(tok, csr), content_type="application/json")
    assert status == 200, body
    leaf = x509.load_pem_x509_certificates(body)[0]
    assert uri_of(leaf) == spiffe_id
    status, body, _ = post(engine_service, "/v1/enroll", enroll_body(tok, csr_for()[1]),
                           content_type="application/json")
    assert status == 403 and error_of(body) == "token_used"


def test_enroll_with_an_expired_token_is_refused(engine_service):
    issued = enrollment.create_token(
        state_of(engine_service), f"spiffe://{TD}/ns/prod/sa/late", ttl=timedelta(minutes=10),
        now=_now() - timedelta(hours=1),
    )
    status, body, _ = post(engine_service, "/v1/enroll", enroll_body(issued.token, csr_for()[1]),
                           content_type="application/json")
    assert status == 403 and error_of(body) == "token_expired"


def test_enroll_with_an_unknown_token_is_refused(engine_service):
    status, body, _ = post(engine_service, "/v1/enroll", enroll_body("mst1_" + "A" * 43, csr_for()[1]),
                           content_type="application/json")
    assert status == 403 and error_of(body) == "invalid_token"


def test_enroll_with_a_bad_csr_signature_is_refused_and_does_not_spend_the_token(engine_service):
    tok = token(engine_service, f"spiffe://{TD}/ns/prod/sa/careful")
    status, body, _ = post(engine_service, "/v1/enroll", enroll_body(tok, bad_signature_csr()),
                           content_type="application/json")
    assert status == 400 and error_of(body) == "bad_csr"
    status, _, _ = post(engine_service, "/v1/enroll", enroll_body(tok, csr_for()[1]), content_type="application/json")
    assert status == 200


def test_concurrent_enrollments_with_one_token_issue_exactly_one_certificate(engine_service):
    tok = token(engine_service, f"spiffe://{TD}/ns/prod/sa/race")
    barrier = threading.Barrier(10)
    statuses: list[int] = []

    def attempt() -> None:
        body = enroll_body(tok, csr_for()[1])
        barrier.wait()
        statuses.append(post(engine_service, "/v1/enroll", body, content_type="application/json")[0])

    threads = [threading.Thread(target=attempt) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    assert sorted(statuses) == [200] + [403] * 9


def test_enroll_with_a_malformed_body_is_refused_400(service):
    status, body, _ = post(service, "/v1/enroll", b"token=abc", content_type="application/json")
    assert status == 400 and error_of(body) == "bad_request"


def test_ca_refuses_to_issue_or_enroll_the_services_own_id(ca_dir, tmp_path):
    for args in (("issue", f"spiffe://{TD}/ca", "--out", str(tmp_path / "fake")), ("token", f"spiffe://{TD}/ca")):
        result = run_ca(*args, ca_dir=ca_dir, check=False)
        assert result.returncode == 1 and "reserved for the CA service" in result.stderr


# --- protocol, logs, lifecycle ---------------------------------------------------------------------


def get(service: CaService, path: str) -> tuple[int, bytes]:
    """GET over TLS 1.3 without a client certificate, verifying the service against the CA's bundle."""
    ctx = ssl.create_default_context(cafile=service.ca_dir / "bundle.pem")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the service is identified by its SPIFFE ID (see post)
    conn = http.client.HTTPSConnection("127.0.0.1", service.port, context=ctx, timeout=DEADLINE)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_healthz_and_readyz_answer_200_on_either_engine(engine_service):
    assert get(engine_service, "/healthz") == (200, b"ok\n")
    assert get(engine_service, "/readyz")[0] == 200


def test_unknown_path_is_404_and_wrong_method_405(service):
    assert post(service, "/v1/nothing", b"")[0] == 404
    status, body, _ = post(service, "/healthz", b"")
    assert status == 405 and error_of(body) == "method_not_allowed"


def test_each_request_is_logged_as_one_json_line_with_its_decision(service, web):
    before = len(service.requests())
    post(service, "/v1/renew", csr_for()[1], ident=web)
    post(service, "/v1/renew", csr_for()[1])
    wait_until(lambda: len(service.requests()) >= before + 2, what="two request lines")
    issued, refused = service.requests()[before : before + 2]
    assert issued["decision"] == "issued" and issued["status"] == 200 and issued["path"] == "/v1/renew"
    assert issued["peer_id"] == WEB and issued["spiffe_id"] == WEB and issued["serial"]
    assert refused["decision"] == "refused" and refused["status"] == 403 and refused["reason"] == "no_client_cert"


def test_rotation_while_serving_issues_from_the_new_intermediate_and_switches_the_service_at_drop_old(tmp_path):
    ca_dir = tmp_path / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    old = issue(ca_dir, tmp_path / "old", WEB)
    svc = CaService(ca_dir, tmp_path)
    try:
        first = next(e for e in svc.events() if e["event"] == "service_certificate")
        run_ca("rotate", ca_dir=ca_dir)
        second = wait_until(lambda: next((e for e in svc.events() if e["event"] == "service_certificate"
                                          and e["serial"] != first["serial"]), None), what="new service cert")
        # The service stays on the old generation while its root is in the bundle: whoever holds only
        # the old root (a federated sidecar) still authenticates it and fetches the new root.
        assert second["issuer"] == f"CN=mtls-sidecar intermediate CA,O={TD}"
        status, body, server = post(svc, "/v1/renew", csr_for()[1], ident=old)
        assert status == 200
        assert x509.load_pem_x509_certificates(body)[0].issuer.rfc4514_string().endswith("CA 2,O=example.org")
        records = {format(r.serial, "x"): r for r in StateDir.open(ca_dir).records()}
        assert records[first["serial"]].reason == "superseded"
        run_ca("revoke", format(x509.load_pem_x509_certificates((old / "cert.pem").read_bytes())[0]
                                        .serial_number, "x"), ca_dir=ca_dir)
        run_ca("bundle", "--drop-old", ca_dir=ca_dir)  # the service certificate does not hold it up
        third = wait_until(lambda: next((e for e in svc.events() if e["event"] == "service_certificate"
                                         and e["issuer"].endswith("CA 2,O=example.org")), None), what="switch")
        assert third["serial"] != second["serial"]
    finally:
        assert svc.stop() == 0


def test_sigterm_stops_the_service_cleanly_with_exit_0(ca_dir, tmp_path):
    svc = CaService(ca_dir, tmp_path)
    assert post(svc, "/v1/nothing", b"")[0] == 404
    assert svc.stop() == 0
    assert [e["event"] for e in svc.events()][-3:] == ["shutdown", "draining", "stopped"]


def test_sighup_rereads_the_state_and_keeps_serving(ca_dir, tmp_path):
    """Operators send SIGHUP to reload; it must not kill the service (the default action of SIGHUP)."""
    svc = CaService(ca_dir, tmp_path)
    svc.signal(signal.SIGHUP)
    svc.wait_event(lambda e: e["event"] == "reload_requested", what="SIGHUP noticed")
    assert post(svc, "/v1/nothing", b"")[0] == 404
    assert svc.stop() == 0


def test_serve_refuses_a_bad_listen_address_with_exit_2(ca_dir):
    result = run_ca("serve", "--listen", "nonsense", ca_dir=ca_dir, check=False)
    assert result.returncode == 2 and result.stderr.startswith("ca: --listen")
