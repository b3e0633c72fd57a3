"""How long a reload stops the data plane: SIGHUP to the first /healthz answer, with connections held.

A benchmark, not a test. It starts one `proxy run` (a CA of its own, in a temporary directory) with
an inbound listener whose ``allow`` has ``--entries`` rules (``--kind exact``: one SPIFFE ID each;
``prefix``: one ``.../*`` each) besides the two client IDs, and an echo backend in this process.
It opens ``--connections`` mTLS connections through it and holds them (a tenth of them from a
client the next config no longer allows), then rewrites the config without that client and sends
SIGHUP, while two probes run:

- ``/healthz`` on the admin endpoint, one request after another on fresh connections;
- one held connection, sending a line and waiting for its echo, over and over.

Figures per round (each round a fresh sidecar; the summary shows medians):

- ``stall_ms``: SIGHUP to the answer of the first /healthz request sent after SIGHUP (that request
  may win the race with the signal; ``healthz_max_ms`` is the figure that cannot);
- ``healthz_max_ms`` / ``echo_max_ms``: the longest /healthz answer and echo round trip from SIGHUP
  until the reload's work is over (the forbidden connections are closed);
- ``reloaded_ms``: SIGHUP to the ``reloaded`` log line;
- ``revoked_ms``: SIGHUP until every forbidden connection was closed by the sidecar.

    .venv/bin/python bench/reload_stall.py --connections 1000 --entries 10000 --kind prefix
    .venv/bin/python bench/reload_stall.py --connections 1000 --entries 10000 --kind exact --rounds 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import selectors
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PY = sys.executable
TD = "example.org"
KEPT = f"spiffe://{TD}/ns/bench/sa/client"
DOOMED = f"spiffe://{TD}/ns/bench/sa/doomed"  # allowed before the reload, not after
FORBIDDEN_SHARE = 10  # one connection in this many comes from DOOMED


def raise_open_files(want: int) -> None:
    """Raise the soft RLIMIT_NOFILE to ``want`` (the sidecar inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        if hard < want:
            sys.exit(f"need {want} open files, the hard limit is {hard}: lower --connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class EchoBackend:
    """A TCP echo server on one thread (selectors), so that a thousand connections cost no threads."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.sock, selectors.EVENT_READ)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            for key, _ in self.selector.select(0.2):
                if key.fileobj is self.sock:
                    try:
                        conn, _ = self.sock.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    self.selector.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                    if data:
                        conn.sendall(data)  # small lines: the send buffer takes them
                        continue
                except OSError:
                    pass
                self.selector.unregister(conn)
                conn.close()

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()


def run_ca(work: Path, *args: str) -> None:
    env = dict(os.environ, CA_DIR=str(work / "ca"))
    subprocess.run([PY, "-m", "ca", *args], env=env, check=True, capture_output=True, cwd=work)


def make_identities(work: Path) -> dict[str, Path]:
    run_ca(work, "init", "--trust-domain", TD)
    out = {}
    for name, spiffe_id in (("api", f"spiffe://{TD}/ns/bench/sa/api"), ("client", KEPT), ("doomed", DOOMED)):
        run_ca(work, "issue", spiffe_id, "--out", str(work / name))
        out[name] = work / name
    return out


def rules(entries: int, kind: str) -> list[str]:
    if kind == "exact":
        return [f"spiffe://{TD}/ns/gen-{i % 100}/sa/svc-{i}" for i in range(entries)]
    return [f"spiffe://{TD}/ns/gen-{i % 100}/sa/svc-{i}/*" for i in range(entries)]


def config_text(ident: Path, backend: int, allow: list[str]) -> str:
    lines = "".join(f"      - {rule}\n" for rule in allow)
    return (
        f"identity:\n  cert: {ident}/cert.pem\n  key: {ident}/key.pem\n  bundle: {ident}/bundle.pem\n"
        f"inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{backend}\n    allow:\n{lines}"
        "admin: {listen: 127.0.0.1:0}\n"
        "timeouts: {idle: 1h}\n"
        "limits: {max_connections: 100000, handshakes: {per_listener: 100000, per_source: 100000}}\n"
        "log: {level: info, format: json}\n"
    )


def events(log_path: Path) -> list[dict]:
    out = []
    for line in log_path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.02)
    sys.exit(f"timed out after {timeout:g}s waiting for {what}")


def client_context(ident: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(ident / "cert.pem", ident / "key.pem")
    return ctx


def open_held(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """One mTLS connection through the sidecar, shown to reach the backend by one echoed line."""
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30))
    sock.sendall(b"hello\n")
    read_echo(sock, 6, "closed before the echo")
    return sock


def read_echo(sock: ssl.SSLSocket, size: int, closed: str) -> None:
    """Read the ``size`` bytes the backend echoes; ConnectionError(``closed``) if the connection ends first."""
    got = 0
    while got < size:
        chunk = sock.recv(64)
        if not chunk:
            raise ConnectionError(closed)
        got += len(chunk)


def healthz(port: int) -> float:
    """Seconds one GET /healthz takes, on a fresh connection."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"/healthz answered {response.status}")
    finally:
        conn.close()
    return time.monotonic() - started


class Probe(threading.Thread):
    """Repeats ``step`` (which returns its own duration) until stopped; keeps (start, duration) pairs."""

    def __init__(self, step) -> None:
        super().__init__(daemon=True)
        self.step = step
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.samples.append((started, self.step()))
            except Exception as exc:  # noqa: BLE001 - reported in the results, not raised in a thread
                self.error = f"{type(exc).__name__}: {exc}"
                return


def echo_step(sock: ssl.SSLSocket):
    def step() -> float:
        started = time.monotonic()
        sock.sendall(b"ping\n")
        read_echo(sock, 5, "the probe connection was closed")
        return time.monotonic() - started

    return step


def one_round(args, work: Path, idents: dict[str, Path]) -> dict:
    backend = EchoBackend()
    config = work / "sidecar.yaml"
    generated = rules(args.entries, args.kind)
    config.write_text(config_text(idents["api"], backend.port, [KEPT, DOOMED, *generated]))
    log_path = work / "sidecar.log"
    proc = subprocess.Popen([PY, "-m", "proxy", "run", "-c", str(config)], stderr=open(log_path, "w"),
                            stdout=subprocess.DEVNULL, cwd=work)
    held: list[ssl.SSLSocket] = []
    try:
        wait_for(lambda: proc.poll() is not None or any(e["event"] == "ready" for e in events(log_path)), 60,
                 "the sidecar to be ready")
        if proc.poll() is not None:
            sys.exit(f"proxy run exited {proc.returncode}: {log_path.read_text()[-2000:]}")
        ports = {e["listener"]: int(e["address"].rsplit(":", 1)[1])
                 for e in events(log_path) if e["event"] == "listening"}
        kept_ctx, doomed_ctx = client_context(idents["client"]), client_context(idents["doomed"])
        started = time.monotonic()
        doomed = []
        for index in range(args.connections):
            forbidden = index % FORBIDDEN_SHARE == FORBIDDEN_SHARE - 1
            sock = open_held(ports["api"], doomed_ctx if forbidden else kept_ctx)
            (doomed if forbidden else held).append(sock)
        opened_s = time.monotonic() - started
        held.extend(doomed)
        for sock in doomed:
            sock.setblocking(False)

        health = Probe(lambda: healthz(ports["admin"]))
        echo = Probe(echo_step(held[0]))
        health.start()
        echo.start()
        time.sleep(0.5)  # both probes in their stride before the reload
        config.write_text(config_text(idents["api"], backend.port, [KEPT, *generated]))
        sighup = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        open_doomed = set(doomed)
        while open_doomed and time.monotonic() - sighup < 120:
            for sock in list(open_doomed):
                try:
                    if sock.recv(64) == b"":
                        open_doomed.discard(sock)
                except (ssl.SSLWantReadError, BlockingIOError):
                    pass
                except OSError:
                    open_doomed.discard(sock)
            time.sleep(0.005)
        revoked_s = time.monotonic() - sighup
        reloaded = wait_for(lambda: [e for e in events(log_path) if e["event"] in ("reloaded", "reload_failed")],
                            120, "the reload to finish")
        if reloaded[0]["event"] != "reloaded":
            sys.exit(f"the reload failed: {reloaded[0]}")
        time.sleep(0.2)  # a few probes after the work is over
        health.stop.set()
        echo.stop.set()
        health.join(60)
        echo.join(60)
        log = events(log_path)
        reloaded_at = [e for e in log if e["event"] == "reloaded"][0]["ts"]
        revoked = sum(1 for e in log if e.get("reason") == "policy_revoked")
    finally:
        for sock in held:
            sock.close()
        proc.terminate()
        proc.wait(30)
        backend.close()

    def after_sighup(probe: Probe) -> list[tuple[float, float]]:
        return [(start, took) for start, took in probe.samples if start + took >= sighup and start <= sighup + revoked_s]

    first = next(((start, took) for start, took in health.samples if start >= sighup), None)
    window_health, window_echo = after_sighup(health), after_sighup(echo)
    return {
        "connections": args.connections, "entries": args.entries, "kind": args.kind, "open_s": round(opened_s, 2),
        "stall_ms": round((first[0] + first[1] - sighup) * 1000, 1) if first else None,
        "healthz_max_ms": round(max(took for _, took in window_health) * 1000, 1) if window_health else None,
        "healthz_answers": len(window_health),
        "echo_max_ms": round(max(took for _, took in window_echo) * 1000, 1) if window_echo else None,
        "echo_round_trips": len(window_echo),
        "reloaded_ts": reloaded_at,
        "revoked_ms": round(revoked_s * 1000, 1),
        "policy_revoked": revoked,
        "expected_revoked": len(doomed),
        "probe_errors": [error for error in (health.error, echo.error) if error],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--entries", type=int, default=10000, help="generated allow rules besides the clients'")
    parser.add_argument("--kind", choices=("exact", "prefix"), default="prefix")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object per round, then the medians")
    args = parser.parse_args(argv)
    raise_open_files(3 * args.connections + 1024)
    results = []
    with tempfile.TemporaryDirectory(prefix="reload-stall-") as tmp:
        work = Path(tmp)
        idents = make_identities(work)
        for _ in range(args.rounds):
            result = one_round(args, work, idents)
            results.append(result)
            print(json.dumps(result) if args.json else
                  f"{args.connections} connections, {args.entries} {args.kind} rules: SIGHUP to first /healthz "
                  f"{result['stall_ms']} ms; longest /healthz {result['healthz_max_ms']} ms "
                  f"({result['healthz_answers']} answers), longest echo {result['echo_max_ms']} ms "
                  f"({result['echo_round_trips']} round trips); forbidden connections closed after "
                  f"{result['revoked_ms']} ms ({result['policy_revoked']}/{result['expected_revoked']} policy_revoked)"
                  + (f"; probe errors: {result['probe_errors']}" if result["probe_errors"] else ""), flush=True)
    if args.rounds > 1:
        medians = {key: statistics.median(r[key] for r in results if r[key] is not None)
                   for key in ("stall_ms", "healthz_max_ms", "echo_max_ms", "revoked_ms")}
        print(json.dumps({"median": medians}) if args.json else f"medians of {args.rounds}: {medians}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
