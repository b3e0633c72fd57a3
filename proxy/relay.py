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


class Reset(Exception):
    """One side broke the connection; the relay aborts the other side too."""

    def __init__(self, side: str, detail: str):
        super().__init__(f"{side}: {detail}")
        self.side = side
        self.detail = detail


class Link:
    """Byte counts and activity of one relayed connection.

    ``bytes_in`` flows from the TLS peer to the plaintext side, ``bytes_out`` the other way.
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


async def _send_tls(tls: TlsSocket, view: memoryview) -> None:
    """Encrypt and write all of ``view`` to the TLS peer."""
    conn = tls.conn
    data: memoryview | bytes = view
    while data:
        try:
            sent = conn.send(data)
        except SSL.WantWriteError:
            if data is view:
                data = bytes(view)  # OpenSSL allows a moved buffer with the same content
            await trio.lowlevel.wait_writable(tls.sock)
            continue
        except SSL.WantReadError:
            if data is view:
                data = bytes(view)
            await trio.lowlevel.wait_readable(tls.sock)
            continue
        except (SSL.Error, OSError) as exc:
            raise Reset("tls", ssl_error_text(exc)) from None
        data = data[sent:]


def _tls_read(conn: SSL.Connection, offset: int) -> int:
    """One SSL_read into the scratch buffer at ``offset``; raises pyOpenSSL's exceptions."""
    result = _lib.SSL_read(conn._ssl, _scratch_ptr + offset, SCRATCH_SIZE - offset)
    if result <= 0:
        conn._raise_ssl_error(conn._ssl, result)
    return result


async def _pump_tls_to_plain(tls: TlsSocket, plain: socket.socket, link: Link) -> None:
    conn = tls.conn
    while True:
        filled = 0
        eof = False
        try:
            while filled < SCRATCH_SIZE:
                filled += _tls_read(conn, filled)
                if not conn.pending() and filled >= SCRATCH_SIZE // 2:
                    break
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            eof = True
        except SSL.WantWriteError:  # a TLS 1.3 KeyUpdate reply is waiting to go out
            if not filled:
                await trio.lowlevel.wait_writable(tls.sock)
                continue
        except SSL.SysCallError as exc:
            raise Reset("tls", ssl_error_text(exc) + " (no close_notify)") from None
        except SSL.Error as exc:
            alert = alert_from_error(exc)
            raise Reset("tls", f"remote sent alert {alert}" if alert else ssl_error_text(exc)) from None
        if filled:
            link.bytes_in += filled
            link.last_activity = trio.current_time()
            await send_plain(plain, _scratch_view[:filled])
        if eof:
            try:
                plain.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        if filled:
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.wait_readable(tls.sock)


async def _pump_plain_to_tls(plain: socket.socket, tls: TlsSocket, link: Link) -> None:
    while True:
        try:
            n = plain.recv_into(_scratch)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(plain)
            continue
        except OSError as exc:
            raise Reset("plain", exc.strerror or str(exc)) from None
        if n == 0:
            send_close_notify(tls)
            return
        link.bytes_out += n
        link.last_activity = trio.current_time()
        await _send_tls(tls, _scratch_view[:n])
        await trio.lowlevel.checkpoint()


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


async def _idle_watchdog(link: Link, idle: float, scope: trio.CancelScope, on_idle) -> None:
    while True:
        deadline = link.last_activity + idle
        if trio.current_time() >= deadline:
            on_idle()
            scope.cancel()
            return
        await trio.sleep_until(deadline)


async def _guarded(pump, args, failures: list, scope: trio.CancelScope) -> None:
    try:
        await pump(*args)
    except Reset as exc:
        failures.append(exc)
        scope.cancel()


async def relay(tls: TlsSocket, plain: socket.socket, link: Link, idle_timeout: float) -> str | None:
    """Copy both ways until both directions have ended.

    Returns None on a clean end, "idle_timeout" when the connection was idle too long.
    Raises Reset when either side broke; the caller then aborts both sockets.
    Cancellation from outside (drain deadline, policy revoked) propagates.
    """
    timed_out = False
    failures: list[Reset] = []

    def mark_idle() -> None:
        nonlocal timed_out
        timed_out = True

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as pumps:
            scope = pumps.cancel_scope
            pumps.start_soon(_guarded, _pump_tls_to_plain, (tls, plain, link), failures, scope)
            pumps.start_soon(_guarded, _pump_plain_to_tls, (plain, tls, link), failures, scope)
            nursery.start_soon(_idle_watchdog, link, idle_timeout, scope, mark_idle)
        nursery.cancel_scope.cancel()
    if failures:
        raise failures[0]
    return "idle_timeout" if timed_out else None
