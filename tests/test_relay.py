"""proxy.relay: the data phase of one connection over two socketpairs, by hand and through the reactor.

The sidecar's TLS end and a peer are real pyOpenSSL connections (TLS 1.3) over one socketpair; the
sidecar's plaintext end and the app are the two ends of another. Most tests write on the peer or the
app, call ``step`` as the reactor would when a socket has news, and read what came out on the other
side; the last ones run ``relay`` on a real ``Reactor`` and its thread.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from OpenSSL import SSL
from OpenSSL._util import lib as _lib
from support.certs import API

from mtls.tlsio import TlsStream, present, tls13_context
from proxy.relay import SCRATCH_SIZE, Link, Reactor, Relay, Reset, SessionWatch, _one_turn, relay


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


def make_ends(authority) -> Ends:
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
    return Ends(tls, plain, peer, peer_sock, app)


def close_ends(ends: Ends) -> None:
    for sock in (ends.tls.sock, ends.peer_sock, ends.plain, ends.app):
        sock.close()


@pytest.fixture
def ends(authority):
    ends = make_ends(authority)
    yield ends
    close_ends(ends)


def relay_of(ends: Ends) -> Relay:
    return Relay(ends.tls, ends.plain, Link())


def steps(relay: Relay, fd: int | None = None) -> None:
    """What the level-triggered reactor does while ``fd`` (None: either socket) has news: step again."""
    for _ in range(4):
        if relay.finished:
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


def test_bytes_from_the_peer_reach_the_app_and_are_counted_in(ends):
    relay = relay_of(ends)
    ends.peer.sendall(b"hello app")
    steps(relay, relay.tls_fd)
    assert app_reads(ends) == (b"hello app", False)
    assert (relay.link.bytes_in, relay.link.bytes_out) == (9, 0)


def test_bytes_from_the_app_reach_the_peer_and_are_counted_out(ends):
    relay = relay_of(ends)
    ends.app.sendall(b"hello peer")
    steps(relay, relay.plain_fd)
    assert peer_reads(ends) == (b"hello peer", False)
    assert (relay.link.bytes_in, relay.link.bytes_out) == (0, 10)


def test_megabytes_cross_both_ways_at_once_intact(ends):
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


def test_close_notify_from_the_peer_reaches_the_app_as_eof_and_the_reply_still_flows(ends):
    relay = relay_of(ends)
    ends.peer.sendall(b"last words")
    ends.peer.shutdown()  # close_notify: the peer sends no more but keeps reading
    steps(relay, relay.tls_fd)
    assert app_reads(ends) == (b"last words", True)
    assert not relay.finished
    ends.app.sendall(b"the reply")
    ends.app.shutdown(socket.SHUT_WR)
    steps(relay, relay.plain_fd)
    assert peer_reads(ends) == (b"the reply", True)
    assert relay.finished and relay.failure is None


def test_eof_from_the_app_becomes_our_close_notify_and_the_peer_can_still_send(ends):
    relay = relay_of(ends)
    ends.app.shutdown(socket.SHUT_WR)
    steps(relay, relay.plain_fd)
    assert peer_reads(ends) == (b"", True)
    ends.peer.sendall(b"one more thing")
    steps(relay, relay.tls_fd)
    assert app_reads(ends) == (b"one more thing", False)
    assert not relay.finished


def test_a_tls_stream_cut_without_close_notify_is_a_reset_of_the_tls_side(ends):
    relay = relay_of(ends)
    ends.peer_sock.shutdown(socket.SHUT_WR)  # a FIN with no close_notify before it: maybe a truncation
    steps(relay, relay.tls_fd)
    assert relay.finished
    assert relay.failure.side == "tls" and "no close_notify" in relay.failure.detail


def test_a_fatal_alert_from_the_peer_is_a_reset_that_names_the_alert(ends):
    relay = relay_of(ends)
    # A record the peer cannot decrypt, written under the sidecar's TLS layer: the peer answers bad_record_mac.
    ends.tls.sock.sendall(b"\x17\x03\x03\x00\x20" + bytes(32))
    with pytest.raises(SSL.Error):
        ends.peer.recv(100)
    steps(relay, relay.tls_fd)
    assert relay.finished
    assert (relay.failure.side, relay.failure.alert) == ("tls", "bad_record_mac")


def test_an_app_that_is_gone_is_a_reset_of_the_plain_side(ends):
    relay = relay_of(ends)
    ends.app.close()
    ends.peer.sendall(b"anyone there?")
    steps(relay)
    assert relay.finished
    assert relay.failure.side == "plain"


def test_an_app_that_stops_reading_stops_the_relay_reading_the_peer(ends):
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


def test_a_step_among_other_connections_moves_one_chunk_and_says_there_is_more(ends):
    """What the reactor asks when several connections have news, so that a bulk transfer delays a
    small exchange by one chunk; a connection alone moves up to a whole burst in one step."""
    for sock in (ends.peer_sock, ends.plain):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    payload = os.urandom(SCRATCH_SIZE)  # two chunks (a chunk: SCRATCH_SIZE / 2 of full records)
    ends.peer.sendall(payload)
    relay = relay_of(ends)
    assert relay.step(ends.tls.sock.fileno(), burst=1) is True, "one chunk moved, more waits"
    first, _ = app_reads(ends)
    assert SCRATCH_SIZE // 2 <= len(first) < len(payload) - SCRATCH_SIZE // 4
    relay.step(ends.tls.sock.fileno())
    rest, _ = app_reads(ends)
    assert first + rest == payload, "the default burst moved all the rest in one step"


def test_a_turn_of_the_reactor_steps_each_relay_once_whatever_brought_it_there(ends):
    busy, both, one, quiet = (relay_of(ends) for _ in range(4))
    by_fd = {1: busy, 2: busy, 3: both, 4: both, 5: one, 6: one, 7: quiet, 8: quiet}
    events = [(1, 1), (3, 1), (4, 4), (6, 1), (9, 1)]  # 9: gone from the set since epoll_wait returned
    turn = _one_turn({busy: None}, events, by_fd)
    assert turn == {busy: None, both: None, one: 6}, "ready or two sockets: both sockets, once"
    assert list(turn) == [busy, both, one], "the ready list first, then in the order of the events"


def test_an_outbound_relay_hands_over_the_session_once_the_servers_ticket_arrived(authority):
    """The sidecar as the client: the server's TLS 1.3 ticket comes after the handshake and is read
    by a step; the session it makes resumable is handed over once, and resumes a new connection."""
    leaf = authority.issue(API)
    server_ctx = tls13_context(tickets=True)
    present(server_ctx, [leaf.cert, *authority.chain], leaf.key)
    server_ctx.set_session_id(b"test")
    client_ctx = tls13_context(tickets=True)
    socks = [*socket.socketpair(), *socket.socketpair(), *socket.socketpair()]
    for sock in socks:
        sock.setblocking(False)
    tls_sock, server_sock, plain, app, resumed_sock, resuming_sock = socks
    tls = TlsStream(client_ctx, tls_sock, server_side=False)
    server = SSL.Connection(server_ctx, server_sock)
    server.set_accept_state()
    for conn in (tls.conn, server):
        with pytest.raises(SSL.WantReadError):
            conn.do_handshake()
    tls.conn.do_handshake()  # the client is done; the server has not read its Finished yet

    handed = []
    watch = SessionWatch(tls, plain, Link(), on_session=lambda session: None, to_trio=handed.append)
    watch.step()
    assert handed == [], "no ticket yet: nothing to resume with"
    server.do_handshake()  # reads the client's Finished and sends its tickets
    server.sendall(b"hello")
    watch.step(watch.tls_fd)
    assert app.recv(16) == b"hello"
    assert len(handed) == 1
    server.sendall(b"more")
    watch.step(watch.tls_fd)
    assert len(handed) == 1, "handed over once"

    resumed = SSL.Connection(client_ctx, resumed_sock)
    resumed.set_session(handed[0].args[0])
    resumed.set_connect_state()
    resuming = SSL.Connection(server_ctx, resuming_sock)
    resuming.set_accept_state()
    _handshake(resumed, resuming)
    assert _lib.SSL_session_reused(resumed._ssl)
    for sock in socks:
        sock.close()


# --- through the reactor's thread ------------------------------------------------------------


@pytest.fixture
async def reactor(nursery):
    """A running reactor; the test's nursery stops (and joins) its thread at the end."""
    reactor = Reactor()
    nursery.start_soon(reactor.run)
    return reactor


async def app_gets(ends: Ends, size: int) -> bytes:
    got = b""
    with trio.fail_after(5):
        while len(got) < size:
            await trio.lowlevel.wait_readable(ends.app)
            got += ends.app.recv(65536)
    return got


async def peer_gets(ends: Ends, size: int) -> bytes:
    got = b""
    with trio.fail_after(5):
        while len(got) < size:
            await trio.lowlevel.wait_readable(ends.peer_sock)
            try:
                got += ends.peer.recv(65536)
            except SSL.WantReadError:
                pass
    return got


async def round_trip(ends: Ends) -> None:
    ends.peer.sendall(b"ping")
    assert await app_gets(ends, 4) == b"ping"
    ends.app.sendall(b"pong")
    assert await peer_gets(ends, 4) == b"pong"


def start_relay(reactor: Reactor, nursery: trio.Nursery, ends: Ends, link: Link) -> trio.Event:
    """Run ``relay`` in a task; the event is set when it returned (an exception fails the test)."""
    ended = trio.Event()

    async def run() -> None:
        await relay(reactor, ends.tls, ends.plain, link)
        ended.set()

    nursery.start_soon(run)
    return ended


async def half_close_both(ends: Ends, ended: trio.Event) -> None:
    """The peer's close_notify and the app's FIN: the relay returns, then the sockets may be closed."""
    ends.peer.shutdown()
    ends.app.shutdown(socket.SHUT_WR)
    with trio.fail_after(5):
        await ended.wait()


async def another_connection_relays(authority, reactor: Reactor, nursery: trio.Nursery) -> None:
    """The reactor still serves: a new connection relays both ways and ends."""
    other = make_ends(authority)
    other_ended = start_relay(reactor, nursery, other, Link())
    await round_trip(other)
    await half_close_both(other, other_ended)
    close_ends(other)


async def test_the_reactor_relays_both_ways_until_each_side_half_closed(ends, reactor, nursery):
    link = Link()
    ended = start_relay(reactor, nursery, ends, link)
    await round_trip(ends)
    await half_close_both(ends, ended)
    assert (link.bytes_in, link.bytes_out) == (4, 4)


async def test_once_a_cancelled_relay_returns_the_reactor_leaves_its_sockets_alone(authority, ends, reactor, nursery):
    ended = trio.Event()
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await relay(reactor, ends.tls, ends.plain, Link())
        ended.set()

    nursery.start_soon(run)
    await round_trip(ends)
    scope.cancel()  # what the idle reaper, a drain deadline or a policy_revoked does
    await ended.wait()
    ends.peer.sendall(b"unread")
    other = make_ends(authority)
    other_ended = start_relay(reactor, nursery, other, Link())
    await round_trip(other)  # the reactor thread went round after the bytes above arrived
    assert ends.tls.sock.recv(100, socket.MSG_PEEK), "the relay that returned read nothing more"
    with pytest.raises(BlockingIOError):
        ends.app.recv(100)
    await half_close_both(other, other_ended)
    close_ends(other)


async def test_a_busy_reactor_thread_never_blocks_trio_and_a_cancelled_relay_waits_for_it(authority, ends, reactor,
                                                                                          nursery):
    """Under bulk load a step holds the reactor's lock for milliseconds. Starting and cancelling a
    relay meanwhile must not block trio (every handshake of the sidecar runs there), and a cancelled
    relay returns only once the thread has let go of its sockets."""
    held, release = threading.Event(), threading.Event()
    timed_out: list[bool] = []

    def long_step() -> None:
        with reactor._lock:
            held.set()
            if not release.wait(10):
                timed_out.append(True)  # trio stayed blocked on the lock until now

    holder = threading.Thread(target=long_step)
    holder.start()
    await trio.to_thread.run_sync(held.wait)
    scope = trio.CancelScope()
    returned = trio.Event()

    async def run() -> None:
        with scope:
            await relay(reactor, ends.tls, ends.plain, Link())
        returned.set()

    nursery.start_soon(run)  # add: the lock is taken, so a request for the thread
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()  # remove: a request too, which the relay waits for
    await trio.testing.wait_all_tasks_blocked()
    assert not returned.is_set(), "the cancelled relay returned while the thread could still step it"
    release.set()
    with trio.fail_after(5):
        await returned.wait()
    await trio.to_thread.run_sync(holder.join)
    assert not timed_out, "trio waited for the reactor's lock"
    await another_connection_relays(authority, reactor, nursery)


async def test_a_relay_started_after_the_reactor_stopped_fails_at_once(ends):
    reactor = Reactor()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reactor.run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    with pytest.raises(Reset) as failed:
        with trio.fail_after(5):
            await relay(reactor, ends.tls, ends.plain, Link())
    assert failed.value.side == "sidecar" and "the relay thread has stopped" in failed.value.detail


async def test_a_bug_in_one_connections_step_resets_it_and_the_others_go_on(authority, ends, reactor, nursery,
                                                                             monkeypatch):
    doomed = Link()
    original = Relay._plain_to_tls

    def broken_for_doomed(self: Relay, burst: int) -> bool:
        if self.link is doomed:
            raise ZeroDivisionError("a bug")
        return original(self, burst)

    monkeypatch.setattr(Relay, "_plain_to_tls", broken_for_doomed)
    with pytest.raises(Reset) as failed:
        with trio.fail_after(5):
            await relay(reactor, ends.tls, ends.plain, doomed)
    assert failed.value.side == "sidecar" and "ZeroDivisionError" in failed.value.detail
    await another_connection_relays(authority, reactor, nursery)


async def test_a_reactor_thread_that_dies_resets_its_connections_and_fails_the_sidecar_loudly(ends):
    reactor = Reactor()
    stopped: list[RuntimeError] = []
    failures: list[Reset] = []
    relay_ended = trio.Event()

    async def run_reactor() -> None:
        try:
            await reactor.run()
        except RuntimeError as exc:
            stopped.append(exc)

    async def run_relay() -> None:
        try:
            await relay(reactor, ends.tls, ends.plain, Link())
        except Reset as exc:
            failures.append(exc)
        relay_ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_reactor)
        nursery.start_soon(run_relay)
        await round_trip(ends)
        reactor._epoll.close()  # the thread's next epoll_wait fails: a fault outside any one connection
        ends.peer.sendall(b"wake up")
        with trio.fail_after(5):
            await relay_ended.wait()
    assert "the relay thread stopped" in str(stopped[0])
    assert failures[0].side == "sidecar" and "the relay thread failed" in failures[0].detail
