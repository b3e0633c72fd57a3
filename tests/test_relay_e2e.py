"""The data phase end to end, through real `proxy run` processes on loopback.

A peer that breaks the TLS record layer after the handshake must read our fatal alert (then a FIN),
not a reset; and a conversation of many small requests under concurrency must come through a pair
of sidecars intact while one of them reloads.
"""

from __future__ import annotations

import signal
import socket
import struct
import threading

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from OpenSSL import SSL
from support.certs import API, FRONTEND
from support.network import App
from support.polling import wait_until
from support.processes import Sidecar, closed_event, inbound_config, outbound_config

from mtls.tlsio import alert_from_error

pytestmark = pytest.mark.e2e


# --- an illegal KeyUpdate, forged with the client's own traffic key ----------------------------------


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """HKDF-Expand-Label of RFC 8446 section 7.1, with SHA-256 and an empty context."""
    full = b"tls13 " + label
    info = struct.pack(">HB", length, len(full)) + full + b"\x00"
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def _record(secret: bytes, sequence: int, inner: bytes, content_type: int) -> bytes:
    """One TLS 1.3 record (TLS_AES_128_GCM_SHA256) protected with the traffic ``secret``."""
    key, iv = _expand_label(secret, b"key", 16), _expand_label(secret, b"iv", 12)
    nonce = bytes(a ^ b for a, b in zip(iv, sequence.to_bytes(12, "big")))
    plaintext = inner + bytes([content_type])
    header = b"\x17\x03\x03" + struct.pack(">H", len(plaintext) + 16)
    return header + AESGCM(key).encrypt(nonce, plaintext, header)


ILLEGAL_KEY_UPDATE = b"\x18\x00\x00\x01\x02"  # KeyUpdate, request_update = 2 (only 0 and 1 exist)


def _peer_sends_illegal_key_update(ident, port: int) -> tuple[int, str | None, bytes]:
    """Handshake, one echo round trip, then an illegal KeyUpdate followed by more bytes.

    Returns (our local port, the alert we read, what the raw socket gave after the alert: b"" for a FIN).
    Raises ConnectionResetError if the sidecar reset the connection instead.
    """
    secrets: list[bytes] = []
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_tls13_ciphersuites(b"TLS_AES_128_GCM_SHA256")
    ctx.use_certificate_chain_file(str(ident / "cert.pem"))
    ctx.use_privatekey_file(str(ident / "key.pem"))
    ctx.set_keylog_callback(lambda _conn, line: secrets.append(line))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.settimeout(None)  # OpenSSL reads the descriptor itself: blocking, but never past 10 s
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
    local_port = raw.getsockname()[1]
    conn = SSL.Connection(ctx, raw)
    conn.set_connect_state()
    try:
        conn.do_handshake()
        conn.sendall(b"hi")  # our application record number 0
        assert conn.recv(100) == b"hi"
        client_secret = next(
            bytes.fromhex(line.split()[2].decode()) for line in secrets if line.startswith(b"CLIENT_TRAFFIC_SECRET_0 ")
        )
        forged = _record(client_secret, 1, ILLEGAL_KEY_UPDATE, 22)
        trailing = b"\x17\x03\x03\x00\x20" + bytes(32)  # input the sidecar has not read when it refuses
        raw.sendall(forged + trailing)
        try:
            conn.recv(100)
        except SSL.Error as exc:
            alert = alert_from_error(exc)
        else:
            raise AssertionError("the sidecar must refuse the KeyUpdate, not relay it")
        raw.sendall(b"more bytes a careless peer still sends")  # the sidecar drains them: no RST
        after = raw.recv(100)
        return local_port, alert, after
    finally:
        raw.close()


def test_peer_sending_an_illegal_key_update_reads_our_alert_then_a_fin_not_a_reset(pki, tmp_path):
    app = App()
    side = Sidecar(tmp_path, "api", inbound_config(pki["ids"]["api"], f"127.0.0.1:{app.port}", [FRONTEND])).wait_ready()
    try:
        for attempt in range(8):  # every time, not by luck of timing
            local_port, alert, after = _peer_sends_illegal_key_update(pki["ids"]["frontend"], side.ports["api"])
            assert alert == "illegal_parameter", f"attempt {attempt}: read {alert!r}"
            assert after == b"", f"attempt {attempt}: after the alert comes a FIN, not {after!r}"
            event = closed_event(side, local_port)
            assert event["level"] == "warning" and event["reason"] == "protocol_error", event
            assert "bad key update" in event["detail"] and event["detail"].startswith("tls side:"), event
            assert event["bytes_in"] == 2 and event["bytes_out"] == 2, event
        wait_until(lambda: len(app.endings) == 8 or None, 10, "the app's connections to end")
        assert set(app.endings) == {"ConnectionResetError"}, "the app side of a refused stream is reset"
    finally:
        side.stop()
        app.close()


# --- many small requests under concurrency, with a reload in the middle ------------------------------

CLIENTS = 16
EXCHANGES = 200


def _conversation(port: int, client: int, halfway: threading.Event | None, done: list, errors: list) -> None:
    """``EXCHANGES`` request/replies of varied small sizes on one connection; each reply must be the
    echo of its request. With ``halfway``, pause after half of them until the reload has happened."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for number in range(EXCHANGES):
                if halfway is not None and number == EXCHANGES // 2:
                    assert halfway.wait(30), "the reload did not happen"
                request = f"{client:02d}:{number:04d}:".encode() + bytes([65 + client]) * (1 + number * 7 % 300)
                sock.sendall(request)
                reply = b""
                while len(reply) < len(request):
                    chunk = sock.recv(len(request) - len(reply))
                    assert chunk, f"client {client}: connection closed at exchange {number}"
                    reply += chunk
                assert reply == request, f"client {client}, exchange {number}: got {reply[:40]!r}"
                done[client] += 1
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b"", f"client {client}: the end of the conversation must come back as EOF"
    except (OSError, AssertionError) as exc:
        errors.append(f"client {client}: {exc}")


def test_sixteen_conversations_of_small_requests_survive_a_reload_of_both_sidecars(pki, tmp_path):
    app = App()
    api = Sidecar(tmp_path / "api", "api",
                  inbound_config(pki["ids"]["api"], f"127.0.0.1:{app.port}", [FRONTEND])).wait_ready()
    frontend = Sidecar(tmp_path / "frontend", "frontend",
                       outbound_config(pki["ids"]["frontend"], {"api": f"127.0.0.1:{api.ports['api']}"}, [API])
                       ).wait_ready()
    halfway = threading.Event()
    done = [0] * CLIENTS
    errors: list[str] = []
    threads = [
        threading.Thread(target=_conversation, args=(frontend.ports["api"], client, halfway if client % 2 else None,
                                                     done, errors), daemon=True)
        for client in range(CLIENTS)
    ]
    try:
        for thread in threads:
            thread.start()
        # Half the clients wait at their midpoint, so the reload finds every one of their connections open;
        # the other half keep sending through it.
        wait_until(lambda: all(done[c] >= EXCHANGES // 2 for c in range(1, CLIENTS, 2)) or None, 60,
                   "the pausing clients to reach their midpoint")
        for side in (api, frontend):
            side.signal(signal.SIGHUP)
        for side in (api, frontend):
            side.wait_event(lambda e: e["event"] == "reloaded", what="reloaded")
        assert all(done[c] == EXCHANGES // 2 for c in range(1, CLIENTS, 2)), "the reload came mid-conversation"
        halfway.set()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads), "conversations must end within a minute"
        assert errors == [], errors
        assert done == [EXCHANGES] * CLIENTS
        for side in (api, frontend):
            wait_until(lambda: len([e for e in side.events() if e["event"] == "conn_closed"]) >= CLIENTS or None, 10,
                       "every connection's closing line")
            closed = [e for e in side.events() if e["event"] == "conn_closed"]
            assert all(e["reason"] is None for e in closed), [e for e in closed if e["reason"]]
    finally:
        halfway.set()
        frontend.stop()
        api.stop()
        app.close()
