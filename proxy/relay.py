"""Copy bytes both ways between a TLS peer and a plaintext socket.

Theory of operation
-------------------
Once a connection is authorized, its two sockets leave trio's scheduler for the data phase: they
join the ``Reactor``'s own level-triggered epoll set, which a thread of its own (the reactor
thread) waits on with a blocking ``epoll_wait``. When the kernel reports activity, the reactor
calls ``Relay.step`` for the connection concerned, which moves bytes in the direction that has
news. One wakeup serves every connection that is ready, with no trio wakeup, epoll re-arm or task
switch per socket wait. The thread holds the GIL only while it runs Python: it lets go while
blocked in ``epoll_wait`` and in every ``SSL_read``/``SSL_write`` (cffi) and socket call, so the
second core copies and encrypts while the trio thread runs handshakes, the admin API and reloads.

``step`` reads into one module-wide scratch buffer and writes it out within the same call, so the
buffer is never shared mid-use (every step runs under the reactor's lock) and an idle connection
holds no buffer at all. Only when the destination cannot take everything is the rest copied into a
private ``bytes``; that direction reads nothing more until it is sent (its source socket leaves the
epoll set meanwhile), so memory per connection is bounded by one scratch-sized chunk however slow
the reader is. The set is level-triggered, so a step may stop before a socket would block: it stops
after a short read (the sender flushed; epoll reports anything newer) or after a burst of chunks,
after which a busy connection goes back on the ready list and the others get their turn.

End of stream is forwarded as a half-close: a close_notify from the TLS peer becomes
``shutdown(SHUT_WR)`` on the plaintext socket, and a plaintext EOF becomes our close_notify plus
``shutdown(SHUT_WR)``; the other direction keeps flowing. A reset (or a TLS stream cut without
close_notify, which could be a truncation) on either side ends the relay with ``Reset``, and the
caller aborts both sides with an RST. A record OpenSSL refuses ends it with ``ProtocolError``:
OpenSSL has sent its fatal alert, and the caller lets the alert reach the peer before closing. A
bug in one connection's step ends that connection with ``Reset`` (side "sidecar"), not the
reactor. Idleness is timed by the sidecar's reaper, which reads ``Link.last_activity``
(``time.monotonic``, a clock both threads can read).

Which thread touches what: from ``Reactor.add`` until the relay finishes or ``Reactor.remove``
returns, only ``step`` reads, writes or shuts down the connection's two sockets and its SSL
object, and every step runs under the reactor's lock, for a relay still in ``_by_fd``: the first
one in ``add`` when the thread is asleep (trio thread, so bytes that already wait need no thread
wakeup), all others in the reactor thread. A relay that finishes leaves ``_by_fd`` and the epoll
set before trio hears of it, and ``remove`` (for a cancelled relay) returns only once the thread
is done with it; either way its file descriptors are out of the epoll set before the caller closes
them, so a reused descriptor number cannot reach the wrong connection. The trio thread never
blocks on the lock (see ``Reactor``): when the thread is busy, ``add`` and ``remove`` become
requests it carries out between two steps. The end of a relay reaches trio through the trio token
(``run_sync_soon``, once per batch of events), never by touching trio objects from the thread.

Outbound TLS sessions: a TLS 1.3 server sends its session tickets after the handshake, so they are
read by ``step`` while relaying. A connection whose sidecar wants to resume later relays with a
``SessionWatch`` (a ``Relay`` whose step also looks whether OpenSSL replaced the connection's
session, which it does for each ticket it takes in); the first new session goes to trio in the same
batch as the ends of relays. Every other connection's step is the plain ``Relay.step``.

Who closes what: ``relay`` registers the sockets with the reactor, and they are out of it before
``relay`` returns, however it ends (cancellation included); it never closes them: the caller does.
The reactor's thread is started and stopped by ``Reactor.run``, a task of the sidecar's root nursery.
"""

from __future__ import annotations

import collections
import functools
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

import trio
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from mtls.tlsio import alert_from_error, ssl_error_text
from proxy.handshake import TlsSocket

SCRATCH_SIZE = 256 * 1024
_scratch = bytearray(SCRATCH_SIZE)
_scratch_view = memoryview(_scratch)
# A C pointer to the scratch buffer, so SSL_read decrypts straight into it. pyOpenSSL's public
# recv_into allocates and copies a temporary buffer per call, which costs more than the AES itself.
_scratch_ptr = _ffi.from_buffer(_scratch)

_LINGER_RESET = struct.pack("ii", 1, 0)
_WANT_READ = _lib.SSL_ERROR_WANT_READ
_WANT_WRITE = _lib.SSL_ERROR_WANT_WRITE


class Reset(Exception):
    """One side broke the connection; the relay aborts the other side too.

    ``side`` is "tls" or "plain"; ``alert`` is the RFC name of the fatal TLS alert the peer sent
    (``handshake_failure``), when that is how the TLS side ended.
    """

    def __init__(self, side: str, detail: str, *, alert: str | None = None):
        super().__init__(f"{side}: {detail}")
        self.side = side
        self.detail = detail
        self.alert = alert


class ProtocolError(Reset):
    """The TLS peer sent a record OpenSSL rejects (an illegal KeyUpdate, a record that fails to
    decrypt). OpenSSL has already written its fatal alert to the socket, so the caller lets that
    alert reach the peer (``TlsStream.linger_after_refusal``) instead of resetting the TLS side."""


class Link:
    """Byte counts and activity of one relayed connection.

    ``bytes_in`` flows from the TLS peer to the plaintext side, ``bytes_out`` the other way.
    ``last_activity`` (``time.monotonic``: the reactor thread writes it) is what the sidecar's idle
    reaper reads.
    """

    __slots__ = ("bytes_in", "bytes_out", "last_activity")

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_activity = time.monotonic()


def abort_socket(sock: socket.socket) -> None:
    """Arrange for ``sock.close()`` to send RST instead of FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass


async def send_plain(sock: socket.socket, view: memoryview) -> None:
    """Write all of ``view`` (which may point into the scratch buffer) to a plaintext socket."""
    try:
        sent = sock.send(view)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        raise Reset("plain", exc.strerror or str(exc)) from None
    if sent == len(view):
        return
    rest = bytes(view[sent:])  # leave the shared scratch buffer before awaiting
    while rest:
        await trio.lowlevel.wait_writable(sock)
        try:
            sent = sock.send(rest)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise Reset("plain", exc.strerror or str(exc)) from None
        rest = rest[sent:]


def _tls_failure(conn: SSL.Connection, result: int) -> Exception:
    """The exception pyOpenSSL would raise for a failed SSL_read/SSL_write (not a would-block)."""
    try:
        conn._raise_ssl_error(conn._ssl, result)
    except Exception as exc:  # the one place that turns OpenSSL's verdict into an exception
        return exc
    return SSL.SysCallError(-1, "Unexpected EOF")


_monotonic = time.monotonic
_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT
_BURST = 16  # chunks (of up to SCRATCH_SIZE) per direction per step when no other connection waits
_BURST_SHARED = 4  # the same while others wait (1 costs bulk ~10% more CPU per GB; 16 made small requests wait 5x)
_FULL_RECORD = 16384  # a shorter TLS record means the sender flushed: the socket is likely empty


class Relay:
    """The copy state of one connection, advanced by ``step`` whenever its sockets have news.

    Level-triggered: a socket is watched for input only while its direction can take more (so a
    slow reader stops us reading from the fast writer: backpressure), and for output only while
    bytes wait for it.
    """

    __slots__ = (
        "tls", "ssl", "plain", "link", "to_plain", "to_tls", "tls_done", "plain_done", "failure", "finished",
        "tls_fd", "plain_fd", "tls_mask", "plain_mask", "read_wants_write", "on_finished",
    )

    def __init__(self, tls: TlsSocket, plain: socket.socket, link: Link):
        self.tls = tls
        self.ssl = tls.conn._ssl
        self.plain = plain
        self.link = link
        self.tls_fd = tls.sock.fileno()
        self.plain_fd = plain.fileno()
        self.to_plain = b""  # decrypted bytes the app could not take yet
        self.to_tls = b""  # app bytes OpenSSL could not write yet
        self.tls_done = False  # the peer's close_notify has been forwarded as a FIN to the app
        self.plain_done = False  # the app's FIN has been forwarded as our close_notify
        self.failure: Reset | None = None
        self.finished = False  # both directions ended, or one broke (``failure``)
        self.tls_mask = self.plain_mask = 0  # the epoll interest registered; 0: not in the epoll set
        self.read_wants_write = False  # SSL_read must send something first (a TLS 1.3 KeyUpdate reply)
        self.on_finished: Callable[[], object] | None = None  # the reactor calls it (via trio) once finished

    def wanted(self) -> tuple[int, int]:
        """The epoll interest of the TLS socket and of the plaintext socket, from the state of the two directions."""
        tls = plain = 0
        if not self.tls_done and not self.to_plain:
            tls = _IN
        if self.to_tls or self.read_wants_write:
            tls |= _OUT
        if not self.plain_done and not self.to_tls:
            plain = _IN
        if self.to_plain:
            plain |= _OUT
        return tls, plain

    def step(self, fd: int | None = None, burst: int = _BURST) -> bool:
        """Move bytes where ``fd`` (None: both sockets) has news, at most ``burst`` chunks each way.
        True if it stopped for fairness (there may be more to move)."""
        try:
            more = False
            if fd is None or fd == self.tls_fd or self.to_plain:
                more |= self._tls_to_plain(burst)
            if fd is None or fd == self.plain_fd or self.to_tls:
                more |= self._plain_to_tls(burst)
        except Reset as exc:
            self.failure = exc
            more = False
        if self.failure is not None or (self.tls_done and self.plain_done):
            self.finished = True
            return False
        return more

    def _flush_to_plain(self) -> bool:
        try:
            sent = self.plain.send(self.to_plain)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise Reset("plain", exc.strerror or str(exc)) from None
        self.to_plain = self.to_plain[sent:]
        return not self.to_plain

    def _tls_to_plain(self, burst: int) -> bool:
        self.read_wants_write = False
        if self.tls_done or (self.to_plain and not self._flush_to_plain()):
            return False
        ssl = self.ssl
        for _ in range(burst):
            filled = 0
            result = 0
            while filled < SCRATCH_SIZE // 2:
                result = _lib.SSL_read(ssl, _scratch_ptr + filled, SCRATCH_SIZE - filled)
                if result <= 0:
                    break
                filled += result
                if result < _FULL_RECORD and not _lib.SSL_pending(ssl):
                    break  # level-triggered: if more arrived, epoll says so again
            if filled:
                self.link.bytes_in += filled
                self.link.last_activity = _monotonic()
                try:
                    sent = self.plain.send(_scratch_view[:filled])
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise Reset("plain", exc.strerror or str(exc)) from None
                if sent < filled:
                    self.to_plain = bytes(_scratch_view[sent:filled])
                    return False
            if result > 0:
                if result < _FULL_RECORD:
                    return False
                continue
            error = _lib.SSL_get_error(ssl, result)
            if error == _WANT_READ:
                return False
            if error == _WANT_WRITE:
                self.read_wants_write = True
                return False
            exc = _tls_failure(self.tls.conn, result)
            if isinstance(exc, SSL.ZeroReturnError):
                self.tls_done = True
                try:
                    self.plain.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return False
            if isinstance(exc, SSL.SysCallError):
                raise Reset("tls", ssl_error_text(exc) + " (no close_notify)")
            alert = alert_from_error(exc)
            if alert:
                raise Reset("tls", f"remote sent alert {alert}", alert=alert)
            raise ProtocolError("tls", f"peer sent a record we refuse: {ssl_error_text(exc)}; fatal alert sent")
        return True

    def _write_tls(self, pointer, length: int) -> int:
        """SSL_write until done or it would block; return how many bytes went out."""
        written = 0
        while written < length:
            result = _lib.SSL_write(self.ssl, pointer + written, length - written)
            if result <= 0:
                error = _lib.SSL_get_error(self.ssl, result)
                if error in (_WANT_WRITE, _WANT_READ):
                    break
                raise Reset("tls", ssl_error_text(_tls_failure(self.tls.conn, result)))
            written += result
        return written

    def _plain_to_tls(self, burst: int) -> bool:
        if self.plain_done:
            return False
        if self.to_tls:
            # OpenSSL accepts the retry from a moved buffer with the same content
            # (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, a pyOpenSSL default).
            with _ffi.from_buffer(self.to_tls) as pointer:
                written = self._write_tls(pointer, len(self.to_tls))
            self.to_tls = self.to_tls[written:]
            if self.to_tls:
                return False
        for _ in range(burst):
            try:
                n = self.plain.recv_into(_scratch)
            except BlockingIOError:
                return False
            except OSError as exc:
                raise Reset("plain", exc.strerror or str(exc)) from None
            if n == 0:
                self.plain_done = True
                send_close_notify(self.tls)
                return False
            self.link.bytes_out += n
            self.link.last_activity = _monotonic()
            written = self._write_tls(_scratch_ptr, n)
            if written < n:
                self.to_tls = bytes(_scratch_view[written:n])
                return False
            if n < SCRATCH_SIZE:
                return False  # the socket is drained; level-triggered epoll reports new bytes
        return True


class SessionWatch(Relay):
    """An outbound relay that hands trio the connection's session once the server's ticket makes it
    resumable (the trio thread must not touch the SSL object while the relay thread owns it).

    OpenSSL gives the connection a new session object for every ticket it reads (the old one may be
    shared with a cache and is never changed), so "the session pointer changed" means "a ticket
    arrived". ``held`` keeps the handshake's session alive until then, so that no later session can
    be allocated at its address and go unnoticed.
    """

    __slots__ = ("on_session", "to_trio", "held", "handshake_session")

    def __init__(
        self, tls: TlsSocket, plain: socket.socket, link: Link,
        on_session: Callable[[SSL.Session], object], to_trio: Callable[[Callable[[], object]], None],
    ):
        super().__init__(tls, plain, link)
        self.to_trio = to_trio  # Reactor.hand_to_trio
        self.on_session: Callable[[SSL.Session], object] | None = on_session  # None once handed over
        self.held = tls.conn.get_session()  # taken in the trio thread, before the relay thread owns the SSL
        self.handshake_session = self.held._session if self.held is not None else _ffi.NULL

    def step(self, fd: int | None = None, burst: int = _BURST) -> bool:
        more = super().step(fd, burst)
        if self.on_session is not None and _lib.SSL_get_session(self.ssl) != self.handshake_session:
            session = self.tls.conn.get_session()  # SSL_get1_session: our own reference, for trio to keep
            if session is not None:
                self.to_trio(functools.partial(self.on_session, session))
            self.on_session = self.held = None
        return more


class Reactor:
    """One level-triggered epoll set for the data phase of every relayed connection, served by one thread.

    ``_lock`` guards ``_by_fd``, ``_ready``, ``_for_trio``, the epoll registrations, the scratch
    buffer and every relay in ``_by_fd``. The reactor thread holds it while it handles a batch of
    events. The trio thread never waits for it: every handshake of the sidecar runs in trio, and a
    thread kept busy by bulk transfers would otherwise stall them for as long as it holds the lock.
    So ``add`` and ``remove`` take the lock only when it is free (the reactor thread is asleep in
    ``epoll_wait``); when it is not, they leave a request in ``_requests`` and wake the thread,
    which takes the requests, in order, between two steps.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._by_fd: dict[int, Relay] = {}  # relays being served; a relay leaves it once finished or removed
        self._ready: dict[Relay, None] = {}  # relays that stopped for fairness: stepped again without waiting
        self._for_trio: list[Callable[[], object]] = []  # for trio to run: ends of relays, sessions taken
        # What the trio thread asked while the lock was taken: (relay, None) adds the relay,
        # (relay, removed) removes it and has trio call ``removed`` once it is out.
        self._requests: collections.deque[tuple[Relay, Callable[[], object] | None]] = collections.deque()
        self._stopping = False  # trio asks the thread to end
        self._stopped = False  # the thread has ended: whoever asks takes the requests itself
        # Wakes the thread when work appears from outside its loop (a request) or it must stop.
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wakeup, select.EPOLLIN)
        self._token = trio.lowlevel.current_trio_token()  # how the thread hands trio the ends of relays

    def add(self, relay: Relay, on_finished: Callable[[], object]) -> None:
        """Start relaying; ``on_finished`` runs in trio (soon, never within this call) once
        ``relay.finished``. When the thread is asleep, the first step is taken here and now (bytes
        may already wait in OpenSSL or the socket), which spares it a wakeup per connection."""
        relay.on_finished = on_finished
        if not self._lock.acquire(blocking=False):
            self._request(relay, None)
            return
        try:
            self._take_requests()  # earlier requests first: they may concern the same descriptors
            self._start(relay)
            self._report_to_trio()
            busy = bool(self._ready)
        finally:
            self._lock.release()
        if busy:
            os.eventfd_write(self._wakeup, 1)  # the thread may be asleep with nothing else to do

    async def remove(self, relay: Relay) -> None:
        """Take out a relay that may not have finished (its task was cancelled): once this returns,
        the thread no longer touches its sockets or SSL object. When the thread is busy this waits
        for it to finish its current step, without blocking trio. Call it shielded from cancellation."""
        if self._lock.acquire(blocking=False):
            try:
                self._take_requests()
                self._drop(relay)
                self._report_to_trio()
            finally:
                self._lock.release()
            return
        removed = trio.Event()
        self._request(relay, removed.set)
        await removed.wait()

    def _request(self, relay: Relay, removed: Callable[[], object] | None) -> None:
        self._requests.append((relay, removed))
        if not self._stopped:
            os.eventfd_write(self._wakeup, 1)  # still open: only trio closes it, after the thread ended
            return
        with self._lock:  # nobody else would take it; the lock is free once the thread has ended
            self._take_requests()
            self._report_to_trio()

    def _take_requests(self) -> None:
        """Carry out the trio thread's requests (under the lock, in either thread)."""
        while self._requests:
            relay, removed = self._requests.popleft()
            if removed is not None:
                self._drop(relay)
                self._for_trio.append(removed)
            else:
                self._start(relay)

    def _start(self, relay: Relay) -> None:
        if self._stopped:  # nothing would ever step it again
            relay.failure = Reset("sidecar", "the relay thread has stopped")
            relay.finished = True
            self._for_trio.append(relay.on_finished)
            return
        self._by_fd[relay.tls_fd] = self._by_fd[relay.plain_fd] = relay
        self._run_step(relay, None)

    def _drop(self, relay: Relay) -> None:
        if self._by_fd.get(relay.tls_fd) is relay:
            del self._by_fd[relay.tls_fd]
            del self._by_fd[relay.plain_fd]
            self._unregister(relay)

    def _unregister(self, relay: Relay) -> None:
        if relay.tls_mask:
            relay.tls_mask = 0
            self._epoll.unregister(relay.tls_fd)
        if relay.plain_mask:
            relay.plain_mask = 0
            self._epoll.unregister(relay.plain_fd)

    def _rearm(self, relay: Relay) -> None:
        """Watch exactly what the relay wants. A socket wanted for nothing leaves the set, so that
        a hang-up or error on it cannot wake us again and again (epoll always reports those)."""
        tls, plain = relay.wanted()
        if tls != relay.tls_mask:
            self._set_interest(relay.tls_fd, relay.tls_mask, tls)
            relay.tls_mask = tls
        if plain != relay.plain_mask:
            self._set_interest(relay.plain_fd, relay.plain_mask, plain)
            relay.plain_mask = plain

    def _set_interest(self, fd: int, current: int, mask: int) -> None:
        if not mask:
            self._epoll.unregister(fd)
        elif not current:
            self._epoll.register(fd, mask)
        else:
            self._epoll.modify(fd, mask)

    def _run_step(self, relay: Relay, fd: int | None, burst: int = _BURST) -> None:
        """One step of a relay still being served (under the lock). A relay that finished leaves
        ``_by_fd`` and the epoll set at once and trio hears of it; any exception fails that connection only."""
        if self._by_fd.get(relay.tls_fd) is not relay:
            return
        try:
            if relay.step(fd, burst):
                self._ready[relay] = None
            if not relay.finished:
                self._rearm(relay)
                return
        except Exception as exc:  # a bug in one connection's step must not stop the others
            relay.failure = Reset("sidecar", f"internal error in the relay: {exc!r}")
            relay.finished = True
        try:
            self._drop(relay)
        except (OSError, ValueError):  # the failure above may have come from epoll itself
            relay.tls_mask = relay.plain_mask = 0
        self._for_trio.append(relay.on_finished)

    def hand_to_trio(self, callback: Callable[[], object]) -> None:
        """From a step (under the lock): trio runs ``callback`` with the rest of this batch."""
        self._for_trio.append(callback)

    def _report_to_trio(self) -> None:
        """Hand trio the ``on_finished`` of the relays that ended, the sessions taken and the
        removals done (one wakeup for a whole batch)."""
        if self._for_trio:
            callbacks, self._for_trio = self._for_trio, []
            self._token.run_sync_soon(_call_each, callbacks)

    def _serve(self) -> None:
        """The reactor thread: wait for events, step the relays concerned, until ``_stopping``."""
        epoll, lock, by_fd, wakeup, requests = self._epoll, self._lock, self._by_fd, self._wakeup, self._requests
        while True:
            events = epoll.poll(0 if self._ready else -1)  # the GIL is released while blocked
            with lock:
                if self._stopping:
                    return
                self._take_requests()
                if any(fd == wakeup for fd, _events in events):
                    os.eventfd_read(wakeup)
                turn = _one_turn(self._ready, events, by_fd)
                self._ready = {}
                # A connection alone moves up to _BURST chunks per step, one among others fewer, so
                # that a bulk transfer delays a small exchange by a few chunks per hop, not a burst.
                burst = _BURST if len(turn) <= 1 else _BURST_SHARED
                for relay, fd in turn.items():
                    self._run_step(relay, fd, burst)
                    if requests:
                        self._take_requests()
                self._report_to_trio()

    def _fail_everything(self, exc: BaseException) -> None:
        """The thread itself broke (not one step): end every connection it was serving."""
        with self._lock:
            for relay in set(self._by_fd.values()):
                try:
                    self._unregister(relay)
                except (OSError, ValueError):  # the epoll set itself may be what broke
                    relay.tls_mask = relay.plain_mask = 0
                relay.failure = Reset("sidecar", f"the relay thread failed: {exc!r}")
                relay.finished = True
                self._for_trio.append(relay.on_finished)
            self._by_fd.clear()
            self._report_to_trio()

    def _stop_taking_requests(self) -> None:
        """The thread's last act: from now on whoever asks carries out its own requests (adds fail)."""
        with self._lock:
            self._stopped = True
            self._take_requests()
            self._report_to_trio()

    async def run(self) -> None:
        """Run the reactor thread until cancelled (then stop and join it). Raises if the thread dies
        of anything but a stop: the data plane would be gone, and the sidecar must not go on."""
        died: list[BaseException] = []
        ended = trio.Event()

        def serve() -> None:
            try:
                self._serve()
            except BaseException as exc:
                died.append(exc)
                self._fail_everything(exc)
            finally:
                self._stop_taking_requests()
                try:
                    self._token.run_sync_soon(ended.set)
                except trio.RunFinishedError:
                    pass

        thread = threading.Thread(target=serve, name="relay-reactor", daemon=True)
        thread.start()
        try:
            await ended.wait()  # only a thread that died ends before it is told to stop
            raise RuntimeError(f"the relay thread stopped: {died[0]!r}") from died[0]
        finally:
            with trio.CancelScope(shield=True):
                self._stopping = True
                os.eventfd_write(self._wakeup, 1)
                await trio.to_thread.run_sync(thread.join)
                self._epoll.close()
                os.close(self._wakeup)


def _one_turn(
    ready: dict[Relay, None], events: list[tuple[int, int]], by_fd: dict[int, Relay],
) -> dict[Relay, int | None]:
    """Each relay to step in this turn of the reactor, once, with the socket that has news, or None
    (both) when it is on the ready list or both its sockets have news. A relay stepped twice in a
    turn would go on the ready list twice, and then four times: a busy turn would grow without end."""
    turn: dict[Relay, int | None] = dict.fromkeys(ready)
    for fd, _events in events:
        relay = by_fd.get(fd)
        if relay is not None:
            turn[relay] = None if relay in turn else fd
    return turn


def _call_each(callbacks: list[Callable[[], object]]) -> None:
    for callback in callbacks:
        callback()


def send_close_notify(tls: TlsSocket) -> None:
    """Half-close the TLS side: close_notify, then FIN. Best effort; reading continues."""
    try:
        tls.conn.shutdown()
    except (SSL.Error, OSError):
        pass
    try:
        tls.sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


async def relay(
    reactor: Reactor, tls: TlsSocket, plain: socket.socket, link: Link,
    on_session: Callable[[SSL.Session], object] | None = None,
) -> None:
    """Copy both ways until both directions have ended. ``on_session`` (outbound) runs in trio, once,
    with the connection's session as soon as a ticket from the server has made it resumable.

    Raises Reset when either side broke; the caller then aborts both sockets.
    Cancellation from outside (idle reaper, drain deadline, policy revoked) propagates; the sockets
    are out of the reactor by then either way.
    """
    if on_session is None:
        state = Relay(tls, plain, link)
    else:
        state = SessionWatch(tls, plain, link, on_session, reactor.hand_to_trio)
    finished = trio.Event()
    reactor.add(state, finished.set)
    try:
        await finished.wait()
    finally:
        if not finished.is_set():  # cancelled: the reactor may still be serving it
            with trio.CancelScope(shield=True):
                await reactor.remove(state)
    if state.failure is not None:
        raise state.failure
