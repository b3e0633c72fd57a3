"""Hardening: hostile peers against real `proxy run` processes on loopback.

Each attack runs while a good client is served, and each refusal is checked in the JSON log:
slow and silent handshakes, thousands of idle connections, garbage and oversized records, old TLS
versions, certificates that break one rule each (inbound and outbound), and peers that reset,
half-close, cut the stream or stop reading after a completed handshake.
"""

from __future__ import annotations

import resource
import select
import socket
import ssl
import struct
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL
from support.certs import API, FRONTEND, TD, Authority
from support.network import (
    App,
    Trickle,
    client_context,
    client_hello,
    plain_attempt,
    read_until_closed,
    tls_attempt,
)
from support.polling import wait_until
from support.processes import (
    Sidecar,
    closed_event,
    denial,
    inbound_config,
    outbound_config,
    vm_rss_kib,
)

from mtls.spiffe import NotSvid, svid_id

pytestmark = pytest.mark.e2e

MIB = 1 << 20
GIB = 1 << 30
LINGER_RST = struct.pack("ii", 1, 0)


@pytest.fixture(scope="module")
def pki(pki, tmp_path_factory):
    """conftest's pki, plus for each side (clients, servers) identities whose certificate, signed by that
    CA's key, breaks one rule."""
    ours = Authority.from_state_dir(pki["ca_dir"])
    sub = ours.sub_authority()

    def bad_certificates(uri: str) -> dict:
        out = tmp_path_factory.mktemp(f"bad-{uri.rsplit('/', 1)[1]}")

        def bad_leaf(name, spiffe_id=uri, signer=ours, **rules):
            return signer.write_identity(out / name, signer.issue(spiffe_id, **rules)).directory

        return {
            "key_cert_sign_on_leaf": bad_leaf("kcs", key_cert_sign=True),
            "root_only_id": bad_leaf("root-id", f"spiffe://{TD}"),
            "chain_too_long": bad_leaf("long", signer=sub),
            "rsa_1024": bad_leaf("rsa1024", key=rsa.generate_private_key(65537, 1024)),
            "p192": bad_leaf("p192", key=ec.generate_private_key(ec.SECP192R1())),
        }

    return {**pki, "bad_clients": bad_certificates(FRONTEND), "bad_servers": bad_certificates(API)}


def good_request(side: Sidecar, pki, listener: str = "api", payload: bytes = b"good client") -> float:
    """One complete request by an allowed client; returns its latency in seconds."""
    started = time.monotonic()
    _, outcome = tls_attempt(client_context(pki["ids"]["frontend"]), side.ports[listener], payload)
    elapsed = time.monotonic() - started
    assert outcome == f"data {payload!r}", f"a good client must still be served, saw {outcome}"
    return elapsed


@pytest.fixture(scope="module")
def strict(pki, tmp_path_factory):
    """An api sidecar with the default 10 s handshake deadline, for refusals that must come at once."""
    app = App()
    side = Sidecar(tmp_path_factory.mktemp("strict"), "strict",
                   inbound_config(pki["ids"]["api"], f"127.0.0.1:{app.port}", [FRONTEND])).wait_ready()
    yield app, side
    side.stop()
    app.close()


# --- slow, silent and many -----------------------------------------------------------------------


def test_silent_and_trickling_clients_are_cut_at_the_handshake_deadline_while_good_clients_are_served(
    pki, tmp_path
):
    app = App()
    side = Sidecar(tmp_path, "slow", inbound_config(pki["ids"]["api"], f"127.0.0.1:{app.port}", [FRONTEND],
                                                    extra="timeouts: {handshake: 1s}\n")).wait_ready()
    port = side.ports["api"]
    silent = socket.create_connection(("127.0.0.1", port))
    trickling = socket.create_connection(("127.0.0.1", port))
    trickle = Trickle(trickling, client_hello(), interval=1.0, stop_after=6.0)
    try:
        good_request(side, pki)
        for sock, name in ((silent, "silent"), (trickling, "trickle")):
            event = denial(side, sock.getsockname()[1])
            assert event["reason"] == "handshake_timeout", (name, event)
            assert "1s" in event["detail"]
            assert 1.0 <= event["duration_s"] < 2.5, f"{name} must be cut at the 1 s deadline: {event}"
            _, how = read_until_closed(sock, 5)
            assert how != "timeout", f"the sidecar must close the {name} connection"
        assert 1 <= trickle.sent <= 3, "the trickle was cut after a byte or two, not served"
        good_request(side, pki)
        assert app.accepted == 2, "only the two good clients reached the app"
    finally:
        trickle.stop()
        silent.close()
        trickling.close()
        side.stop()
        app.close()


IDLE_CONNECTIONS = 2000


@pytest.fixture
def many_descriptors():
    """Raise this process's RLIMIT_NOFILE (inherited by the sidecars it starts) for thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = IDLE_CONNECTIONS + 512
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
    if soft != resource.RLIM_INFINITY and target < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit is {hard}; {wanted} descriptors are needed for "
                    f"{IDLE_CONNECTIONS} idle connections")
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_two_thousand_idle_connections_leave_a_good_client_served_within_a_second(pki, tmp_path, many_descriptors):
    app = App()
    side = Sidecar(tmp_path, "crowd", inbound_config(pki["ids"]["api"], f"127.0.0.1:{app.port}", [FRONTEND],
                                                     extra="timeouts: {handshake: 4s}\n"
                                                           "limits: {handshakes: {per_source: 4096}}\n")).wait_ready()
    idle: list[socket.socket] = []
    try:
        baseline = side.fd_count()
        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection(("127.0.0.1", side.ports["api"]), timeout=10))
        wait_until(lambda: side.fd_count() >= baseline + IDLE_CONNECTIONS, 20,
                   f"the sidecar to accept all {IDLE_CONNECTIONS} idle connections")

        latency = good_request(side, pki)
        assert latency < 1.0, f"a good request took {latency:.3f}s behind {IDLE_CONNECTIONS} idle connections"

        cut = wait_until(
            lambda: (n := side.count(lambda e: e.get("reason") == "handshake_timeout")) >= IDLE_CONNECTIONS and n,
            30, f"{IDLE_CONNECTIONS} handshake_timeout denials",
        )
        assert cut == IDLE_CONNECTIONS
        assert side.proc.poll() is None
        good_request(side, pki)
    finally:
        for sock in idle:
            sock.close()
        side.stop()
        app.close()


# --- garbage, truncation, oversized records: refused at once ---------------------------------------

HUGE_HELLO_HEADER = b"\x16\x03\x01\x40\x00" + b"\x01\xff\xff\xff"  # a full-size record; ClientHello of 16 MiB - 1


def _send_until_refused(sock: socket.socket, first: bytes, total: int, seconds: float) -> tuple[int, str | None]:
    """Send ``first``, then zeros, up to ``total`` bytes or ``seconds``; returns (bytes sent, error)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sock.settimeout(0.5)
    sent = 0
    end = time.monotonic() + seconds
    chunk = bytes(64 * 1024)
    data = first
    while sent < total and time.monotonic() < end:
        try:
            sent += sock.send(data)
        except socket.timeout:
            continue
        except OSError as exc:
            return sent, type(exc).__name__
        data = chunk
    return sent, None


@pytest.mark.parametrize(
    ("case", "detail"),
    [
        ("non_tls_bytes", "http request"),
        ("truncated_record", "closed by peer"),
        ("record_longer_than_tls_allows", "length too long"),
        ("client_hello_announcing_16_mib", "excessive message size"),
    ],
)
def test_garbage_and_oversized_records_are_refused_at_once_without_buffering(pki, strict, case, detail):
    app, side = strict
    accepted_before = app.accepted
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", side.ports["api"]), timeout=10) as sock:
        local_port = sock.getsockname()[1]
        if case == "non_tls_bytes":
            sock.sendall(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        elif case == "truncated_record":
            hello = client_hello()
            sock.sendall(hello[: len(hello) // 2])  # the record header promises more than ever comes
            sock.shutdown(socket.SHUT_WR)
        elif case == "record_longer_than_tls_allows":
            sock.sendall(b"\x16\x03\x01\xff\xff" + bytes(64))  # 65535 > 2^14 + 256
        else:
            sent, error = _send_until_refused(sock, HUGE_HELLO_HEADER, 16 * MIB, 5.0)
            assert error is not None, f"the sidecar kept accepting bytes: {sent} sent without a refusal"
            assert sent < 4 * MIB, f"the sidecar took in {sent} of the 16 MiB the ClientHello announced"
        reply, how = read_until_closed(sock, 5)
    elapsed = time.monotonic() - started
    assert how != "timeout" and elapsed < 5, f"closed at once, long before the 10 s handshake deadline ({elapsed:.2f}s)"
    if reply:
        assert reply[0] == 0x15 and reply[5] == 2, f"the only reply may be a fatal alert, got {reply[:16]!r}"
    event = denial(side, local_port)
    assert event["reason"] == "handshake_failed", event
    assert detail in event["detail"], event
    assert event["duration_s"] < 2.0, event
    assert app.accepted == accepted_before
    good_request(side, pki)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ssl.TLSVersion.TLSv1 and TLSv1_1 are deprecated
@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_1", "TLSv1"])
def test_old_tls_versions_are_refused_with_a_protocol_version_alert(pki, strict, version):
    app, side = strict
    accepted_before = app.accepted
    # SECLEVEL=0 so that the system OpenSSL really offers the old version instead of refusing locally.
    ctx = client_context(pki["ids"]["frontend"], maximum_version=getattr(ssl.TLSVersion, version), seclevel=0)
    local_port, outcome = tls_attempt(ctx, side.ports["api"])
    assert outcome.startswith("error") and "PROTOCOL_VERSION" in outcome.upper(), outcome
    event = denial(side, local_port)
    assert event["reason"] == "handshake_failed"
    assert "TLS 1.3" in event["detail"], event
    assert app.accepted == accepted_before
    good_request(side, pki)


# --- certificates that break one rule each ---------------------------------------------------------

# case -> (reason logged by the refusing sidecar, alert name the other side must see)
CERT_CASES = {
    "key_cert_sign_on_leaf": ("not_svid", "bad_certificate"),
    "root_only_id": ("not_svid", "bad_certificate"),
    "chain_too_long": ("untrusted_ca", "unknown_ca"),
    "rsa_1024": ("not_svid", "bad_certificate"),
}


def _alert_in(text: str, alert: str) -> bool:
    return alert.replace("_", " ") in text.lower() or alert.upper() in text.upper()


@pytest.mark.parametrize("case", [*sorted(CERT_CASES), "p192"])
def test_inbound_refuses_client_certificate_breaking_one_rule_with_a_fatal_alert(pki, strict, case):
    app, side = strict
    accepted_before = app.accepted
    ctx = client_context(pki["bad_clients"][case], seclevel=0)  # the client must not refuse to offer it
    local_port, outcome = tls_attempt(ctx, side.ports["api"])
    event = denial(side, local_port)
    assert outcome.startswith("error"), outcome
    if case == "p192":
        # No TLS 1.3 signature scheme exists for P-192, so a conforming client cannot sign with the key
        # and sends an empty Certificate: the sidecar never sees the P-192 leaf and refuses the client
        # for having none, with a certificate_required alert.
        assert event["reason"] == "no_client_cert", event
        assert _alert_in(outcome, "certificate_required"), outcome
    else:
        reason, alert = CERT_CASES[case]
        assert event["reason"] == reason, event
        assert _alert_in(outcome, alert), f"client should receive a fatal {alert} alert, saw {outcome}"
    assert event["detail"]
    assert app.accepted == accepted_before
    good_request(side, pki)


class TlsServer:
    """A stdlib TLS server presenting ``ident`` (SECLEVEL=0, so weak keys are offered); it records how
    each handshake ended and how many application bytes it received."""

    def __init__(self, ident):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        self.ctx.load_cert_chain(ident / "cert.pem", ident / "key.pem")
        self.errors: list[str] = []
        self.received = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(10)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    while data := tls.recv(65536):
                        self.received += len(data)
            except (OSError, ssl.SSLError) as exc:
                self.errors.append(str(exc))
            finally:
                conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def outbound_bad_servers(pki, tmp_path_factory):
    servers = {case: TlsServer(ident) for case, ident in pki["bad_servers"].items()}
    targets = {case.replace("_", "-"): f"127.0.0.1:{server.port}" for case, server in servers.items()}
    side = Sidecar(tmp_path_factory.mktemp("outbound-bad"), "web",
                   outbound_config(pki["ids"]["frontend"], targets, [API])).wait_ready()
    yield servers, side
    side.stop()
    for server in servers.values():
        server.close()


@pytest.mark.parametrize("case", [*sorted(CERT_CASES), "p192"])
def test_outbound_refuses_server_certificate_breaking_one_rule_with_a_fatal_alert(outbound_bad_servers, case):
    servers, side = outbound_bad_servers
    name = case.replace("_", "-")
    local_port, got, how = plain_attempt(side.ports[name], b"app secret that must not leave")
    assert how != "timeout" and got == b"", "the app must see its connection closed"
    app_addr = f"127.0.0.1:{local_port}"  # outbound: the app's end; peer_addr is the server's
    event = side.wait_event(lambda e: e["event"] == "conn_denied" and e.get("app_addr") == app_addr)
    assert event["peer_addr"] == f"127.0.0.1:{servers[case].port}"
    assert event["listener"] == name
    server = servers[case]
    wait_until(lambda: server.errors, 10, "the server to see the handshake fail")
    if case == "p192":
        # The server cannot sign a TLS 1.3 handshake with a P-192 key, so it never presents the
        # certificate: it refuses our TLS 1.3-only ClientHello with protocol_version.
        assert event["reason"] == "handshake_failed", event
        assert "alert" in event["detail"], event
    else:
        reason, alert = CERT_CASES[case]
        assert event["reason"] == reason, event
        assert _alert_in(server.errors[-1], alert), f"server should receive {alert}, saw {server.errors}"
    assert server.received == 0, "no application byte may reach a refused server"


def test_p192_leaf_is_not_an_svid_even_if_a_peer_managed_to_present_it(pki):
    cert = x509.load_pem_x509_certificate((pki["bad_clients"]["p192"] / "cert.pem").read_bytes())
    with pytest.raises(NotSvid, match="secp192r1"):
        svid_id(cert, "client")


# --- after the handshake: reset, half-close, cut, refusing to read ---------------------------------


def _settled(app: App) -> int:
    """Wait until every connection the app accepted has ended (earlier tests' clients included)."""
    return wait_until(lambda: len(app.endings) == app.accepted and len(app.endings) + 1, 10, "app to settle") - 1


def _new_endings(app: App, before: int) -> list[str]:
    """How the app's connections ended since ``before``, once every connection it accepted has ended."""
    wait_until(lambda: len(app.endings) == app.accepted and len(app.endings) > before, 10, "app connections to end")
    return app.endings[before:]


def _established(pki, port: int, payload: bytes = b"hi") -> ssl.SSLSocket:
    """A TLS connection through which ``payload`` made the round trip to the echo app."""
    tls = client_context(pki["ids"]["frontend"]).wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    tls.sendall(payload)
    assert tls.recv(100) == payload
    return tls


def test_peer_that_resets_after_the_handshake_gets_the_app_side_reset_and_a_log_line(pki, strict):
    app, side = strict
    endings_before = _settled(app)
    tls = _established(pki, side.ports["api"])
    local_port = tls.getsockname()[1]
    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    tls.close()  # no close_notify, and RST instead of FIN
    event = closed_event(side, local_port)
    assert event["bytes_in"] == 2 and event["bytes_out"] == 2
    assert "tls side" in event["detail"] and "reset" in event["detail"].lower(), event
    assert "ConnectionResetError" in _new_endings(app, endings_before), "a reset must reach the app as a reset"
    good_request(side, pki)


def _retrying(call, sock: socket.socket, deadline: float):
    """Run a pyOpenSSL call on a non-blocking socket, waiting (until ``deadline``) when it wants I/O."""
    while True:
        try:
            return call()
        except (SSL.WantReadError, SSL.WantWriteError) as exc:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the TLS peer went silent"
            want_read = isinstance(exc, SSL.WantReadError)
            select.select([sock] if want_read else [], [] if want_read else [sock], [], remaining)


def test_peer_half_close_reaches_the_app_as_eof_and_the_reply_still_flows_back(pki, strict):
    app, side = strict
    endings_before = _settled(app)
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate_chain_file(str(pki["ids"]["frontend"] / "cert.pem"))
    ctx.use_privatekey_file(str(pki["ids"]["frontend"] / "key.pem"))
    raw = socket.create_connection(("127.0.0.1", side.ports["api"]), timeout=10)
    raw.setblocking(False)
    local_port = raw.getsockname()[1]
    conn = SSL.Connection(ctx, raw)
    conn.set_connect_state()
    deadline = time.monotonic() + 10
    try:
        _retrying(conn.do_handshake, raw, deadline)
        _retrying(lambda: conn.sendall(b"last words"), raw, deadline)
        _retrying(conn.shutdown, raw, deadline)  # close_notify: we send no more, but keep reading
        raw.shutdown(socket.SHUT_WR)
        reply = b""
        clean_end = False
        while True:
            try:
                reply += _retrying(lambda: conn.recv(65536), raw, deadline)
            except SSL.ZeroReturnError:
                clean_end = True
                break
        assert reply == b"last words"
        assert clean_end, "the app's half-close must come back as close_notify"
    finally:
        raw.close()
    event = closed_event(side, local_port)
    assert event["reason"] is None and event["bytes_in"] == 10 and event["bytes_out"] == 10, event
    assert _new_endings(app, endings_before) == ["eof"]
    good_request(side, pki)


def test_peer_that_cuts_the_stream_without_close_notify_is_passed_on_as_a_reset_not_eof(pki, strict):
    app, side = strict
    endings_before = _settled(app)
    tls = _established(pki, side.ports["api"])
    local_port = tls.getsockname()[1]
    tls.shutdown(socket.SHUT_WR)  # TCP FIN without close_notify: possibly a truncation attack
    _, how = read_until_closed(tls, 5)
    assert how != "timeout"
    event = closed_event(side, local_port)
    assert "no close_notify" in event["detail"], event
    assert "ConnectionResetError" in _new_endings(app, endings_before), \
        "a truncated stream must not look complete to the app"
    tls.close()
    good_request(side, pki)


class Flood:
    """An app that, once a request arrives, tries to send ``total`` bytes within ``seconds``."""

    def __init__(self, total: int = GIB, seconds: float = 12.0):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.total, self.seconds = total, seconds
        self.sent = 0
        self.last_progress = time.monotonic()
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.recv(100)
            conn.settimeout(0.1)
            chunk = bytes(MIB)
            end = time.monotonic() + self.seconds
            while self.sent < self.total and time.monotonic() < end and not self.stop.is_set():
                try:
                    self.sent += conn.send(chunk)
                except socket.timeout:
                    continue
                except OSError:
                    return
                self.last_progress = time.monotonic()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_peer_that_stops_reading_while_the_app_sends_a_gibibyte_does_not_grow_sidecar_memory(pki, tmp_path):
    flood = Flood()
    echo = App()
    config = inbound_config(pki["ids"]["api"], f"127.0.0.1:{flood.port}", [FRONTEND]) + (
        f"  - name: echo\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{echo.port}\n    allow: [{FRONTEND}]\n"
    )
    side = Sidecar(tmp_path, "flood", config).wait_ready()
    raw = socket.create_connection(("127.0.0.1", side.ports["api"]), timeout=10)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    local_port = raw.getsockname()[1]
    tls = client_context(pki["ids"]["frontend"]).wrap_socket(raw)  # takes over raw's descriptor
    try:
        start_rss = vm_rss_kib(side.proc.pid)
        tls.sendall(b"send me everything")  # ...and never read again
        samples = [start_rss]

        def app_blocked() -> bool:  # back-pressure reached it; meanwhile, the sidecar's RSS is sampled
            samples.append(vm_rss_kib(side.proc.pid))
            return flood.sent > 0 and time.monotonic() - flood.last_progress > 1.5

        wait_until(app_blocked, timeout=12, what="the app's writes to stall (back-pressure)", interval=0.05)
        samples += [vm_rss_kib(side.proc.pid) for _ in range(10)]
        peak = max(samples)
        good_request(side, pki, "echo")
        assert flood.sent < GIB, "the push must have stalled"
        assert time.monotonic() - flood.last_progress > 1.0, "the app must be blocked, not still pushing"
        assert flood.sent < 64 * MIB, f"{flood.sent / MIB:.0f} MiB left the app: something buffers without bound"
        growth = (peak - start_rss) / 1024
        assert growth < 64, f"sidecar RSS grew by {growth:.1f} MiB while the peer refused to read"
    finally:
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        tls.close()
        flood.close()
    event = closed_event(side, local_port)
    assert event["bytes_out"] < 64 * MIB
    assert side.proc.poll() is None
    side.stop()
    echo.close()


class Sink:
    """An app that accepts and then never reads."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_app_that_stops_reading_while_the_peer_sends_a_gibibyte_does_not_grow_sidecar_memory(pki, tmp_path):
    sink = Sink()
    echo = App()
    config = inbound_config(pki["ids"]["api"], f"127.0.0.1:{sink.port}", [FRONTEND]) + (
        f"  - name: echo\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{echo.port}\n    allow: [{FRONTEND}]\n"
    )
    side = Sidecar(tmp_path, "sink", config).wait_ready()
    raw = socket.create_connection(("127.0.0.1", side.ports["api"]), timeout=10)
    local_port = raw.getsockname()[1]
    tls = client_context(pki["ids"]["frontend"]).wrap_socket(raw)  # takes over raw's descriptor
    try:
        wait_until(lambda: sink.conns, 10, "the sidecar to connect to the app")
        start_rss = vm_rss_kib(side.proc.pid)
        tls.settimeout(0.1)
        chunk = bytes(MIB)
        sent = 0
        peak = start_rss
        last_progress = time.monotonic()
        end = time.monotonic() + 12
        while sent < GIB and time.monotonic() < end and time.monotonic() - last_progress < 1.5:
            try:
                sent += tls.send(chunk)
                last_progress = time.monotonic()
            except (socket.timeout, ssl.SSLWantWriteError):
                pass
            peak = max(peak, vm_rss_kib(side.proc.pid))
        good_request(side, pki, "echo")
        assert sent < 64 * MIB, f"{sent / MIB:.0f} MiB went in: something buffers without bound"
        growth = (max(peak, vm_rss_kib(side.proc.pid)) - start_rss) / 1024
        assert growth < 64, f"sidecar RSS grew by {growth:.1f} MiB while the app refused to read"
    finally:
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        tls.close()
        sink.close()
    closed_event(side, local_port)
    assert side.proc.poll() is None
    side.stop()
    echo.close()
