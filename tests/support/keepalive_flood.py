"""A flood of keep-alive HTTP/1.1 clients, run as its own process so it does not share the test's GIL:

    python keepalive_flood.py PORT COUNT PATH

COUNT connections to 127.0.0.1:PORT each send ``GET PATH`` again as soon as the previous answer is in,
reconnecting when the server closes them. Prints ``flooding`` once every connection has had an answer,
and on SIGTERM ``answers=N reconnects=M`` and exits 0.
"""

from __future__ import annotations

import signal
import sys

import trio


async def _client(port: int, request: bytes, counts: dict, first_answer: trio.Event) -> None:
    while True:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            counts["connect_errors"] += 1
            await trio.sleep(0.01)  # a load generator backing off before it reconnects, not a wait for a condition
            continue
        async with stream:
            try:
                while True:
                    await stream.send_all(request)
                    received = b""
                    while b"\r\n\r\n" not in received:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            raise trio.BrokenResourceError
                        received += chunk
                    counts["answers"] += 1
                    first_answer.set()
            except trio.BrokenResourceError:
                counts["reconnects"] += 1


async def main(port: int, count: int, path: str) -> None:
    request = f"GET {path} HTTP/1.1\r\nhost: flood\r\n\r\n".encode()
    counts = {"answers": 0, "reconnects": 0, "connect_errors": 0}
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            answered = []
            for _ in range(count):
                event = trio.Event()
                answered.append(event)
                nursery.start_soon(_client, port, request, counts, event)
            for event in answered:
                await event.wait()
            print("flooding", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    print(" ".join(f"{name}={value}" for name, value in counts.items()), flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
