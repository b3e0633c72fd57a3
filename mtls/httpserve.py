"""HTTP/1.1 serving with h11 over any trio byte stream: the admin listener's and ``ca serve``'s.

Theory of operation
-------------------
``serve_requests`` serves one connection, request after request (keep-alive): h11 parses and
frames, ``answer`` turns each ``Request`` into a ``Reply``. Bounds keep a slow or hostile client
from costing more than the task that serves it:

- every exchange (read one request, write its reply) must finish within ``Limits.exchange_deadline``
  seconds of the previous one, or of the connection's start; otherwise serving ends;
- a connection carries at most ``Limits.max_requests`` requests and lives at most
  ``Limits.connection_lifetime`` seconds in total (a request whose head has arrived still gets
  its exchange deadline): the reply that reaches either bound says ``connection: close``, and a
  connection idle at its end of life is closed. Keep-alive never extends a connection's life;
- a request head still incomplete after ``Limits.max_head_bytes`` is answered 431, a body over
  ``Limits.max_body_bytes`` 413, a malformed request 400 (the reply comes from ``malformed``);
  each of these replies closes the connection.

Slots: ``Admission`` bounds how many connections a server holds, in total and per source address.
When a budget is full, the oldest connection that is not being answered right now yields its
place to the newcomer (its task is cancelled through its ``Ticket``), so idle or slow connections,
however many an attacker opens, cannot keep a new client out; a client is refused only when every
slot is busy computing a reply. Connections that have had an answer yield before those still
waiting for their first, so that a burst of newcomers cannot push out a fresh client's connection
before it is served.

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
    connection_lifetime: float  # seconds from the connection's start; keep-alive does not reset it
    max_requests: int  # per connection


class Ticket:
    """One admitted connection's place in an ``Admission``.

    The connection's task runs inside ``cancel_scope``; eviction cancels it. ``busy`` is True
    while a reply is being computed: such a connection does not yield. ``answered`` is set once
    it has had a reply. ``release`` gives the place back (idempotent; eviction releases it already).
    """

    __slots__ = ("admission", "source", "cancel_scope", "busy", "answered", "evicted")

    def __init__(self, admission: Admission, source: str):
        self.admission = admission
        self.source = source
        self.cancel_scope = trio.CancelScope()
        self.busy = False
        self.answered = False
        self.evicted = False

    def release(self) -> None:
        self.admission._forget(self)


class Admission:
    """At most ``capacity`` connections, at most ``per_source`` from one source; oldest idle yields.

    Admission order is kept (dicts keep insertion order), so the first non-busy ticket found in
    a table is the oldest one that may yield.
    """

    def __init__(self, capacity: int, per_source: int):
        self.capacity = capacity
        self.per_source = per_source
        self._all: dict[Ticket, None] = {}
        self._by_source: dict[str, dict[Ticket, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def admit(self, source: str) -> Ticket | None:
        """A ticket for a new connection from ``source``, evicting the oldest idle one of that
        source (or of all) when a budget is full; None if every connection in the way is busy."""
        same_source = self._by_source.get(source, {})
        if len(same_source) >= self.per_source and not self._evict_oldest(same_source):
            return None
        if len(self._all) >= self.capacity and not self._evict_oldest(self._all):
            return None
        ticket = Ticket(self, source)
        self._all[ticket] = None
        self._by_source.setdefault(source, {})[ticket] = None
        return ticket

    def _evict_oldest(self, tickets: dict[Ticket, None]) -> bool:
        idle = [ticket for ticket in tickets if not ticket.busy]
        if not idle:
            return False
        victim = next((ticket for ticket in idle if ticket.answered), idle[0])
        victim.evicted = True
        victim.cancel_scope.cancel()
        self._forget(victim)
        return True

    def _forget(self, ticket: Ticket) -> None:
        if self._all.pop(ticket, False) is None:
            same_source = self._by_source[ticket.source]
            del same_source[ticket]
            if not same_source:
                del self._by_source[ticket.source]


@dataclass(frozen=True)
class Request:
    method: str  # "GET"
    target: str  # "/readyz?verbose", as sent
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, value), as sent

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def header(self, name: str) -> str | None:
        """The value of the first header called ``name`` (lower case), or None."""
        return next((value for key, value in self.headers if key == name), None)


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
    ticket: Ticket | None = None,
) -> None:
    """Serve requests on ``stream`` until the client closes it, stalls, a reply ends it, or the
    connection reaches ``limits.max_requests`` or ``limits.connection_lifetime``.

    ``answer`` must not raise: a page that fails answers 500. ``served(request, reply, seconds)``
    is called after each reply is sent (``request`` None for a malformed one). ``ticket`` (the
    connection's place in an ``Admission``) is marked busy while ``answer`` runs. Returns normally
    when serving ends; raises what ``stream`` raises when the client goes away. Does not close
    ``stream``.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
    end_of_life = trio.current_time() + limits.connection_lifetime
    for number in range(1, limits.max_requests + 1):
        last = number == limits.max_requests
        keep_open = False
        with trio.CancelScope(deadline=min(trio.current_time() + limits.exchange_deadline, end_of_life)) as scope:
            keep_open = await _exchange(
                stream, conn, answer, limits, malformed, served, scope, end_of_life, last, ticket
            )
        if not keep_open:
            return
        conn.start_next_cycle()


async def _exchange(
    stream: ByteStream, conn: h11.Connection, answer, limits: Limits, malformed, served,
    scope: trio.CancelScope, end_of_life: float, last: bool, ticket: Ticket | None,
) -> bool:
    """Read one request and send its reply; True if the connection can carry another request.

    Waiting for the request's head ends at ``end_of_life``; once it has arrived the exchange has
    its whole deadline. The reply says ``connection: close`` when it is the ``last`` one or
    the connection's life is over.
    """
    started = trio.current_time()
    try:
        head = await next_event(stream, conn)
        scope.deadline = started + limits.exchange_deadline
        request = await _read_request(stream, conn, head, limits.max_body_bytes)
    except h11.RemoteProtocolError as exc:
        reply = malformed(exc.error_status_hint, str(exc))
        await _send(stream, conn, reply, with_body=True, close=True)
        if served is not None:
            served(None, reply, trio.current_time() - started)
        return False
    if request is None:
        return False
    if ticket is not None:
        ticket.busy = True
    try:
        reply = await answer(request)
    finally:
        if ticket is not None:
            ticket.busy = False
    close = last or trio.current_time() >= end_of_life
    await _send(stream, conn, reply, with_body=request.method != "HEAD", close=close)
    if ticket is not None:
        ticket.answered = True
    if served is not None:
        served(request, reply, trio.current_time() - started)
    return not close and conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _read_request(stream: ByteStream, conn: h11.Connection, head, max_body_bytes: int) -> Request | None:
    """The request that begins with ``head`` (an h11 event), with its body; None if the client
    closed the connection instead.

    Raises h11.RemoteProtocolError for a malformed or oversized request.
    """
    if isinstance(head, h11.ConnectionClosed):
        return None
    body = bytearray()
    while isinstance(event := await next_event(stream, conn), h11.Data):
        body += event.data
        if len(body) > max_body_bytes:
            raise h11.RemoteProtocolError(f"request body over {max_body_bytes} bytes", error_status_hint=413)
    headers = tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in head.headers)
    return Request(head.method.decode("ascii"), head.target.decode("ascii", "replace"), bytes(body), headers)


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
    if with_body and reply.body:  # a 304 has none
        data += conn.send(h11.Data(data=reply.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)
