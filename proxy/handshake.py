"""The sidecar's TLS handshake: under a deadline, its failures translated into reason codes.

The verify callback (``proxy.tls``) decides inside the handshake and records its verdict on the
connection's ``PeerCheck``. This is the one place where a failed handshake becomes a reason code:
the check's own verdict first, else what OpenSSL or the peer said. A resumed session skipped the
certificate exchange, so its stored peer certificate is checked again here.

Memory: an OpenSSL connection object costs about 50 KiB, so a server-side one is made only once
the client's first TLS record has fully arrived (``await_first_record``). Until then an accepted
connection is a socket and a waiting task, woken when its first bytes arrive (usually the whole
ClientHello at once) and, if the record is not whole yet, by the kernel told with SO_RCVLOWAT how
many bytes to wait for, only when there is something for OpenSSL to work on.
"""

from __future__ import annotations

import socket
from datetime import datetime, timezone

import trio
from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from mtls import reasons
from mtls.tlsio import TlsStream, alert_from_error, ssl_error_text
from proxy.tls import PeerCheck


class HandshakeFailed(Exception):
    """The handshake did not produce an authorized peer. ``reason`` is a contract reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TlsSocket(TlsStream):
    """A sidecar connection: a TlsStream whose verify callback reports to ``check``.

    The caller owns ``sock`` and closes it (with RST when it aborts).
    """

    __slots__ = ("check",)

    def __init__(
        self, ctx: SSL.Context, sock: socket.socket, check: PeerCheck, *, server_side: bool,
        server_name: str | None = None,
    ):
        super().__init__(ctx, sock, server_side=server_side, server_name=server_name, app_data=check)
        self.check = check

    async def handshake(self, timeout: float, deadline: float | None = None) -> None:
        """Run the handshake; raise HandshakeFailed with a reason code on any failure.

        It must end by ``deadline`` (trio time; default ``timeout`` seconds from now), the end of
        the ``timeout`` that started earlier, at accept. On failure OpenSSL has already written its
        alert to the socket. Cancellation from outside propagates unchanged; the deadline is ours
        and becomes ``handshake_timeout``.
        """
        if deadline is None:
            deadline = trio.current_time() + timeout
        finished = False
        try:
            with trio.move_on_at(deadline):
                await self._retry(self.conn.do_handshake)
                finished = True
        except (SSL.Error, OSError) as exc:
            raise self._translate(exc) from None
        if not finished:
            raise HandshakeFailed(reasons.HANDSHAKE_TIMEOUT, f"no complete TLS handshake within {timeout:g}s")
        if self.check.peer_id is None and _lib.SSL_session_reused(self.conn._ssl):
            cert = self.conn.get_peer_certificate(as_cryptography=True)
            if cert is None or not self.check.check_resumed(cert, datetime.now(timezone.utc)):
                reason, detail = self.check.failure or (reasons.NOT_SVID, "no peer certificate in the session")
                raise HandshakeFailed(reason, f"resumed session: {detail}")
        if self.check.peer_id is None:  # cannot happen with VERIFY_PEER, but fail closed
            raise HandshakeFailed(reasons.NOT_SVID, "peer presented no verifiable certificate")

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


_TLS_RECORD_HEADER = 5
_MAX_FIRST_RECORD = 16384 + 256  # a TLSPlaintext record's largest length; a larger one is left to OpenSSL to refuse


async def await_first_record(sock: socket.socket) -> None:
    """Return once the client's first TLS record has arrived whole, or the socket is at EOF or broken.

    Wait for readability, peek at what arrived, and when the record is not whole yet, wait again
    with SO_RCVLOWAT set so that the kernel wakes us only when all of it is there (first the
    record header if even that is partial, then the whole record). A ClientHello is usually one
    record of under 2 KiB in one segment: one wait, one peek. Nothing is consumed: OpenSSL reads
    the bytes afterwards. A client that trickles or stalls costs a socket and this task, not an
    OpenSSL object. What is not a TLS handshake record is left for OpenSSL to refuse in its own
    words. No deadline here: the caller's.
    """
    lowat = 1  # the socket's SO_RCVLOWAT: how many bytes the last wait waited for
    try:
        while True:
            await trio.lowlevel.wait_readable(sock)
            needed = _bytes_needed(sock)
            if needed <= lowat:  # all there, or at EOF with less, or nothing worth waiting for
                return
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, needed)
            lowat = needed
    except OSError:
        pass  # reset: OpenSSL finds out and says so in its own words
    finally:
        if lowat != 1:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass


# What ``_bytes_needed`` peeks into: the trio thread's alone, overwritten by every peek.
_peeked = bytearray(_TLS_RECORD_HEADER + _MAX_FIRST_RECORD)


def _bytes_needed(sock: socket.socket) -> int:
    """How many bytes must have arrived before the first record is whole (peeked, not consumed):
    the header's 5 while even it is partial, then header and body; 0 when there is nothing more
    to wait for (EOF, the whole record, bytes that are not a handshake record, or an oversized one)."""
    got = sock.recv_into(_peeked, len(_peeked), socket.MSG_PEEK)
    if got == 0:
        return 0
    if got < _TLS_RECORD_HEADER:
        return _TLS_RECORD_HEADER
    length = int.from_bytes(_peeked[3:5], "big")
    if _peeked[0] != 22 or length > _MAX_FIRST_RECORD:  # 22: a handshake record
        return 0
    return 0 if got >= _TLS_RECORD_HEADER + length else _TLS_RECORD_HEADER + length
