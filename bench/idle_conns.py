"""What an unauthenticated connection costs the sidecar: RSS per connection, measured.

A benchmark, not a test. It starts one `proxy run` with an inbound listener (and a CA of its own,
in a temporary directory), then opens N TCP connections to that listener from this process and
holds them, in one of two shapes:

- ``idle``: connect and send nothing (what a port scanner or a slow-loris client does);
- ``partial``: connect and send the first half of a real TLS 1.3 ClientHello, then nothing.

It reads the sidecar's VmRSS before and once every connection is accepted and the RSS has settled,
and prints the difference per connection. The handshake deadline is set far above the run's length
so no connection times out while it is measured. ``--limits`` is the config's ``limits`` section
(by default one that admits every connection, so the figure is the cost of each held connection;
pass the shipped defaults, ``{}``, to see what the budgets hold the sidecar to instead).

    .venv/bin/python bench/idle_conns.py --connections 10000 --shape idle
    .venv/bin/python bench/idle_conns.py --connections 10000 --shape partial
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
TD = "example.org"


def raise_open_files(want: int) -> None:
    """Raise the soft RLIMIT_NOFILE to ``want`` (the sidecar inherits it), the hard limit too if allowed.

    This process and the sidecar each hold one end of every connection, so each needs ``want``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        if hard < want:
            sys.exit(f"need {want} open files per process, the hard limit is {hard}: lower --connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def client_hello() -> bytes:
    """The bytes a stdlib TLS 1.3 client sends first."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="api")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def make_identity(work: Path) -> Path:
    env = dict(os.environ, CA_DIR=str(work / "ca"))
    run = dict(env=env, check=True, capture_output=True, cwd=work)
    subprocess.run([PY, "-m", "ca", "init", "--trust-domain", TD], **run)
    subprocess.run([PY, "-m", "ca", "issue", f"spiffe://{TD}/ns/bench/sa/api", "--out", str(work / "api")], **run)
    return work / "api"


def start_sidecar(work: Path, ident: Path, limits: str) -> tuple[subprocess.Popen, int, Path]:
    config = work / "sidecar.yaml"
    config.write_text(
        f"identity:\n  cert: {ident}/cert.pem\n  key: {ident}/key.pem\n  bundle: {ident}/bundle.pem\n"
        "inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:9\n"
        f"    allow: [spiffe://{TD}/ns/bench/sa/client]\n"
        "timeouts: {handshake: 1h}\n"
        f"limits: {limits}\n"
        "log: {level: error, format: json}\n"
    )
    log_path = work / "sidecar.log"
    proc = subprocess.Popen([PY, "-m", "proxy", "run", "-c", str(config)], stderr=open(log_path, "w"),
                            stdout=subprocess.DEVNULL, cwd=work)
    # The port is in the "listening" line, which log level error hides: read it from /proc instead.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"proxy run exited {proc.returncode}: {log_path.read_text()}")
        port = _listening_port(proc.pid)
        if port:
            return proc, port, log_path
        time.sleep(0.05)
    sys.exit("proxy run did not listen within 30s")


def _listening_port(pid: int) -> int | None:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = row.split()
        if cols[3] == "0A" and cols[9] in inodes:
            return int(cols[1].rsplit(":", 1)[1], 16)
    return None


def settled_rss(pid: int, settle: float = 1.0, timeout: float = 60.0) -> int:
    """VmRSS once it has not grown for ``settle`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = rss_kib(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = rss_kib(pid)
        if now > last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            return now
    return last


def open_connections(port: int, count: int, payload: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        if payload:
            sock.sendall(payload)
        socks.append(sock)
    return socks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--shape", choices=("idle", "partial"), default="idle")
    parser.add_argument("--limits", default="{max_connections: 100000, handshakes: {per_listener: 100000, "
                                            "per_source: 100000, waiting: 100000}}",
                        help="the config's limits section (YAML flow mapping)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    raise_open_files(args.connections + 1024)
    payload = b""
    if args.shape == "partial":
        hello = client_hello()
        payload = hello[: len(hello) // 2]
    with tempfile.TemporaryDirectory(prefix="idle-conns-") as tmp:
        work = Path(tmp)
        ident = make_identity(work)
        proc, port, log_path = start_sidecar(work, ident, args.limits)
        socks: list[socket.socket] = []
        try:
            before = settled_rss(proc.pid)
            base_fds = fd_count(proc.pid)
            started = time.monotonic()
            socks = open_connections(port, args.connections, payload)
            opened_s = time.monotonic() - started
            deadline = time.monotonic() + 120
            while fd_count(proc.pid) < base_fds + args.connections and time.monotonic() < deadline:
                if proc.poll() is not None:
                    sys.exit(f"proxy run exited {proc.returncode}: {log_path.read_text()[-2000:]}")
                time.sleep(0.1)
            held = fd_count(proc.pid) - base_fds
            during = settled_rss(proc.pid)
        finally:
            for sock in socks:
                sock.close()
            proc.terminate()
            proc.wait(30)
    result = {
        "shape": args.shape, "connections": args.connections, "held_by_sidecar": held, "open_s": round(opened_s, 2),
        "rss_before_kib": before, "rss_during_kib": during,
        "kib_per_connection": round((during - before) / args.connections, 2),
        "kib_per_held_connection": round((during - before) / held, 2) if held > 0 else None,
        "limits": args.limits,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.connections} {args.shape} connections ({len(payload)} bytes each) "
              f"opened in {result['open_s']}s, {held} held by the sidecar; RSS {before / 1024:.1f} MiB before, "
              f"{during / 1024:.1f} MiB during: {result['kib_per_connection']} KiB per connection opened"
              + (f", {result['kib_per_held_connection']} KiB per connection held" if held > 0 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
