"""await_first_record: an accepted connection waits, without an OpenSSL object, until the client's
first TLS record has arrived whole (or there is nothing worth waiting for), on a real socket pair."""

from __future__ import annotations

import socket

import trio

from proxy.handshake import await_first_record


def _record(body_length: int, content_type: int = 22) -> bytes:
    return bytes([content_type, 3, 1]) + body_length.to_bytes(2, "big") + b"\x01" * body_length


def _pair() -> tuple[socket.socket, socket.socket]:
    """An accepted TCP connection on loopback (SO_RCVLOWAT is TCP's) and its client end."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ours.setblocking(False)
    return ours, client


async def _returns_after(sock: socket.socket, send, *chunks: bytes) -> list[int]:
    """Send ``chunks`` one at a time, each once the waiter had a chance to run; return after which
    chunks (their positions) ``await_first_record`` had not yet returned."""
    done = trio.Event()
    pending = []

    async def wait() -> None:
        await await_first_record(sock)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        for position, chunk in enumerate(chunks):
            await trio.testing.wait_all_tasks_blocked()
            if done.is_set():
                break
            pending.append(position)
            send(chunk)
        with trio.fail_after(5):
            await done.wait()
    return pending


async def test_a_whole_record_in_one_segment_is_waited_for_once_and_left_unread():
    ours, client = _pair()
    with ours, client:
        record = _record(1500)
        assert await _returns_after(ours, client.sendall, record) == [0]
        assert ours.recv(len(record) + 1, socket.MSG_PEEK) == record  # nothing consumed: OpenSSL reads it
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1


async def test_a_trickled_record_is_waited_for_until_its_last_byte():
    ours, client = _pair()
    with ours, client:
        record = _record(1500)
        chunks = (record[:3], record[3:700], record[700:-1], record[-1:])
        assert await _returns_after(ours, client.sendall, *chunks) == [0, 1, 2, 3]
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1


async def test_what_is_not_a_handshake_record_or_ends_early_is_left_to_openssl():
    for sent, then_close in ((b"GET / HTTP/1.1\r\n", False), (_record(20)[:12], True), (b"\x16\x03", True)):
        ours, client = _pair()
        with ours, client:
            def send(chunk: bytes, client=client, then_close=then_close) -> None:
                client.sendall(chunk)
                if then_close:
                    client.shutdown(socket.SHUT_WR)

            assert await _returns_after(ours, send, sent) == [0]
            assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
