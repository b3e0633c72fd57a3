"""Small load tools for the benchmark (standard library only), one per subcommand:

  sink --port P --stats-port S      discard server: reads every connection to EOF and counts the
                                    bytes; each connection to S gets one JSON line of totals
  send --port P --stats-port S --conns N --bytes B --seconds T
                                    pushes B bytes in total over N connections (or stops after
                                    T seconds), closes them, waits until the sink has every byte;
                                    prints one JSON line with the MB/s measured at the sink
  hold --port P --conns N           opens N keep-alive HTTP connections (one GET each) and keeps
                                    them idle; prints one JSON line, holds until stdin closes
  probe --port P --seconds T        for T seconds, one new connection after the other: connect,
                                    send PROBE, wait for the sink's answer, close; prints one JSON
                                    line with the latency percentiles (ms)
  http --port P                     HTTP/1.1 responder (200, 22-byte body), for machines without nginx

Every loop is bounded: in bytes and seconds (send), in seconds (hold, probe), by the caller (sink, http).
All addresses are 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import threading
import time

HOST = "127.0.0.1"
SEND_CHUNK = 256 * 1024
RECV_BUFFER = 1 << 20
SINK_WAIT_SECONDS = 30.0
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
BODY = b"pong-0123456789abcdef\n"
REPLY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
REPLY_CLOSE = REPLY.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
PROBE = b"PROBE\n"  # a connection that starts with this gets PROBE_ANSWER from the sink, and is not counted
PROBE_ANSWER = b"ok\n"


# --- sink -------------------------------------------------------------------------------------

def sink(port: int, stats_port: int) -> None:
    """Count bytes, the time of the last one (CLOCK_MONOTONIC, shared by all processes), EOFs, resets.
    A probe connection (its first bytes are PROBE) is answered and left out of the totals."""
    totals = {"bytes": 0, "last_byte_at": 0.0, "eofs": 0, "resets": 0}
    lock = threading.Lock()

    def drain(conn: socket.socket) -> None:
        buf = bytearray(RECV_BUFFER)
        ended = "eofs"
        first = True
        with conn:
            while True:
                try:
                    n = conn.recv_into(buf)
                    if first and buf[:n] == PROBE:
                        conn.sendall(PROBE_ANSWER)
                        return
                except OSError:
                    ended = "resets"
                    break
                first = False
                if not n:
                    break
                with lock:
                    totals["bytes"] += n
                    totals["last_byte_at"] = time.monotonic()
        with lock:
            totals[ended] += 1

    def answer_stats() -> None:
        server = socket.create_server((HOST, stats_port))
        while True:
            conn, _ = server.accept()
            with conn, lock:
                conn.sendall(json.dumps(totals).encode() + b"\n")

    threading.Thread(target=answer_stats, daemon=True).start()
    server = socket.create_server((HOST, port), backlog=1024)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


def sink_totals(stats_port: int) -> dict:
    with socket.create_connection((HOST, stats_port), timeout=5) as conn:
        return json.loads(conn.makefile().readline())


# --- send -------------------------------------------------------------------------------------

def send(port: int, stats_port: int, conns: int, total: int, seconds: float) -> int:
    before = sink_totals(stats_port)
    payload = memoryview(os.urandom(SEND_CHUNK))
    sent = [0] * conns
    errors: list[str] = []
    quota = total // conns
    started = time.monotonic()
    deadline = started + seconds

    def push(i: int) -> None:
        try:
            with socket.create_connection((HOST, port), timeout=30) as conn:
                while sent[i] < quota and time.monotonic() < deadline:
                    sent[i] += conn.send(payload[: min(SEND_CHUNK, quota - sent[i])])
        except OSError as exc:
            errors.append(f"connection {i}: {exc}")

    threads = [threading.Thread(target=push, args=(i,)) for i in range(conns)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    want = sum(sent)
    wait_until = time.monotonic() + SINK_WAIT_SECONDS
    while True:
        now = sink_totals(stats_port)
        ended = now["eofs"] + now["resets"] - before["eofs"] - before["resets"]
        done = now["bytes"] - before["bytes"] >= want and ended >= conns
        if done or time.monotonic() > wait_until:
            break
        time.sleep(0.01)
    received = now["bytes"] - before["bytes"]
    elapsed = now["last_byte_at"] - started if received else 0.0
    result = {
        "conns": conns, "bytes_sent": want, "bytes_received": received,
        "seconds": round(elapsed, 4), "MBps": round(received / elapsed / 1e6, 1) if elapsed > 0 else 0.0,
        "time_capped": want < quota * conns, "sink_eofs": now["eofs"] - before["eofs"],
        "sink_resets": now["resets"] - before["resets"], "errors": errors[:3],
    }
    result["complete"] = received == want and not errors and not result["time_capped"] and result["sink_resets"] == 0
    print(json.dumps(result), flush=True)
    return 0 if result["complete"] else 1


# --- probe ------------------------------------------------------------------------------------

def probe(port: int, seconds: float) -> int:
    """New connections one after the other for ``seconds``; the latency of each, connect to answer."""
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            with socket.create_connection((HOST, port), timeout=30) as conn:
                conn.sendall(PROBE)
                with conn.makefile("rb") as replies:
                    answer = replies.read(len(PROBE_ANSWER))  # the whole answer, or less at EOF
        except OSError as exc:
            errors.append(str(exc))
            continue
        if answer != PROBE_ANSWER:
            errors.append(f"answer {answer!r}")
            continue
        latencies.append((time.monotonic() - started) * 1000)
    latencies.sort()

    def percentile(fraction: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(fraction * len(latencies)))], 2) if latencies else None

    print(json.dumps({"probes": len(latencies), "p50_ms": percentile(0.5), "p90_ms": percentile(0.9),
                      "p99_ms": percentile(0.99), "max_ms": percentile(1.0), "errors": errors[:3],
                      "failed": len(errors)}), flush=True)
    return 0 if latencies and not errors else 1


# --- hold -------------------------------------------------------------------------------------

async def _open_one(port: int, gate: asyncio.Semaphore, held: list) -> None:
    async with gate:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
        try:
            writer.write(REQUEST)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if not head.startswith(b"HTTP/1.1 200"):
                raise ValueError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await asyncio.wait_for(reader.readexactly(length), 10)
        except BaseException:
            writer.close()
            raise
        held.append(writer)


async def hold(port: int, conns: int, open_timeout: float, hold_seconds: float) -> None:
    """Open ``conns`` connections (50 at a time), report, keep them until stdin closes or time is up."""
    gate, held = asyncio.Semaphore(50), []
    started = time.monotonic()
    tasks = [asyncio.create_task(_open_one(port, gate, held)) for _ in range(conns)]
    done, pending = await asyncio.wait(tasks, timeout=open_timeout)
    for task in pending:
        task.cancel()
    failures = [repr(t.exception()) for t in done if t.exception()]
    print(json.dumps({"ok": len(done) - len(failures), "failed": len(failures) + len(pending),
                      "open_seconds": round(time.monotonic() - started, 2), "errors": failures[:3]}), flush=True)
    stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    try:
        await asyncio.wait_for(stdin_closed, hold_seconds)
    except asyncio.TimeoutError:
        pass
    for writer in held:
        writer.close()


# --- http -------------------------------------------------------------------------------------

class Responder(asyncio.Protocol):
    """Answers every request head with REPLY; closes after a ``Connection: close`` request."""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        self.pending += data
        while (end := self.pending.find(b"\r\n\r\n")) >= 0:
            head, self.pending = self.pending[:end], self.pending[end + 4:]
            if b"connection: close" in head.lower():
                self.transport.write(REPLY_CLOSE)
                self.transport.close()
                return
            self.transport.write(REPLY)


async def http(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Responder, HOST, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["sink", "send", "probe", "hold", "http"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stats-port", type=int)
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--bytes", type=int, default=1 << 30)
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="send: time cap; probe: how long; hold: longest hold")
    parser.add_argument("--open-timeout", type=float, default=60.0)
    args = parser.parse_args()
    if args.mode == "sink":
        sink(args.port, args.stats_port)
    elif args.mode == "send":
        return send(args.port, args.stats_port, args.conns, args.bytes, args.seconds)
    elif args.mode == "probe":
        return probe(args.port, args.seconds)
    elif args.mode == "hold":
        asyncio.run(hold(args.port, args.conns, args.open_timeout, args.seconds))
        os._exit(0)  # the executor thread blocked on stdin must not keep the process alive
    else:
        asyncio.run(http(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
