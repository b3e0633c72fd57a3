"""The admin listener (``/healthz``, ``/readyz``, ``/metrics``) and the ``proxy health`` client.

Theory of operation
-------------------
``serve_admin`` is a small HTTP/1.1 server on ``mtls.httpserve``: a table maps each path to a
function of the sidecar that returns a ``Reply``. Each connection is served by one task, request
after request, under the bounds of ``LIMITS`` (see ``mtls.httpserve``: a deadline per exchange,
at most ``MAX_REQUESTS_PER_CONNECTION`` requests and ``CONNECTION_LIFETIME`` seconds per
connection, 431/413/400 for an oversized or malformed request).

Slots: at most ``max_connections`` connections (``per_source`` from one address) are held at once;
a new connection is accepted at once and, when a budget is full, the oldest connection that has
already had an answer yields its place (``mtls.httpserve.Admission``; pages answer without waiting,
so every connection can yield). The budget is large because a plain connection is cheap: a flood
of keep-alive connections, from the app in the same pod for instance, is held and served in turn,
one request per connection per round of the event loop, and a probe's fresh connection is answered
within that round; each flooding connection must reconnect after its request budget or lifetime.

No error of a client or of a page leaves a connection's task: a page that raises answers 500 and
is logged (``admin_error``). Accepting follows the one policy of ``mtls.sockets.accept_loop``.

``health_main`` is the other side, for Docker's HEALTHCHECK: blocking, stdlib only, short timeout.
"""

from __future__ import annotations

import http.client
import socket
import time
from functools import partial
from typing import Callable, TextIO

import trio
from prometheus_client import CONTENT_TYPE_LATEST

from mtls.endpoints import parse_endpoint
from mtls.httpserve import Admission, Limits, Reply, Request, Ticket, serve_requests
from mtls.sockets import accept_loop, close_socket

MAX_CONNECTIONS = 1024  # a plain admin connection costs a few KiB: enough to hold a flood rather than churn
MAX_CONNECTIONS_PER_SOURCE = 512  # the kubelet's probes come from another address than the pod's own clients
EXCHANGE_DEADLINE = 10.0  # seconds for a client to send a request and take its reply
CONNECTION_LIFETIME = 30.0  # seconds, however many requests
MAX_REQUESTS_PER_CONNECTION = 100
MAX_HEAD_BYTES = 8 * 1024
MAX_BODY_BYTES = 8 * 1024
LIMITS = Limits(
    max_head_bytes=MAX_HEAD_BYTES, max_body_bytes=MAX_BODY_BYTES, exchange_deadline=EXCHANGE_DEADLINE,
    connection_lifetime=CONNECTION_LIFETIME, max_requests=MAX_REQUESTS_PER_CONNECTION,
)
HEALTH_TIMEOUT = 2.0  # seconds, for each of connect, send and receive
MAX_HEALTH_BODY = 64 * 1024


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


_PAGES: dict[str, Callable[..., Reply]] = {"/healthz": _healthz, "/readyz": _readyz, "/metrics": _metrics}


async def _reply_to(sidecar, request: Request) -> Reply:
    """The reply to one request; a page that raises gives 500 (and is logged), never an exception."""
    page = _PAGES.get(request.path)
    if page is None:
        return Reply(404, b"not found\n")
    if request.method not in ("GET", "HEAD"):
        return Reply(405, b"method not allowed; use GET or HEAD\n", headers=(("allow", "GET, HEAD"),))
    try:
        return page(sidecar)
    except Exception as exc:
        sidecar.log.emit("error", "admin_error", path=request.target, detail=f"{type(exc).__name__}: {exc}")
        return Reply(500, b"internal error; see the sidecar's log\n")


# --- the server -------------------------------------------------------------------------------


async def serve_admin(
    sock: socket.socket,
    sidecar,
    *,
    max_connections: int = MAX_CONNECTIONS,
    per_source: int = MAX_CONNECTIONS_PER_SOURCE,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin pages on ``sock`` (a bound, listening, non-blocking stdlib socket) until cancelled.

    Who closes what: ``serve_admin`` owns ``sock`` from the call on and closes it when it returns;
    each accepted connection is owned and closed by the task that serves it. On cancellation every
    open admin connection is closed, mid-request or not, and then ``sock``.
    """
    admission = Admission(max_connections, per_source)
    # Descriptors: the admitted connections plus those that yielded and are still closing.
    sockets = trio.Semaphore(2 * max_connections)
    try:
        async with trio.open_nursery() as nursery:

            def on_connection(conn_sock: socket.socket, addr) -> None:
                source = str(addr[0]) if isinstance(addr, tuple) else "local"
                nursery.start_soon(_serve_connection, conn_sock, sidecar, admission.admit(source), sockets)

            task_status.started()
            await accept_loop(sock, on_connection, sidecar.log, listener="admin", slots=sockets)
    finally:
        close_socket(sock)


async def _serve_connection(sock: socket.socket, sidecar, place: Ticket | None, sockets: trio.Semaphore) -> None:
    """Serve requests on ``sock`` in its ``place`` until either side ends it or it yields; close it.

    ``place`` None (every connection busy answering) closes it at once. Never raises but Cancelled:
    a client's disconnect is normal, anything else is logged.
    """
    try:
        async with trio.SocketStream(trio.socket.from_stdlib_socket(sock)) as stream:
            if place is not None:
                with place.cancel_scope:
                    await serve_requests(stream, partial(_reply_to, sidecar), LIMITS, ticket=place)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    except Exception as exc:
        sidecar.log.emit("error", "admin_error", detail=f"{type(exc).__name__}: {exc}")
    finally:
        if place is not None:
            place.release()
        sockets.release()


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
