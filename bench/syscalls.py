"""System calls per request per side: `strace -c -f` on each side of a pair over a fixed number of
keep-alive request/replies.

    .venv/bin/python bench/syscalls.py                      # our pair, 2000 requests, 1 connection
    .venv/bin/python bench/syscalls.py --system haproxy --requests 5000 --conns 4

One client thread per connection sends ``GET /`` and reads the whole reply before the next
request (c=N, like wrk's keep-alive figure but counted). strace is attached to every thread of
each side only while the requests run; the table it prints at detach is divided by the number of
requests. strace slows the traced process down a lot: the counts are the figure, not the times.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from procs import Child, group_pids
from systems import SYSTEMS, HttpBackend, Pair, make_identities, tool

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def _one_reply(sock: socket.socket, buffer: bytearray) -> None:
    """Read one HTTP reply with a Content-Length body; what follows stays in ``buffer``."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", buffer[:end]).group(1))
            if len(buffer) >= end + 4 + length:
                del buffer[:end + 4 + length]
                return
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the pair closed the connection mid-reply")
        buffer += data


def _client(port: int, requests: int, errors: list[str]) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            buffer = bytearray()
            for _ in range(requests):
                sock.sendall(REQUEST)
                _one_reply(sock, buffer)
    except (OSError, AttributeError) as exc:
        errors.append(str(exc))


def _strace(pid: int, out: Path) -> subprocess.Popen:
    """Attach to every thread of ``pid``'s process group."""
    argv = [tool("strace"), "-c", "-f", "-o", str(out)]
    for member in group_pids(pid):
        argv += ["-p", str(member)]
    return subprocess.Popen(argv, stderr=subprocess.DEVNULL)


def _total_calls(table: str) -> dict[str, int]:
    """strace -c's table as {syscall: calls}, plus 'total'."""
    counts = {}
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit():
            name = fields[-1]
            calls = int(fields[3])
            counts[name] = calls
    return counts


def measure(system_name: str, requests: int, conns: int, workdir: Path) -> dict:
    logdir = workdir / "logs"
    logdir.mkdir()
    identities = make_identities(workdir)
    backend = HttpBackend(workdir, logdir)
    system = SYSTEMS[system_name]()
    pair = Pair(system, identities, backend.port, workdir, logdir, "syscalls")
    try:
        warm: list[str] = []
        _client(pair.entry, 200, warm)
        tracers = {}
        for role, child in pair.children().items():
            tracers[role] = (_strace(child.pid, workdir / f"{role}.strace"), workdir / f"{role}.strace")
        time.sleep(1.0)  # strace needs a moment to attach to every thread
        errors: list[str] = []
        threads = [threading.Thread(target=_client, args=(pair.entry, requests // conns, errors))
                   for _ in range(conns)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        elapsed = time.monotonic() - started
        result = {"system": system_name, "requests": requests // conns * conns, "conns": conns,
                  "errors": errors + warm, "seconds_under_strace": round(elapsed, 2), "per_request": {}}
        for role, (tracer, path) in tracers.items():
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
            calls = _total_calls(path.read_text())
            per = {name: round(n / result["requests"], 2) for name, n in sorted(calls.items(), key=lambda kv: -kv[1])
                   if n / result["requests"] >= 0.05}
            result["per_request"][role] = per
        return result
    finally:
        pair.stop()
        backend.child.stop()
        Child.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", default="ours", choices=sorted(SYSTEMS))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--conns", type=int, default=1)
    args = parser.parse_args()
    if not tool("strace"):
        print("syscalls: strace is not installed (apt-get install strace)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mtls-syscalls-") as directory:
        result = measure(args.system, args.requests, args.conns, Path(directory))
    print(json.dumps(result, indent=1))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
