"""The admin listener over real loopback sockets, and ``proxy health`` against it."""

from __future__ import annotations

import http.client
import io
import json
import socket
from dataclasses import dataclass
from functools import partial

import pytest
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from mtls.endpoints import parse_endpoint
from mtls.events import EventLog
from mtls.sockets import listen_socket
from proxy.admin import (
    EXCHANGE_DEADLINE,
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    health_main,
    serve_admin,
)
from proxy.metrics import Metrics

EXPIRED = "identity spiffe://example.org/ns/prod/sa/web expired at 2024-01-01T00:00:00+00:00"
UNBOUND = "listener api is not bound"


class FakeSidecar:
    """What the admin listener uses of a Sidecar: real metrics and log, readiness set by the test."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.log_output = io.StringIO()
        self.log = EventLog("info", "json", self.log_output)
        self.problems: list[str] = []

    def readiness_problems(self, now_timestamp: float) -> list[str]:
        return list(self.problems)

    def logged_events(self) -> list[dict]:
        return [json.loads(line) for line in self.log_output.getvalue().splitlines()]


@dataclass
class Admin:
    sidecar: FakeSidecar
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class Fetched:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


async def start_admin(nursery: trio.Nursery, sidecar: FakeSidecar | None = None, **options) -> Admin:
    sidecar = sidecar or FakeSidecar()
    sock = listen_socket(parse_endpoint("127.0.0.1:0"))
    host, port = sock.getsockname()
    await nursery.start(partial(serve_admin, sock, sidecar, **options))
    return Admin(sidecar, host, port)


@pytest.fixture
async def admin(nursery) -> Admin:
    return await start_admin(nursery)


async def fetch(admin: Admin, path: str, method: str = "GET") -> Fetched:
    """One request with the stdlib client, in a thread (it blocks)."""

    def blocking_fetch() -> Fetched:
        connection = http.client.HTTPConnection(admin.host, admin.port, timeout=5)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            return Fetched(response.status, response.headers, response.read())
        finally:
            connection.close()

    return await trio.to_thread.run_sync(blocking_fetch)


async def exchange_raw(admin: Admin, request: bytes) -> bytes:
    """Send raw bytes, then read until the server closes the connection."""
    async with await trio.open_tcp_stream(admin.host, admin.port) as stream:
        await stream.send_all(request)
        return await read_until_closed(stream)


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    received = b""
    while chunk := await stream.receive_some():
        received += chunk
    return received


async def run_health(address: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await trio.to_thread.run_sync(health_main, address, out, err)
    return code, out.getvalue(), err.getvalue()


# --- pages ------------------------------------------------------------------------------------


async def test_healthz_answers_200_ok(admin):
    fetched = await fetch(admin, "/healthz")

    assert (fetched.status, fetched.body) == (200, b"ok\n")


async def test_readyz_answers_200_ready_when_there_is_no_problem(admin):
    fetched = await fetch(admin, "/readyz")

    assert (fetched.status, fetched.body) == (200, b"ready\n")


async def test_readyz_answers_503_with_one_reason_per_line(admin):
    admin.sidecar.problems = [EXPIRED, UNBOUND]

    fetched = await fetch(admin, "/readyz")

    assert fetched.status == 503
    assert fetched.body.decode().splitlines() == [EXPIRED, UNBOUND]


async def test_metrics_report_exactly_the_recorded_connections(admin):
    metrics = admin.sidecar.metrics
    metrics.connections.labels("api", "inbound", "allowed").inc(3)
    metrics.connections.labels("api", "inbound", "denied").inc(2)
    metrics.denials.labels("api", "inbound", "identity_not_allowed").inc(2)
    metrics.connections.labels("orders", "outbound", "error").inc()
    metrics.denials.labels("orders", "outbound", "upstream_unreachable").inc()
    metrics.active.labels("api", "inbound").inc()

    fetched = await fetch(admin, "/metrics")

    families = {family.name: family for family in text_string_to_metric_families(fetched.body.decode())}
    assert _samples(families["sidecar_connections"], "sidecar_connections_total", "result") == {
        ("api", "inbound", "allowed"): 3,
        ("api", "inbound", "denied"): 2,
        ("orders", "outbound", "error"): 1,
    }
    assert _samples(families["sidecar_denials"], "sidecar_denials_total", "reason") == {
        ("api", "inbound", "identity_not_allowed"): 2,
        ("orders", "outbound", "upstream_unreachable"): 1,
    }
    assert _samples(families["sidecar_active_connections"], "sidecar_active_connections") == {("api", "inbound"): 1}


def _samples(family, sample_name: str, *extra_labels: str) -> dict[tuple[str, ...], float]:
    keys = ("listener", "direction", *extra_labels)
    return {
        tuple(sample.labels[key] for key in keys): sample.value
        for sample in family.samples
        if sample.name == sample_name
    }


async def test_metrics_use_the_prometheus_text_content_type(admin):
    fetched = await fetch(admin, "/metrics")

    assert fetched.headers["content-type"] == CONTENT_TYPE_LATEST


async def test_unknown_path_answers_404(admin):
    fetched = await fetch(admin, "/admin")

    assert fetched.status == 404


async def test_other_methods_answer_405_naming_the_allowed_ones(admin):
    fetched = await fetch(admin, "/readyz", method="POST")

    assert fetched.status == 405
    assert fetched.headers["allow"] == "GET, HEAD"


async def test_head_answers_the_headers_of_get_without_a_body(admin):
    fetched = await fetch(admin, "/healthz", method="HEAD")

    assert (fetched.status, fetched.headers["content-length"], fetched.body) == (200, "3", b"")


async def test_failing_page_answers_500_and_is_logged(nursery):
    class BrokenSidecar(FakeSidecar):
        def readiness_problems(self, now_timestamp: float) -> list[str]:
            raise RuntimeError("credentials vanished")

    admin = await start_admin(nursery, BrokenSidecar())

    fetched = await fetch(admin, "/readyz")

    assert fetched.status == 500
    [event] = admin.sidecar.logged_events()
    assert (event["event"], event["path"]) == ("admin_error", "/readyz")
    assert "credentials vanished" in event["detail"]


# --- connections ------------------------------------------------------------------------------


async def test_two_requests_share_one_keep_alive_connection(admin):
    def two_requests_on_one_connection() -> tuple[list[int], bool]:
        connection = http.client.HTTPConnection(admin.host, admin.port, timeout=5)
        try:
            connection.request("GET", "/healthz")
            first = connection.getresponse()
            first.read()
            first_socket = connection.sock
            connection.request("GET", "/readyz")
            second = connection.getresponse()
            second.read()
            return [first.status, second.status], connection.sock is first_socket
        finally:
            connection.close()

    statuses, same_socket = await trio.to_thread.run_sync(two_requests_on_one_connection)

    assert statuses == [200, 200]
    assert same_socket


async def test_malformed_request_gets_400_and_the_connection_is_closed(admin):
    answer = await exchange_raw(admin, b"NONSENSE\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"\r\nconnection: close\r\n" in answer.lower()


async def test_server_keeps_serving_after_a_malformed_request(admin):
    await exchange_raw(admin, b"NONSENSE\r\n\r\n")

    fetched = await fetch(admin, "/healthz")

    assert fetched.status == 200


async def test_oversized_request_head_gets_431(admin):
    answer = await exchange_raw(admin, b"GET /healthz HTTP/1.1\r\nX-Filler: " + b"a" * MAX_HEAD_BYTES)

    assert answer.startswith(b"HTTP/1.1 431 ")


async def test_oversized_request_body_gets_413(admin):
    body = b"a" * (MAX_BODY_BYTES + 1)
    head = f"POST /healthz HTTP/1.1\r\nHost: admin\r\nContent-Length: {len(body)}\r\n\r\n".encode()

    answer = await exchange_raw(admin, head + body)

    assert answer.startswith(b"HTTP/1.1 413 ")


async def test_slow_client_is_disconnected_at_the_exchange_deadline(admin, autojump_clock):
    async with await trio.open_tcp_stream(admin.host, admin.port) as stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\n")
        started = trio.current_time()

        with trio.fail_after(2 * EXCHANGE_DEADLINE):
            answer = await read_until_closed(stream)

    assert answer == b""
    assert trio.current_time() - started == pytest.approx(EXCHANGE_DEADLINE)


async def test_a_new_connection_takes_the_place_of_the_oldest_when_all_are_taken(nursery):
    admin = await start_admin(nursery, max_connections=2)
    request = b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n"
    oldest = await trio.open_tcp_stream(admin.host, admin.port)
    younger = await trio.open_tcp_stream(admin.host, admin.port)
    async with oldest, younger:
        for stream in (oldest, younger):
            await stream.send_all(request)
            assert (await stream.receive_some()).startswith(b"HTTP/1.1 200 ")
        async with await trio.open_tcp_stream(admin.host, admin.port) as newcomer:
            await newcomer.send_all(request)
            with trio.fail_after(EXCHANGE_DEADLINE / 2):
                assert (await newcomer.receive_some()).startswith(b"HTTP/1.1 200 ")
                assert await read_until_closed(oldest) == b""  # it yielded its place
        await younger.send_all(request)
        assert (await younger.receive_some()).startswith(b"HTTP/1.1 200 ")


async def test_cancelling_serve_admin_closes_its_listening_socket():
    sock = listen_socket(parse_endpoint("127.0.0.1:0"))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_admin, sock, FakeSidecar())
        nursery.cancel_scope.cancel()

    assert sock.fileno() == -1


# --- proxy health -----------------------------------------------------------------------------


async def test_health_exits_0_when_ready(admin):
    code, out, _ = await run_health(admin.address)

    assert code == 0
    assert out.startswith("ready")


async def test_health_exits_1_and_prints_the_reasons_when_not_ready(admin):
    admin.sidecar.problems = [EXPIRED, UNBOUND]

    code, out, _ = await run_health(admin.address)

    assert code == 1
    assert out.splitlines() == [f"not ready: {EXPIRED}", f"not ready: {UNBOUND}"]


async def test_health_exits_1_with_one_line_naming_the_address_when_nothing_listens():
    with socket.socket() as bound_not_listening:
        bound_not_listening.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % bound_not_listening.getsockname()[1]

        code, _, err = await run_health(address)

    assert code == 1
    assert len(err.splitlines()) == 1
    assert address in err


async def test_health_exits_2_when_the_address_is_not_host_port():
    code, _, err = await run_health("15000")

    assert code == 2
    assert "'15000'" in err
