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


class Idle(Exception):
    """Nothing moved either way for the idle timeout."""


class Link:
    """Byte counts, activity and outcome of one relayed connection.

    ``bytes_in`` flows from the TLS peer to the plaintext side, ``bytes_out`` the other way.
    ``failure`` is the first Reset or Idle that ended the relay, if any.
    """

    __slots__ = ("bytes_in", "bytes_out", "last_activity", "idle_timeout", "failure")

    def __init__(self, idle_timeout: float = float("inf")) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_activity = trio.current_time()
        self.idle_timeout = idle_timeout
        self.failure: Reset | Idle | None = None


def abort_socket(sock: socket.socket) -> None:
    """Arrange for ``sock.close()`` to send RST instead of FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass


async def send_plain(sock: socket.socket, view: memoryview, link: Link) -> None:
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
        await _wait(trio.lowlevel.wait_writable, sock, link)
        try:
            sent = sock.send(rest)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise Reset("plain", exc.strerror or str(exc)) from None
        rest = rest[sent:]


async def _send_tls(tls: TlsSocket, view: memoryview, link: Link) -> None:
    """Encrypt and write all of ``view`` to the TLS peer."""
    conn = tls.conn
    data: memoryview | bytes = view
    while data:
        try:
            sent = conn.send(data)
        except SSL.WantWriteError:
            if data is view:
                data = bytes(view)  # OpenSSL allows a moved buffer with the same content
            await _wait(trio.lowlevel.wait_writable, tls.sock, link)
            continue
        except SSL.WantReadError:
            if data is view:
                data = bytes(view)
            await _wait(trio.lowlevel.wait_readable, tls.sock, link)
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


async def _wait(wait, sock: socket.socket, link: Link) -> None:
    """``wait`` (wait_readable/wait_writable) on ``sock``; raise Idle once nothing moved for the idle timeout.

    The deadline is per wait rather than a watchdog task per connection: an idle connection then
    costs two suspended pumps and nothing else.
    """
    while True:
        with trio.move_on_at(link.last_activity + link.idle_timeout):
            await wait(sock)
            return
        if trio.current_time() >= link.last_activity + link.idle_timeout:
            raise Idle()


async def _pump_tls_to_plain(tls: TlsSocket, plain: socket.socket, link: Link, scope: trio.CancelScope) -> None:
    conn = tls.conn
    try:
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
                    await _wait(trio.lowlevel.wait_writable, tls.sock, link)
                    continue
            except SSL.SysCallError as exc:
                raise Reset("tls", ssl_error_text(exc) + " (no close_notify)") from None
            except SSL.Error as exc:
                alert = alert_from_error(exc)
                raise Reset("tls", f"remote sent alert {alert}" if alert else ssl_error_text(exc)) from None
            if filled:
                link.bytes_in += filled
                link.last_activity = trio.current_time()
                await send_plain(plain, _scratch_view[:filled], link)
            if eof:
                try:
                    plain.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if filled:
                await trio.lowlevel.checkpoint()
            else:
                await _wait(trio.lowlevel.wait_readable, tls.sock, link)
    except (Reset, Idle) as exc:
        link.failure = link.failure or exc
        scope.cancel()


async def _pump_plain_to_tls(plain: socket.socket, tls: TlsSocket, link: Link, scope: trio.CancelScope) -> None:
    try:
        while True:
            try:
                n = plain.recv_into(_scratch)
            except BlockingIOError:
                await _wait(trio.lowlevel.wait_readable, plain, link)
                continue
            except OSError as exc:
                raise Reset("plain", exc.strerror or str(exc)) from None
            if n == 0:
                send_close_notify(tls)
                return
            link.bytes_out += n
            link.last_activity = trio.current_time()
            await _send_tls(tls, _scratch_view[:n], link)
            await trio.lowlevel.checkpoint()
    except (Reset, Idle) as exc:
        link.failure = link.failure or exc
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


async def relay(tls: TlsSocket, plain: socket.socket, link: Link) -> str | None:
    """Copy both ways until both directions have ended.

    Returns None on a clean end, "idle_timeout" when nothing moved for ``link.idle_timeout``.
    Raises Reset when either side broke; the caller then aborts both sockets.
    Cancellation from outside (drain deadline, policy revoked) propagates.
    """
    async with trio.open_nursery() as pumps:
        pumps.start_soon(_pump_tls_to_plain, tls, plain, link, pumps.cancel_scope)
        pumps.start_soon(_pump_plain_to_tls, plain, tls, link, pumps.cancel_scope)
    if isinstance(link.failure, Reset):
        raise link.failure
    return "idle_timeout" if isinstance(link.failure, Idle) else None
