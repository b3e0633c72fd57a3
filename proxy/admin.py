"""The admin listener (``/healthz``, ``/readyz``, ``/metrics``) and the ``proxy health`` client.

Theory of operation
-------------------
``serve_admin`` is a small HTTP/1.1 server: trio moves bytes, h11 parses and frames them, and a
table maps each path to a function of the sidecar that returns a ``Reply``. Each connection is
served by one task, request after request (keep-alive), under three bounds that keep a slow or
hostile client from costing the sidecar more than that task:

- every exchange (read one request, write its reply) must finish within ``EXCHANGE_DEADLINE``
  seconds of the previous one, or of the connection's start; otherwise the connection is closed;
- a request head still incomplete after ``MAX_HEAD_BYTES`` gets 431, a body over ``MAX_BODY_BYTES``
  gets 413, a malformed request gets 400; each of these replies closes the connection;
- at most ``max_connections`` connections are served at once; beyond that, new connections wait
  in the kernel's accept backlog until a slot frees up.

No error of a client or of a page leaves a connection's task: a page that raises answers 500 and
is logged (``admin_error``). Running out of file descriptors is logged once and accept is retried;
any other accept error is a bug and propagates, as in the sidecar's own accept loops.

``health_main`` is the other side, for Docker's HEALTHCHECK: blocking, stdlib only, short timeout.
"""

from __future__ import annotations

import errno
import http.client
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable, TextIO

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST

from mtls.endpoints import parse_endpoint

MAX_CONNECTIONS = 64
EXCHANGE_DEADLINE = 10.0  # seconds for a client to send a request and take its reply
MAX_HEAD_BYTES = 8 * 1024
MAX_BODY_BYTES = 8 * 1024
RECEIVE_BYTES = 16 * 1024
ACCEPT_BACKOFF = 0.1  # seconds between accept attempts while out of file descriptors
HEALTH_TIMEOUT = 2.0  # seconds, for each of connect, send and receive
MAX_HEALTH_BODY = 64 * 1024

TEXT = "text/plain; charset=utf-8"
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


# --- pages ------------------------------------------------------------------------------------


def _healthz(sidecar) -> Reply:
    return Reply(200, b"ok\n")


def _readyz(sidecar) -> Reply:
    problems = sidecar.readiness_problems(time.time())
    if problems:
        return Reply(503, "".join(f"{problem}\n" for problem in problems).encode())
    return Reply(200, b"ready\n")


def _metrics(sidecar) -> Reply:
    return Reply(200, sidecar.metrics.exposition(), CONTENT_TYPE_LATEST)


_PAGES: dict[bytes, Callable[..., Reply]] = {b"/healthz": _healthz, b"/readyz": _readyz, b"/metrics": _metrics}


def _reply_to(method: bytes, target: bytes, sidecar) -> Reply:
    """The reply to one request; a page that raises gives 500 (and is logged), never an exception."""
    page = _PAGES.get(target.partition(b"?")[0])
    if page is None:
        return Reply(404, b"not found\n")
    if method not in (b"GET", b"HEAD"):
        return Reply(405, b"method not allowed; use GET or HEAD\n", headers=(("allow", "GET, HEAD"),))
    try:
        return page(sidecar)
    except Exception as exc:
        sidecar.log.emit(
            "error", "admin_error", path=target.decode("ascii", "replace"), detail=f"{type(exc).__name__}: {exc}"
        )
        return Reply(500, b"internal error; see the sidecar's log\n")


# --- the server -------------------------------------------------------------------------------


async def serve_admin(
    sock, sidecar, *, max_connections: int = MAX_CONNECTIONS, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the admin pages on ``sock`` (a bound, listening stdlib socket) until cancelled.

    Who closes what: ``serve_admin`` owns ``sock`` from the call on and closes it when it returns;
    each accepted connection is owned and closed by the task that serves it. On cancellation every
    open admin connection is closed, mid-request or not, and then ``sock``.
    """
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    slots = trio.Semaphore(max_connections)
    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        while True:
            await slots.acquire()
            stream = await _accept(listener, sidecar.log)
            nursery.start_soon(_serve_connection, stream, sidecar, slots)


async def _accept(listener: trio.SocketListener, log) -> trio.SocketStream:
    """The next connection; while out of file descriptors, log once and retry (other errors raise)."""
    logged = False
    while True:
        try:
            return await listener.accept()
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                raise
            if not logged:
                log.emit(
                    "error", "accept_failed", listener="admin",
                    detail=f"{exc.strerror}; admin connections wait until descriptors free up",
                )
                logged = True
            await trio.sleep(ACCEPT_BACKOFF)


async def _serve_connection(stream: trio.SocketStream, sidecar, slots: trio.Semaphore) -> None:
    """Serve requests on ``stream`` until either side ends it; close it and release one of ``slots``.

    Never raises but Cancelled: a client's disconnect is normal, anything else is logged.
    """
    try:
        async with stream:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
            while True:
                keep_open = False
                with trio.move_on_after(EXCHANGE_DEADLINE):
                    keep_open = await _exchange(stream, conn, sidecar)
                if not keep_open:
                    return
                conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    except Exception as exc:
        sidecar.log.emit("error", "admin_error", detail=f"{type(exc).__name__}: {exc}")
    finally:
        slots.release()


async def _exchange(stream: trio.SocketStream, conn: h11.Connection, sidecar) -> bool:
    """Read one request and send its reply; True if the connection can carry another request."""
    try:
        request = await _read_request(stream, conn)
    except h11.RemoteProtocolError as exc:
        status = exc.error_status_hint
        body = f"{HTTPStatus(status).phrase.lower()}: {exc}\n".encode()
        await _send(stream, conn, Reply(status, body, headers=(("connection", "close"),)), with_body=True)
        return False
    if request is None:
        return False
    reply = _reply_to(request.method, request.target, sidecar)
    await _send(stream, conn, reply, with_body=request.method != b"HEAD")
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    """The next request, its body read and dropped; None if the client closed the connection first.

    Raises h11.RemoteProtocolError for a malformed or oversized request.
    """
    request = await _next_event(stream, conn)
    if isinstance(request, h11.ConnectionClosed):
        return None
    body_bytes = 0
    while isinstance(event := await _next_event(stream, conn), h11.Data):
        body_bytes += len(event.data)
        if body_bytes > MAX_BODY_BYTES:
            raise h11.RemoteProtocolError(f"request body over {MAX_BODY_BYTES} bytes", error_status_hint=413)
    return request


async def _next_event(stream: trio.SocketStream, conn: h11.Connection):
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await stream.receive_some(RECEIVE_BYTES))
    return event


async def _send(stream: trio.SocketStream, conn: h11.Connection, reply: Reply, *, with_body: bool) -> None:
    headers = [
        ("content-type", reply.content_type),
        ("content-length", str(len(reply.body))),
        ("cache-control", "no-store"),
        *reply.headers,
    ]
    data = conn.send(h11.Response(status_code=reply.status, reason=HTTPStatus(reply.status).phrase, headers=headers))
    if with_body:
        data += conn.send(h11.Data(data=reply.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


# --- proxy health -----------------------------------------------------------------------------


def health_main(admin: str, out: TextIO, err: TextIO) -> int:
    """``proxy health``: GET /readyz on the admin listener at ``admin`` (HOST:PORT).

    Exit 0 if it answers 200; 1 if it answers anything else (the reasons are printed on ``out``)
    or cannot be reached (one line on ``err``); 2 if ``admin`` is not HOST:PORT. Blocking; each
    network step times out after ``HEALTH_TIMEOUT`` seconds.
    """
    try:
        endpoint = parse_endpoint(admin, hostname=True)
    except ValueError as exc:
        print(f"proxy health: --admin {exc}", file=err)
        return 2
    if endpoint.port == 0:
        print(f"proxy health: --admin {admin!r}: port 0 cannot be connected to", file=err)
        return 2
    connection = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=HEALTH_TIMEOUT)
    try:
        connection.request("GET", "/readyz")
        response = connection.getresponse()
        body = response.read(MAX_HEALTH_BODY).decode("utf-8", "replace")
    except TimeoutError:
        print(f"proxy health: no answer from the admin listener at {endpoint} within {HEALTH_TIMEOUT:g}s", file=err)
        return 1
    except OSError as exc:
        print(f"proxy health: cannot connect to the admin listener at {endpoint}: {exc.strerror or exc}", file=err)
        return 1
    except http.client.HTTPException as exc:
        print(f"proxy health: {endpoint} did not answer like HTTP: {type(exc).__name__}: {exc}", file=err)
        return 1
    finally:
        connection.close()
    if response.status == 200:
        print(f"ready ({endpoint})", file=out)
        return 0
    if response.status == 503:
        for reason in body.splitlines() or ["no reason given"]:
            print(f"not ready: {reason}", file=out)
        return 1
    print(
        f"proxy health: {endpoint} answered GET /readyz with {response.status} {response.reason}; "
        "is that the sidecar's admin listener?",
        file=err,
    )
    return 1
