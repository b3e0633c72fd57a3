"""pyOpenSSL driven straight on a non-blocking trio socket, and the handshake under a deadline.

trio has no pyOpenSSL stream, and its own SSLStream drops the pending alert when a handshake
fails. Here OpenSSL owns the file descriptor (a socket BIO): when it refuses a peer it writes the
fatal alert to the socket itself, and when it needs the network it raises WantRead/WantWrite, which
we turn into ``trio.lowlevel.wait_readable/wait_writable``. No memory BIO, no extra copy.

This is the one place where OpenSSL handshake errors are translated into our reason codes.
"""

from __future__ import annotations

import errno as errno_codes
import socket
from datetime import datetime, timezone

import trio
from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from mtls import reasons
from proxy.tls import PeerCheck


class HandshakeFailed(Exception):
    """The handshake did not produce an authorized peer. ``reason`` is a contract reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def alert_from_error(exc: SSL.Error) -> str | None:
    """The TLS alert a peer sent us, as its RFC name (``access_denied``), if the error is one."""
    for entry in exc.args[0] if exc.args and isinstance(exc.args[0], list) else ():
        text = entry[2] if len(entry) > 2 else ""
        if " alert " in text:
            return text.split(" alert ", 1)[1].strip().replace(" ", "_")
    return None


def ssl_error_text(exc: Exception) -> str:
    if isinstance(exc, SSL.SysCallError):
        code = exc.args[0] if exc.args else -1
        if code == -1:
            return "connection closed by peer"
        return errno_codes.errorcode.get(code, str(code)).lower() if isinstance(code, int) else str(exc)
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        reasons = [entry[2] for entry in exc.args[0] if len(entry) > 2 and entry[2]]
        if reasons:
            return "; ".join(reasons)
    return str(exc) or type(exc).__name__


class TlsSocket:
    """One TLS connection over a trio socket. The caller owns ``sock`` and closes it."""

    __slots__ = ("sock", "conn", "check")

    def __init__(self, ctx: SSL.Context, sock: trio.socket.SocketType, check: PeerCheck, *, server_side: bool, server_name: str | None = None):
        self.sock = sock
        self.check = check
        conn = SSL.Connection(ctx, sock)
        conn.set_app_data(check)
        if server_side:
            conn.set_accept_state()
        else:
            if server_name:
                conn.set_tlsext_host_name(server_name.encode("idna"))
            conn.set_connect_state()
        self.conn = conn

    async def handshake(self, timeout: float) -> None:
        """Run the handshake; raise HandshakeFailed with a reason code on any failure.

        On failure OpenSSL has already written its alert to the socket. Cancellation from outside
        propagates unchanged; the timeout is ours and becomes ``handshake_timeout``.
        """
        with trio.move_on_after(timeout) as scope:
            while True:
                try:
                    self.conn.do_handshake()
                    break
                except SSL.WantReadError:
                    await trio.lowlevel.wait_readable(self.sock)
                except SSL.WantWriteError:
                    await trio.lowlevel.wait_writable(self.sock)
                except (SSL.Error, OSError) as exc:
                    raise self._translate(exc) from None
        if scope.cancelled_caught:
            raise HandshakeFailed(reasons.HANDSHAKE_TIMEOUT, f"no complete TLS handshake within {timeout:g}s")
        if self.check.peer_id is None and _lib.SSL_session_reused(self.conn._ssl):
            cert = self.conn.get_peer_certificate(as_cryptography=True)
            if cert is None or not self.check.check_resumed(cert, datetime.now(timezone.utc)):
                reason, detail = self.check.failure or (reasons.NOT_SVID, "no peer certificate in the session")
                raise HandshakeFailed(reason, f"resumed session: {detail}")
        if self.check.peer_id is None:  # cannot happen with VERIFY_PEER, but fail closed
            raise HandshakeFailed(reasons.NOT_SVID, "peer presented no verifiable certificate")

    async def linger_after_refusal(self, limit: float = 1.0, max_bytes: int = 65536) -> None:
        """Let the alert we just sent reach the peer before the socket closes.

        Closing a socket with unread input makes the kernel send RST, and an RST makes the peer's
        kernel throw away our alert unread. So: FIN after the alert, then read and discard what the
        peer still sends, for at most ``limit`` seconds and ``max_bytes`` bytes.
        """
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        discarded = 0
        with trio.move_on_after(limit):
            while discarded < max_bytes:
                try:
                    chunk = self.sock.recv(16384)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.sock)
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                discarded += len(chunk)

    def _translate(self, exc: Exception) -> HandshakeFailed:
        if self.check.failure is not None:
            reason, detail = self.check.failure
            return HandshakeFailed(reason, detail)
        text = ssl_error_text(exc)
        alert = alert_from_error(exc) if isinstance(exc, SSL.Error) else None
        if alert is not None:
            return HandshakeFailed(reasons.HANDSHAKE_FAILED, f"remote refused us: alert {alert}")
        if "peer did not return a certificate" in text:
            return HandshakeFailed(reasons.NO_CLIENT_CERT, "client sent no certificate; this port requires one")
        if "unsupported protocol" in text or "no protocols available" in text:
            return HandshakeFailed(reasons.HANDSHAKE_FAILED, f"peer does not offer TLS 1.3 ({text})")
        return HandshakeFailed(reasons.HANDSHAKE_FAILED, text)
