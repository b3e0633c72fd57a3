"""TLS 1.3 on trio: the one context builder, the one TLS stream, and OpenSSL's errors as text.

Theory of operation
-------------------
trio has no pyOpenSSL stream, and its own SSLStream drops the pending alert when a handshake
fails. Here pyOpenSSL drives a non-blocking stdlib socket directly: OpenSSL reads and writes the
file descriptor itself (a socket BIO), so when it refuses a peer it writes the fatal alert to the
socket on its own, and when it needs the network it raises WantRead/WantWrite, which become
``trio.lowlevel.wait_readable``/``wait_writable``. No memory BIO, no extra copy.

Every TLS endpoint of the project stands on this module: the sidecar's data path (contexts in
``proxy.tls``, handshake checks in ``proxy.handshake``), ``ca serve`` and the sidecar's client
for it (``proxy.caclient``).
"""

from __future__ import annotations

import errno as errno_codes
import math
import socket
from collections.abc import Iterable, Sequence

import trio
from cryptography import x509
from OpenSSL import SSL, crypto

from mtls.sockets import close_socket

# AES-128-GCM first: the same AEAD strength class as the others here, and measurably cheaper per byte.
TLS13_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
RECEIVE_BYTES = 65536
SEND_CHUNK = 16384  # one TLS record's worth of plaintext per SSL_write


# --- contexts ---------------------------------------------------------------------------------


def tls13_context(*, tickets: bool = False) -> SSL.Context:
    """A TLS 1.3-only context: our ciphersuites, no compression, no renegotiation, no session cache.

    ``tickets`` lets a server issue TLS 1.3 session tickets (the sidecar's opt-in resumption);
    without them no session is ever resumed, since there is no server-side cache either. The
    caller adds its certificate (``present``), its trust (``trust``) and its verify mode.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | (0 if tickets else SSL.OP_NO_TICKET))
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_tls13_ciphersuites(TLS13_CIPHERSUITES)
    return ctx


def present(ctx: SSL.Context, chain: Sequence[x509.Certificate], key) -> None:
    """Make ``ctx`` present ``chain`` (leaf first, then intermediates) signed by ``key``.

    Raises SSL.Error if ``key`` does not match the leaf.
    """
    ctx.use_certificate(chain[0])
    for intermediate in chain[1:]:
        ctx.add_extra_chain_cert(intermediate)
    ctx.use_privatekey(key)
    ctx.check_privatekey()


def trust(ctx: SSL.Context, roots: Iterable[x509.Certificate]) -> None:
    """Add ``roots`` to the certificates ``ctx`` verifies peers against."""
    store = ctx.get_cert_store()
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))


# --- the stream -------------------------------------------------------------------------------


class TlsStream:
    """A pyOpenSSL connection over a non-blocking stdlib socket, as a small trio byte stream.

    ``app_data`` is attached to the connection for the context's verify callback to find.
    ``send_all`` and ``receive_some`` raise SSL.Error or OSError when the connection breaks.
    Who closes what: ``aclose`` sends close_notify (best effort) and closes ``sock``; a caller
    that closes ``sock`` itself (the sidecar, which may abort it with RST) need not call it.
    Cancellation leaves the TLS connection unusable but the socket open for its owner to close.
    """

    __slots__ = ("sock", "conn")

    def __init__(
        self,
        ctx: SSL.Context,
        sock: socket.socket,
        *,
        server_side: bool,
        server_name: str | None = None,
        app_data: object = None,
    ):
        self.sock = sock
        conn = SSL.Connection(ctx, sock)
        conn.set_app_data(app_data)
        if server_side:
            conn.set_accept_state()
        else:
            if server_name:
                conn.set_tlsext_host_name(server_name.encode("idna"))
            conn.set_connect_state()
        self.conn = conn

    async def _retry(self, operation, *args):
        """Call an OpenSSL operation until it no longer waits for the socket."""
        while True:
            try:
                return operation(*args)
            except SSL.WantReadError:
                await trio.lowlevel.wait_readable(self.sock)
            except SSL.WantWriteError:
                await trio.lowlevel.wait_writable(self.sock)

    async def handshake(self, timeout: float = math.inf) -> None:
        """Complete the handshake within ``timeout`` seconds.

        Raises SSL.Error or OSError when it fails (OpenSSL has then written its alert, if any, to
        the socket), and TimeoutError (an OSError) naming ``timeout`` when it does not finish in time.
        """
        with trio.move_on_after(timeout):
            await self._retry(self.conn.do_handshake)
            return
        raise TimeoutError(f"no complete TLS handshake within {timeout:g}s")

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self._retry(self.conn.send, view[:SEND_CHUNK].tobytes())
            view = view[sent:]

    async def receive_some(self, max_bytes: int = RECEIVE_BYTES) -> bytes:
        """Up to ``max_bytes``; b"" at the end of the stream (close_notify, or a TCP close)."""
        try:
            return await self._retry(self.conn.recv, max_bytes)
        except SSL.ZeroReturnError:
            return b""
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] in (-1, errno_codes.ECONNRESET):
                return b""  # the reader (h11) then says whether the message was complete
            raise

    async def linger_after_refusal(self, limit: float = 1.0, max_bytes: int = 65536) -> None:
        """Let the alert we just sent reach the peer before the socket closes.

        Closing a socket with unread input makes the kernel send RST, and an RST makes the peer's
        kernel throw away our alert unread. So: FIN after the alert, then read and discard what the
        peer still sends, for at most ``limit`` seconds and ``max_bytes`` bytes. The socket stays
        open for its owner to close.
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

    async def aclose(self) -> None:
        """One close_notify (we do not wait for the peer's), then close the socket. Never raises."""
        try:
            self.conn.shutdown()
        except (SSL.Error, OSError):
            pass
        close_socket(self.sock)


# --- errors as text ---------------------------------------------------------------------------


def ssl_error_text(exc: Exception) -> str:
    """What went wrong, in OpenSSL's words where it has some (``unexpected eof while reading``).

    A connection closed under us is ``connection closed by peer``; another socket error is its
    errno name (``econnreset``).
    """
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


def alert_from_error(exc: SSL.Error) -> str | None:
    """The TLS alert a peer sent us, as its RFC name (``access_denied``), if the error is one."""
    for entry in exc.args[0] if exc.args and isinstance(exc.args[0], list) else ():
        text = entry[2] if len(entry) > 2 else ""
        if " alert " in text:
            return text.split(" alert ", 1)[1].strip().replace(" ", "_")
    return None
