"""HTTP/1.1 serving with h11 over any trio byte stream: the admin listener's and ``ca serve``'s.

Theory of operation
-------------------
``serve_requests`` serves one connection, request after request (keep-alive): h11 parses and
frames, ``answer`` turns each ``Request`` into a ``Reply``. Bounds keep a slow or hostile client
from costing more than the task that serves it:

- every exchange (read one request, write its reply) must finish within ``Limits.exchange_deadline``
  seconds of the previous one, or of the connection's start; otherwise serving ends;
- a request head still incomplete after ``Limits.max_head_bytes`` is answered 431, a body over
  ``Limits.max_body_bytes`` 413, a malformed request 400 (the reply comes from ``malformed``);
  each of these replies closes the connection.

Accepting is ``mtls.sockets.accept_loop`` (one error policy for every listener); the stream,
its errors and its closing belong to the caller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

import h11
import trio

RECEIVE_BYTES = 16 * 1024

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
PEM_CHAIN = "application/pem-certificate-chain"  # ca serve's answer: leaf, then intermediate, in PEM


class ByteStream(Protocol):
    """What h11 needs of a connection: a trio ``SocketStream`` or an ``mtls.tlsio.TlsStream``."""

    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int) -> bytes: ...


@dataclass(frozen=True)
class Limits:
    max_head_bytes: int
    max_body_bytes: int
    exchange_deadline: float  # seconds for a client to send one request and take its reply


@dataclass(frozen=True)
class Request:
    method: str  # "GET"
    target: str  # "/readyz?verbose", as sent
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()
    log_fields: tuple[tuple[str, object], ...] = ()  # for the server's request log, never sent


def text_error(status: int, detail: str) -> Reply:
    """The plain-text reply to a malformed request: ``bad request: <what h11 found>``."""
    return Reply(status, f"{HTTPStatus(status).phrase.lower()}: {detail}\n".encode())


async def serve_requests(
    stream: ByteStream,
    answer: Callable[[Request], Awaitable[Reply]],
    limits: Limits,
    *,
    malformed: Callable[[int, str], Reply] = text_error,
    served: Callable[[Request | None, Reply, float], None] | None = None,
) -> None:
    """Serve requests on ``stream`` until the client closes it, stalls, or a reply ends it.

    ``answer`` must not raise: a page that fails answers 500. ``served(request, reply, seconds)``
    is called after each reply is sent (``request`` None for a malformed one). Returns normally
    when serving ends; raises what ``stream`` raises when the client goes away. Does not close
    ``stream``.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
    while True:
        keep_open = False
        with trio.move_on_after(limits.exchange_deadline):
            keep_open = await _exchange(stream, conn, answer, limits, malformed, served)
        if not keep_open:
            return
        conn.start_next_cycle()


async def _exchange(stream: ByteStream, conn: h11.Connection, answer, limits: Limits, malformed, served) -> bool:
    """Read one request and send its reply; True if the connection can carry another request."""
    started = trio.current_time()
    try:
        request = await _read_request(stream, conn, limits.max_body_bytes)
    except h11.RemoteProtocolError as exc:
        reply = malformed(exc.error_status_hint, str(exc))
        await _send(stream, conn, reply, with_body=True, close=True)
        if served is not None:
            served(None, reply, trio.current_time() - started)
        return False
    if request is None:
        return False
    reply = await answer(request)
    await _send(stream, conn, reply, with_body=request.method != "HEAD")
    if served is not None:
        served(request, reply, trio.current_time() - started)
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _read_request(stream: ByteStream, conn: h11.Connection, max_body_bytes: int) -> Request | None:
    """The next request with its body; None if the client closed the connection first.

    Raises h11.RemoteProtocolError for a malformed or oversized request.
    """
    head = await next_event(stream, conn)
    if isinstance(head, h11.ConnectionClosed):
        return None
    body = bytearray()
    while isinstance(event := await next_event(stream, conn), h11.Data):
        body += event.data
        if len(body) > max_body_bytes:
            raise h11.RemoteProtocolError(f"request body over {max_body_bytes} bytes", error_status_hint=413)
    return Request(head.method.decode("ascii"), head.target.decode("ascii", "replace"), bytes(body))


async def next_event(stream: ByteStream, conn: h11.Connection):
    """The next h11 event of ``conn`` (either side), receiving from ``stream`` as h11 needs."""
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await stream.receive_some(RECEIVE_BYTES))
    return event


async def _send(stream: ByteStream, conn: h11.Connection, reply: Reply, *, with_body: bool, close: bool = False) -> None:
    headers = [
        ("content-type", reply.content_type),
        ("content-length", str(len(reply.body))),
        ("cache-control", "no-store"),
        *reply.headers,
        *((("connection", "close"),) if close else ()),
    ]
    data = conn.send(h11.Response(status_code=reply.status, reason=HTTPStatus(reply.status).phrase, headers=headers))
    if with_body:
        data += conn.send(h11.Data(data=reply.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)
