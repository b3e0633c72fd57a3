"""``mtls.httpserve`` in process: a connection's request budget and total lifetime, and ``Admission``'s
oldest-idle-yields policy. The client side writes raw HTTP/1.1 over a trio memory stream."""

from __future__ import annotations

import trio
import trio.testing

from mtls.httpserve import Admission, Limits, Reply, serve_requests


def _limits(**overrides) -> Limits:
    values = dict(max_head_bytes=8192, max_body_bytes=8192, exchange_deadline=5.0, connection_lifetime=10.0,
                  max_requests=100)
    values.update(overrides)
    return Limits(**values)


async def _ok(request) -> Reply:
    return Reply(200, b"ok\n")


REQUEST = b"GET /healthz HTTP/1.1\r\nhost: admin\r\n\r\n"


async def _serve_then_close(stream, limits: Limits) -> None:
    """serve_requests, then what its caller does: close the stream."""
    await serve_requests(stream, _ok, limits)
    await stream.aclose()


async def test_the_last_request_of_the_budget_is_answered_with_connection_close(nursery):
    server, client = trio.testing.memory_stream_pair()
    nursery.start_soon(_serve_then_close, server, _limits(max_requests=2))
    await client.send_all(REQUEST * 3)
    replies = b""
    with trio.fail_after(1):
        while chunk := await client.receive_some(65536):
            replies += chunk
    assert replies.count(b"HTTP/1.1 200") == 2  # the third request is never answered
    assert replies.count(b"connection: close") == 1 and replies.index(b"connection: close") > replies.rindex(b"200")


async def test_keep_alive_does_not_extend_a_connections_life(autojump_clock):
    """Requests every 3 s, each within the 5 s exchange deadline: the connection still ends at its 10 s life."""
    server, client = trio.testing.memory_stream_pair()
    ended_at = []

    async def serve() -> None:
        await serve_requests(server, _ok, _limits(exchange_deadline=5.0, connection_lifetime=10.0))
        ended_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(serve)
        answered = 0
        while not ended_at:
            await client.send_all(REQUEST)
            with trio.move_on_after(1):
                if b"HTTP/1.1 200" in await client.receive_some(65536):
                    answered += 1
            await trio.sleep(3)  # the mock clock jumps: the client's pause between keep-alive requests
    assert ended_at[0] - start == 10.0  # idle at the end of its life, so closed right then
    assert answered == 4  # at 0, 3, 6 and 9 s; the one sent at 12 s finds the connection closed


def test_the_oldest_idle_connection_yields_when_the_budget_is_full():
    admission = Admission(capacity=3, per_source=2)
    first, second = admission.admit("10.0.0.1"), admission.admit("10.0.0.1")
    third = admission.admit("10.0.0.1")  # over the per-source budget: the oldest of 10.0.0.1 yields
    assert first.evicted and first.cancel_scope.cancel_called and not second.evicted
    other = admission.admit("10.0.0.2")
    assert len(admission) == 3 and not second.evicted
    admission.admit("10.0.0.3")  # over the total: the oldest of all (second) yields
    assert second.evicted and not third.evicted and not other.evicted


def test_a_busy_connection_does_not_yield_and_a_newcomer_is_refused_when_all_are_busy():
    admission = Admission(capacity=2, per_source=2)
    busy, idle = admission.admit("a"), admission.admit("b")
    busy.busy = True
    newcomer = admission.admit("c")
    assert idle.evicted and not busy.evicted and newcomer is not None
    newcomer.busy = True
    assert admission.admit("d") is None
    busy.release()
    assert admission.admit("d") is not None
