"""TLS 1.3 on trio for request/response traffic: one context builder, one stream, one error text.

pyOpenSSL drives a non-blocking socket directly: OpenSSL reads and writes the file descriptor
itself (a socket BIO) and asks for readiness with WantRead/WantWrite, which become
``trio.lowlevel.wait_readable``/``wait_writable``. No memory BIO, no extra copy.
"""

from __future__ import annotations

import errno
import socket

import trio
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from mtls.sockets import close_socket

# AES-128-GCM first: the same AEAD strength class as the others here, and measurably cheaper per byte.
TLS13_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
RECEIVE_BYTES = 65536
PEM_CHAIN = "application/pem-certificate-chain"


def x509_error_text(errno: int) -> str:
    """OpenSSL's text for an X509_V_ERR_* code (``certificate has expired``)."""
    return _ffi.string(_lib.X509_verify_cert_error_string(errno)).decode("ascii", "replace")


class TlsStream:
    """A pyOpenSSL connection over a non-blocking stdlib socket, as a small trio byte stream.

    The pattern of ``proxy.handshake.TlsSocket``: OpenSSL reads and writes the socket itself and
    asks for readiness with WantRead/WantWrite. The caller owns ``sock``; ``aclose`` sends
    close_notify (best effort) and closes it. Cancellation leaves the connection unusable but
    never leaks the socket once ``aclose`` runs.
    """

    __slots__ = ("sock", "conn")

    def __init__(self, conn: SSL.Connection, sock: socket.socket):
        self.sock = sock
        self.conn = conn

    async def _retry(self, operation, *args):
        while True:
            try:
                return operation(*args)
            except SSL.WantReadError:
                await trio.lowlevel.wait_readable(self.sock)
            except SSL.WantWriteError:
                await trio.lowlevel.wait_writable(self.sock)

    async def handshake(self) -> None:
        await self._retry(self.conn.do_handshake)

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self._retry(self.conn.send, view[:16384].tobytes())
            view = view[sent:]

    async def receive_some(self, max_bytes: int = RECEIVE_BYTES) -> bytes:
        """Up to ``max_bytes``; b"" at the end of the stream (close_notify, or a TCP close)."""
        try:
            return await self._retry(self.conn.recv, max_bytes)
        except SSL.ZeroReturnError:
            return b""
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] in (-1, errno.ECONNRESET):
                return b""  # h11 then says whether the message was complete
            raise

    async def aclose(self) -> None:
        try:
            self.conn.shutdown()  # one close_notify; we do not wait for the peer's
        except (SSL.Error, OSError):
            pass
        close_socket(self.sock)


def ssl_failure_text(exc: Exception) -> str:
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        reasons = [entry[2] for entry in exc.args[0] if len(entry) > 2 and entry[2]]
        if reasons:
            return "; ".join(reasons)
    if isinstance(exc, SSL.SysCallError):
        return "connection closed during the TLS handshake"
    return str(exc) or type(exc).__name__


def tls13_context() -> SSL.Context:
    """A TLS 1.3-only context with the settings of the data path (ciphersuites, no tickets, no compression)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION)
    ctx.set_tls13_ciphersuites(TLS13_CIPHERSUITES)
    return ctx
