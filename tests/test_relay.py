"""proxy.relay.Relay.step: the data phase of one connection, driven by hand over two socketpairs.

The sidecar's TLS end and a peer are real pyOpenSSL connections (TLS 1.3) over one socketpair; the
sidecar's plaintext end and the app are the two ends of another. A test writes on the peer or the app,
calls ``step`` as the reactor would when a socket has news, and reads what came out on the other side.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest
from OpenSSL import SSL
from support.certs import API

from mtls.tlsio import TlsStream, present, tls13_context
from proxy.relay import SCRATCH_SIZE, Link, Relay


@dataclass
class Ends:
    """The four ends: the sidecar's ``tls`` and ``plain`` (what Relay gets), the ``peer`` and the ``app``."""

    tls: TlsStream
    plain: socket.socket
    peer: SSL.Connection
    peer_sock: socket.socket
    app: socket.socket


def _handshake(*conns: SSL.Connection) -> None:
    pending = list(conns)
    for _ in range(100):
        for conn in list(pending):
            try:
                conn.do_handshake()
                pending.remove(conn)
            except SSL.WantReadError:
                pass
        if not pending:
            return
    raise AssertionError("the in-memory handshake did not finish")


@pytest.fixture
def ends(authority):
    """A completed TLS 1.3 handshake between the sidecar's end and the peer, and a plaintext pair."""
    leaf = authority.issue(API)
    server_ctx = tls13_context()
    present(server_ctx, [leaf.cert, *authority.chain], leaf.key)
    sidecar_sock, peer_sock = socket.socketpair()
    plain, app = socket.socketpair()
    for sock in (sidecar_sock, peer_sock, plain, app):
        sock.setblocking(False)
    tls = TlsStream(server_ctx, sidecar_sock, server_side=True)
    peer = SSL.Connection(tls13_context(), peer_sock)
    peer.set_connect_state()
    _handshake(tls.conn, peer)
    yield Ends(tls, plain, peer, peer_sock, app)
    for sock in (sidecar_sock, peer_sock, plain, app):
        sock.close()


def relay_of(ends: Ends) -> Relay:
    return Relay(ends.tls, ends.plain, Link())


def steps(relay: Relay, fd: int | None = None) -> None:
    """What the level-triggered reactor does while ``fd`` (None: either socket) has news: step again."""
    for _ in range(4):
        if relay.finished.is_set():
            return
        relay.step(fd)


def app_reads(ends: Ends) -> tuple[bytes, bool]:
    """Everything the app can read now, and whether it then saw the end of the stream."""
    got = bytearray()
    while True:
        try:
            data = ends.app.recv(65536)
        except BlockingIOError:
            return bytes(got), False
        if not data:
            return bytes(got), True
        got += data


def peer_reads(ends: Ends) -> tuple[bytes, bool]:
    """Everything the peer can decrypt now, and whether it then saw close_notify."""
    got = bytearray()
    while True:
        try:
            got += ends.peer.recv(65536)
        except SSL.WantReadError:
            return bytes(got), False
        except SSL.ZeroReturnError:
            return bytes(got), True


async def test_bytes_from_the_peer_reach_the_app_and_are_counted_in(ends):
    relay = relay_of(ends)
    ends.peer.sendall(b"hello app")
    steps(relay, relay.tls_fd)
    assert app_reads(ends) == (b"hello app", False)
    assert (relay.link.bytes_in, relay.link.bytes_out) == (9, 0)


async def test_bytes_from_the_app_reach_the_peer_and_are_counted_out(ends):
    relay = relay_of(ends)
    ends.app.sendall(b"hello peer")
    steps(relay, relay.plain_fd)
    assert peer_reads(ends) == (b"hello peer", False)
    assert (relay.link.bytes_in, relay.link.bytes_out) == (0, 10)


async def test_megabytes_cross_both_ways_at_once_intact(ends):
    relay = relay_of(ends)
    to_app, to_peer = bytes(range(256)) * 8192, bytes(range(255, -1, -1)) * 8192  # 2 MiB each
    sent_by_peer = sent_by_app = 0
    at_app, at_peer = bytearray(), bytearray()
    for _ in range(20_000):
        if sent_by_peer < len(to_app):
            try:
                sent_by_peer += ends.peer.send(to_app[sent_by_peer : sent_by_peer + 16384])
            except (SSL.WantWriteError, SSL.WantReadError):
                pass
        if sent_by_app < len(to_peer):
            try:
                sent_by_app += ends.app.send(to_peer[sent_by_app : sent_by_app + 65536])
            except BlockingIOError:
                pass
        steps(relay)
        at_app += app_reads(ends)[0]
        at_peer += peer_reads(ends)[0]
        if len(at_app) == len(to_app) and len(at_peer) == len(to_peer):
            break
    assert bytes(at_app) == to_app and bytes(at_peer) == to_peer
    assert (relay.link.bytes_in, relay.link.bytes_out) == (len(to_app), len(to_peer))


async def test_close_notify_from_the_peer_reaches_the_app_as_eof_and_the_reply_still_flows(ends):
    relay = relay_of(ends)
    ends.peer.sendall(b"last words")
    ends.peer.shutdown()  # close_notify: the peer sends no more but keeps reading
    steps(relay, relay.tls_fd)
    assert app_reads(ends) == (b"last words", True)
    assert not relay.finished.is_set()
    ends.app.sendall(b"the reply")
    ends.app.shutdown(socket.SHUT_WR)
    steps(relay, relay.plain_fd)
    assert peer_reads(ends) == (b"the reply", True)
    assert relay.finished.is_set() and relay.failure is None


async def test_eof_from_the_app_becomes_our_close_notify_and_the_peer_can_still_send(ends):
    relay = relay_of(ends)
    ends.app.shutdown(socket.SHUT_WR)
    steps(relay, relay.plain_fd)
    assert peer_reads(ends) == (b"", True)
    ends.peer.sendall(b"one more thing")
    steps(relay, relay.tls_fd)
    assert app_reads(ends) == (b"one more thing", False)
    assert not relay.finished.is_set()


async def test_a_tls_stream_cut_without_close_notify_is_a_reset_of_the_tls_side(ends):
    relay = relay_of(ends)
    ends.peer_sock.shutdown(socket.SHUT_WR)  # a FIN with no close_notify before it: maybe a truncation
    steps(relay, relay.tls_fd)
    assert relay.finished.is_set()
    assert relay.failure.side == "tls" and "no close_notify" in relay.failure.detail


async def test_a_fatal_alert_from_the_peer_is_a_reset_that_names_the_alert(ends):
    relay = relay_of(ends)
    # A record the peer cannot decrypt, written under the sidecar's TLS layer: the peer answers bad_record_mac.
    ends.tls.sock.sendall(b"\x17\x03\x03\x00\x20" + bytes(32))
    with pytest.raises(SSL.Error):
        ends.peer.recv(100)
    steps(relay, relay.tls_fd)
    assert relay.finished.is_set()
    assert (relay.failure.side, relay.failure.alert) == ("tls", "bad_record_mac")


async def test_an_app_that_is_gone_is_a_reset_of_the_plain_side(ends):
    relay = relay_of(ends)
    ends.app.close()
    ends.peer.sendall(b"anyone there?")
    steps(relay)
    assert relay.finished.is_set()
    assert relay.failure.side == "plain"


async def test_an_app_that_stops_reading_stops_the_relay_reading_the_peer(ends):
    relay = relay_of(ends)
    chunk = bytes(16384)
    pushed = 0
    for _ in range(2000):  # the peer pushes until every buffer on the way is full
        try:
            pushed += ends.peer.send(chunk)
        except SSL.WantWriteError:
            steps(relay, relay.tls_fd)
            try:
                pushed += ends.peer.send(chunk)
            except SSL.WantWriteError:
                break
        steps(relay, relay.tls_fd)
    held = relay.link.bytes_in
    for _ in range(10):
        steps(relay)
    assert relay.link.bytes_in == held, "nothing more is read from the peer while the app is behind"
    assert len(relay.to_plain) <= SCRATCH_SIZE, "at most one scratch buffer's worth waits for the app"
    received = bytearray()
    for _ in range(10_000):
        received += app_reads(ends)[0]
        steps(relay)
        if len(received) == pushed:
            break
    assert bytes(received) == bytes(pushed)
