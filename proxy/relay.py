"""Copy bytes both ways between a TLS peer and a plaintext socket.

Theory of operation
-------------------
Two pumps run per connection, one per direction. A pump reads into one module-wide scratch buffer
and writes it out before it awaits anything: trio runs one task at a time, so the scratch buffer is
never shared mid-use, and an idle connection holds no buffer at all. Only when the destination
cannot take everything right away is the remainder copied into a private ``bytes`` while the pump
waits for the socket to become writable; the pump reads nothing more until that is sent, so
memory per connection is bounded by one scratch-sized chunk however slow the reader is.

End of stream is forwarded as a half-close: a close_notify from the TLS peer becomes
``shutdown(SHUT_WR)`` on the plaintext socket, and a plaintext EOF becomes our close_notify plus
``shutdown(SHUT_WR)``; the other direction keeps flowing. A reset (or a TLS stream cut without
close_notify, which could be a truncation) on either side aborts both sides with an RST.

Per chunk the pumps do as little Python as they can: OpenSSL is called directly on a pointer into
the scratch buffer, "would block" is a return value rather than an exception, a pump yields to
the scheduler only when it would block or after a burst of chunks, and idleness is not timed per
wait (a trio cancel scope per wait costs more than the request it guards) but by the sidecar's
reaper, which looks at ``Link.last_activity`` of every open connection once in a while.

Who closes what: ``relay`` never closes sockets; the caller does (``abort`` tells it to close
with RST instead of FIN).
"""

from __future__ import annotations

import socket
import struct

import trio
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from proxy.handshake import TlsSocket, alert_from_error, ssl_error_text

SCRATCH_SIZE = 256 * 1024
_scratch = bytearray(SCRATCH_SIZE)
_scratch_view = memoryview(_scratch)
# A C pointer to the scratch buffer, so SSL_read decrypts straight into it. pyOpenSSL's public
# recv_into allocates and copies a temporary buffer per call, which costs more than the AES itself.
_scratch_ptr = _ffi.from_buffer(_scratch)

_LINGER_RESET = struct.pack("ii", 1, 0)
# A pump that never has to wait still yields after this many chunks, so one bulk transfer cannot
# starve the other connections of the event loop.
CHUNKS_PER_YIELD = 16

_WANT_READ = _lib.SSL_ERROR_WANT_READ
_WANT_WRITE = _lib.SSL_ERROR_WANT_WRITE


class Reset(Exception):
    """One side broke the connection; the relay aborts the other side too."""

    def __init__(self, side: str, detail: str):
        super().__init__(f"{side}: {detail}")
        self.side = side
        self.detail = detail


class Link:
    """Byte counts and activity of one relayed connection.

    ``bytes_in`` flows from the TLS peer to the plaintext side, ``bytes_out`` the other way.
    ``last_activity`` (trio time) is what the sidecar's idle reaper reads.
    """

    __slots__ = ("bytes_in", "bytes_out", "last_activity")

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_activity = trio.current_time()


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


async def _send_tls(tls: TlsSocket, length: int) -> None:
    """Encrypt and write the first ``length`` bytes of the scratch buffer to the TLS peer.

    With SSL_MODE_ENABLE_PARTIAL_WRITE (pyOpenSSL's default) each SSL_write sends one record, so
    we advance an offset instead of slicing. Only when the socket is full is the unsent rest
    copied out of the shared scratch buffer, once, before we await.
    """
    ssl = tls.conn._ssl
    offset = 0
    while offset < length:
        result = _lib.SSL_write(ssl, _scratch_ptr + offset, length - offset)
        if result <= 0:
            break
        offset += result
    else:
        return
    rest = bytes(_scratch_view[offset:length])
    sent = 0
    # OpenSSL accepts the retry from a moved buffer with the same content
    # (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, also a pyOpenSSL default).
    with _ffi.from_buffer(rest) as base:
        while True:
            error = _lib.SSL_get_error(ssl, result)
            if error == _WANT_WRITE:
                await trio.lowlevel.wait_writable(tls.sock)
            elif error == _WANT_READ:
                await trio.lowlevel.wait_readable(tls.sock)
            else:
                raise Reset("tls", ssl_error_text(_tls_failure(tls.conn, result))) from None
            while sent < len(rest):
                result = _lib.SSL_write(ssl, base + sent, len(rest) - sent)
                if result <= 0:
                    break
                sent += result
            else:
                return


async def _pump_tls_to_plain(tls: TlsSocket, plain: socket.socket, link: Link, failures: list, scope) -> None:
    conn = tls.conn
    ssl = conn._ssl
    chunks = 0
    try:
        while True:
            filled = 0
            error = 0
            while filled < SCRATCH_SIZE // 2:
                result = _lib.SSL_read(ssl, _scratch_ptr + filled, SCRATCH_SIZE - filled)
                if result <= 0:
                    error = _lib.SSL_get_error(ssl, result)
                    break
                filled += result
            if filled:
                link.bytes_in += filled
                link.last_activity = trio.current_time()
                await send_plain(plain, _scratch_view[:filled])
            if error == _WANT_READ:
                chunks = 0
                await trio.lowlevel.wait_readable(tls.sock)
            elif error == _WANT_WRITE:  # a TLS 1.3 KeyUpdate reply is waiting to go out
                chunks = 0
                await trio.lowlevel.wait_writable(tls.sock)
            elif error:
                exc = _tls_failure(conn, result)
                if isinstance(exc, SSL.ZeroReturnError):  # close_notify: forward the half-close
                    try:
                        plain.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                if isinstance(exc, SSL.SysCallError):
                    raise Reset("tls", ssl_error_text(exc) + " (no close_notify)")
                alert = alert_from_error(exc)
                raise Reset("tls", f"remote sent alert {alert}" if alert else ssl_error_text(exc))
            else:
                chunks += 1
                if chunks >= CHUNKS_PER_YIELD:
                    chunks = 0
                    await trio.lowlevel.checkpoint()
    except Reset as exc:
        failures.append(exc)
        scope.cancel()


async def _pump_plain_to_tls(plain: socket.socket, tls: TlsSocket, link: Link, failures: list, scope) -> None:
    chunks = 0
    try:
        while True:
            try:
                n = plain.recv_into(_scratch)
            except BlockingIOError:
                chunks = 0
                await trio.lowlevel.wait_readable(plain)
                continue
            except OSError as exc:
                raise Reset("plain", exc.strerror or str(exc)) from None
            if n == 0:
                send_close_notify(tls)
                return
            link.bytes_out += n
            link.last_activity = trio.current_time()
            await _send_tls(tls, n)
            chunks += 1
            if chunks >= CHUNKS_PER_YIELD:
                chunks = 0
                await trio.lowlevel.checkpoint()
    except Reset as exc:
        failures.append(exc)
        scope.cancel()


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


async def relay(tls: TlsSocket, plain: socket.socket, link: Link) -> None:
    """Copy both ways until both directions have ended.

    Raises Reset when either side broke; the caller then aborts both sockets.
    Cancellation from outside (idle reaper, drain deadline, policy revoked) propagates.
    """
    failures: list[Reset] = []
    async with trio.open_nursery() as pumps:
        pumps.start_soon(_pump_tls_to_plain, tls, plain, link, failures, pumps.cancel_scope)
        pumps.start_soon(_pump_plain_to_tls, plain, tls, link, failures, pumps.cancel_scope)
    if failures:
        raise failures[0]
