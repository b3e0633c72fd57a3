"""The sidecar's TLS handshake: under a deadline, its failures translated into reason codes.

The verify callback (``proxy.tls``) decides inside the handshake and records its verdict on the
connection's ``PeerCheck``. This is the one place where a failed handshake becomes a reason code:
the check's own verdict first, else what OpenSSL or the peer said. A resumed session skipped the
certificate exchange, so its stored peer certificate is checked again here.
"""

from __future__ import annotations

import socket
from datetime import datetime, timezone

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

    async def handshake(self, timeout: float) -> None:
        """Run the handshake; raise HandshakeFailed with a reason code on any failure.

        On failure OpenSSL has already written its alert to the socket. Cancellation from outside
        propagates unchanged; the timeout is ours and becomes ``handshake_timeout``.
        """
        try:
            await super().handshake(timeout)
        except TimeoutError as exc:  # before OSError, of which it is one
            raise HandshakeFailed(reasons.HANDSHAKE_TIMEOUT, str(exc)) from None
        except (SSL.Error, OSError) as exc:
            raise self._translate(exc) from None
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
