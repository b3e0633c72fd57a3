"""The egress section of `make bench` (``--only egress``): what the egress path costs against `outbound:`.

Two network namespaces of our own (nothing runs or is redirected in the host's), joined by a bridge
in a third, as the egress tests build them (``tests/support/network.bridged_namespaces``):

    app     10.79.0.2   client-side sidecar (uid 0): outbound `explicit` on 127.0.0.1:15002 -> 10.79.0.3:8443,
                        egress on 127.0.0.1:15001 allowing 10.79.0.3:8443 with the server's ID expected;
                        `proxy redirect --apply --uid 0` in this namespace; the load client as uid 65534
    server  10.79.0.3   server-side sidecar: inbound 0.0.0.0:8443 -> echo on 127.0.0.1:8080

The same client, in the same namespace under the same uid, reaches the same server-side sidecar two
ways: ``explicit`` dials 127.0.0.1:15002 (loopback is never redirected), ``egress`` dials
10.79.0.3:8443 and the kernel sends it to the egress listener, which matches the ``expect`` rule and
originates mTLS. Each connection: connect, 64 bytes out, their echo back, close; each a full mTLS
handshake between the sidecars. Figures per path, at c=1 and c=16: new connections/s (ended within the
window), latency per connection (p50, p99), and utime+stime of each sidecar per 1000 connections
(/proc/PID/stat). Each figure of a round takes 1-second slices of the two paths in turn (ABBA...), so
that whatever else the machine does weighs on both alike; figures are medians of rounds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from procs import Child
from systems import CLIENT_ID, SERVER_ID, make_identities, tool

ROOT = Path(__file__).resolve().parent.parent
ADDRESSES = {"app": "10.79.0.2", "server": "10.79.0.3"}
SERVER_PORT, BACKEND_PORT = 8443, 8080
ADMIN_PORT, EGRESS_PORT, EXPLICIT_PORT = 15000, 15001, 15002
APP_UID = 65534  # the load client's uid: not the sidecar's (0), so its connections are redirected
PAYLOAD_BYTES = 64
PATHS = ("explicit", "egress")
# Each figure of a round: ``slices`` runs of ``slice_s`` seconds per path, the paths alternating (ABBA...),
# so that what else the machine does weighs on both alike.
FULL = {"slice_s": 1.0, "slices": 5, "concurrency": (1, 16)}
QUICK = {"slice_s": 1.0, "slices": 3, "concurrency": (1, 16)}
WARMUP_SECONDS = 1.0
# Namespace-local: the client and the client-side sidecar both open thousands of connections to
# 10.79.0.3:8443 a second and close them first, which would exhaust the ephemeral ports in TIME_WAIT.
SYSCTLS = {"net.ipv4.tcp_tw_reuse": "1", "net.ipv4.ip_local_port_range": "1024 65000"}

# The load client (standard library only, run as uid 65534): ``conns`` threads until ``seconds`` have
# passed, each a loop of connect, send, read the echo, close. One JSON line: every connection's latency,
# how many ended within ``seconds``, errors by kind.
CLIENT = r"""
import json, os, socket, sys, threading, time
host, port, conns, seconds, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
payload = b"e" * size
lock = threading.Lock()
latencies, errors, in_window = [], {}, [0]

def loop(deadline):
    mine, ended = [], 0
    while time.monotonic() < deadline:
        began = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(payload)
                got = 0
                while got < size:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("closed before the whole echo came back")
                    got += len(data)
            now = time.monotonic()
            mine.append(round((now - began) * 1e6))
            ended += now <= deadline
        except OSError as exc:
            with lock:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            time.sleep(0.05)
    with lock:
        latencies.extend(mine)
        in_window[0] += ended

start = time.monotonic()
threads = [threading.Thread(target=loop, args=(start + seconds,)) for _ in range(conns)]
for t in threads:
    t.start()
for t in threads:
    t.join()
cpu = os.times()
print(json.dumps({"latencies_us": latencies, "in_window": in_window[0], "errors": errors,
                  "load_cpu_s": cpu.user + cpu.system}), flush=True)
"""

# The backend behind the server-side sidecar: echo every connection until EOF.
ECHO = r"""
import asyncio, sys

async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(echo, sys.argv[1], int(sys.argv[2]), backlog=1024)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""

# The table: (figure id, label, concurrency, decimals); each row shows both paths, their difference and ratio
ROWS = [
    ("rate_per_s", "new connections/s", 1, 0),
    ("rate_per_s", "new connections/s", 16, 0),
    ("p50_us", "latency per connection p50, us", 1, 0),
    ("p99_us", "latency per connection p99, us", 1, 0),
    ("p50_us", "latency per connection p50, us", 16, 0),
    ("p99_us", "latency per connection p99, us", 16, 0),
    ("client_cpu_s_per_1000", "client-side sidecar CPU s per 1000 connections", 1, 3),
    ("client_cpu_s_per_1000", "client-side sidecar CPU s per 1000 connections", 16, 3),
    ("server_cpu_s_per_1000", "server-side sidecar CPU s per 1000 connections (the same work both ways)", 16, 3),
]


COUNTERS = ("sidecar_connections_total{", "sidecar_denials_total{", "sidecar_egress_denied_total{")


def unavailable() -> str | None:
    """Why the section cannot run here, or None."""
    if os.geteuid() != 0:
        return "egress: skipped: network namespaces and the redirect rules need root"
    missing = [name for name in ("ip", "nft", "setpriv") if tool(name) is None]
    if missing:
        return f"egress: skipped: {', '.join(missing)} not installed (apt packages iproute2, nftables, util-linux)"
    probe = subprocess.run([tool("ip"), "netns", "list"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"egress: skipped: `ip netns` does not work here: {probe.stderr.strip()}"
    return None


class Namespaces:
    """The app and server namespaces with their processes; ``close`` stops the processes, then deletes
    the namespaces (the redirect rules live in the app namespace and go with it)."""

    def __init__(self, workdir: Path, confdir: Path, logdir: Path):
        self.workdir, self.confdir, self.logdir = workdir, confdir, logdir
        self.ns = {name: f"mtlsbench-{name}-{os.getpid()}" for name in ("hub", "app", "server")}
        self.created: list[str] = []
        self.children: list[Child] = []
        self.app_python = ""  # an interpreter uid 65534 may run (``build`` finds it)

    def exec_in(self, name: str) -> list[str]:
        return [tool("ip"), "netns", "exec", self.ns[name]]

    def build(self) -> None:
        sys.path.insert(0, str(ROOT / "tests"))  # support.network: the tests' namespace builder
        from support.network import bridged_namespaces

        bridged_namespaces(self.ns, {host: (f"{address}/24",) for host, address in ADDRESSES.items()}, self.created)
        for host in ADDRESSES:
            for key, value in SYSCTLS.items():
                _run([*self.exec_in(host), "sh", "-c", f"echo '{value}' > /proc/sys/{key.replace('.', '/')}"])
        self.app_python = self.python_for_app()
        ids = make_identities(self.workdir)
        self.start("echo", "server", [self.app_python, "-c", ECHO, "127.0.0.1", str(BACKEND_PORT)], BACKEND_PORT)
        self.server = self.sidecar("server", ids["server"], (
            "inbound:\n"
            f"  - {{name: bench, listen: 0.0.0.0:{SERVER_PORT}, forward: 127.0.0.1:{BACKEND_PORT}, "
            f"allow: [{CLIENT_ID}]}}\n"
        ), SERVER_PORT)
        target = f"{ADDRESSES['server']}:{SERVER_PORT}"
        self.client = self.sidecar("app", ids["client"], (
            "outbound:\n"
            f"  - {{name: explicit, listen: 127.0.0.1:{EXPLICIT_PORT}, connect: {target}, expect: [{SERVER_ID}]}}\n"
            f"egress:\n  listen: 127.0.0.1:{EGRESS_PORT}\n  mode: enforce\n"
            f"  allow:\n    - {{to: {target}, expect: [{SERVER_ID}]}}\n"
        ), EGRESS_PORT, EXPLICIT_PORT)
        redirect = [*self.exec_in("app"), sys.executable, "-m", "proxy", "redirect", "--uid", "0",
                    "-c", str(self.confdir / "egress-client.yaml")]
        (self.confdir / "egress-redirect.sh").write_text(_run([*redirect, "--print"]))
        _run([*redirect, "--apply"])

    def as_app(self) -> list[str]:
        """The prefix of the load client's command: the app namespace, uid and gid ``APP_UID``."""
        return [*self.exec_in("app"), tool("setpriv"), f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups"]

    def python_for_app(self) -> str:
        """This interpreter's base binary, or the system's python3 when uid ``APP_UID`` may not run it (one
        under /root, say); the load client needs the standard library only."""
        candidates = [os.path.realpath(sys.executable), *filter(None, [shutil.which("python3", path="/usr/bin:/bin")])]
        for python in candidates:
            if subprocess.run([*self.as_app(), python, "-c", ""], capture_output=True, timeout=30).returncode == 0:
                return python
        raise RuntimeError(f"uid {APP_UID} may run none of {', '.join(candidates)}: no interpreter for the load client")

    def start(self, name: str, host: str, argv: list[str], *ports: int) -> Child:
        """``argv`` in namespace ``host``, its output in logs/egress-NAME.log; ready once it listens on ``ports``."""
        child = Child(f"egress {name}", [*self.exec_in(host), *argv], self.logdir / f"egress-{name}.log")
        self.children.append(child)
        for port in ports:
            _wait_listening(child, port)
        return child

    def sidecar(self, host: str, ident, listeners: str, *ports: int) -> Child:
        """`proxy run` in ``host`` with ``listeners``; its config in configs/egress-{client,server}.yaml."""
        role = "client" if host == "app" else "server"
        path = self.confdir / f"egress-{role}.yaml"
        path.write_text(
            f"identity: {{cert: {ident.cert}, key: {ident.key}, bundle: {ident.bundle}}}\n{listeners}"
            + (f"admin: {{listen: 127.0.0.1:{ADMIN_PORT}}}\n" if host == "app" else "")
            + "timeouts: {drain: 5s}\nlimits: {max_connections: 1000}\nlog: {level: warning, format: json}\n"
        )
        return self.start(f"{role}-sidecar", host, [sys.executable, "-m", "proxy", "run", "-c", str(path)], *ports)

    def load(self, path: str, conns: int, seconds: float) -> dict:
        """One run of the load client along ``path``: its JSON line plus each sidecar's CPU seconds meanwhile."""
        host, port = ("127.0.0.1", EXPLICIT_PORT) if path == "explicit" else (ADDRESSES["server"], SERVER_PORT)
        before = {"client": self.client.cpu_seconds(), "server": self.server.cpu_seconds()}
        argv = [*self.as_app(), self.app_python, "-c", CLIENT, host, str(port), str(conns), str(seconds),
                str(PAYLOAD_BYTES)]
        child = Child("egress load client", argv, self.logdir / "egress-load.log", stdout=subprocess.PIPE)
        try:
            out, _ = child.proc.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the load client ran {seconds + 60:g}s, {seconds:g}s more than asked") from None
        finally:
            child.stop()
        if child.proc.returncode != 0 or not out.strip():
            raise RuntimeError(f"the load client exited with {child.proc.returncode}: {child.log_tail()}")
        result = json.loads(out.decode().splitlines()[-1])
        result["client_cpu_s"] = self.client.cpu_seconds() - before["client"]
        result["server_cpu_s"] = self.server.cpu_seconds() - before["server"]
        return result

    def counters(self) -> dict[str, float]:
        """The client-side sidecar's connection and denial counters, read in its namespace."""
        from support.network import in_netns

        def fetch() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{ADMIN_PORT}/metrics", timeout=5).read().decode()

        found = {}
        for line in in_netns(self.ns["app"], fetch).splitlines():
            if line.startswith(COUNTERS):
                name, value = line.rsplit(" ", 1)
                found[name] = float(value)
        return found

    def close(self) -> None:
        for child in self.children:
            child.stop()
        for ns in reversed(self.created):
            subprocess.run([tool("ip"), "netns", "del", ns], capture_output=True, timeout=30)


def run(results: dict, rounds: int, quick: bool, workdir: Path, confdir: Path, logdir: Path,
        say: Callable[[str], None]) -> None:
    """Build the namespaces, measure both paths ``rounds`` times, tear everything down. Fills ``results`` as
    it goes (``runs``; then ``summary`` and ``notes``, also when interrupted)."""
    amounts = QUICK if quick else FULL
    nets = Namespaces(workdir, confdir, logdir)
    results.update(runs=[], notes=[], amounts=amounts | {"rounds": rounds, "payload_bytes": PAYLOAD_BYTES})
    try:
        say("egress: namespaces, sidecars, `proxy redirect --apply` in the app namespace")
        nets.build()
        for path in PATHS:
            nets.load(path, 4, WARMUP_SECONDS)
        for number in range(1, rounds + 1):
            for conns in amounts["concurrency"]:
                slices: dict[str, list[dict]] = {path: [] for path in PATHS}
                for index in range(amounts["slices"]):
                    for path in PATHS if (number + index) % 2 else PATHS[::-1]:
                        slices[path].append(nets.load(path, conns, amounts["slice_s"]))
                for path in PATHS:
                    result = combine(slices[path], amounts["slice_s"])
                    results["runs"].append({"round": number, "path": path, "conns": conns} | result)
                    say(f"  egress round {number}/{rounds}, {path}, c={conns}: {result['rate_per_s']:.0f}/s, "
                        f"p50 {result['p50_us']} us, client CPU {_num(result['client_cpu_s_per_1000'], 3)} s/1000"
                        + (f", errors {result['errors']}" if result["errors"] else ""))
        results["counters"] = nets.counters()
        results["log_lines"] = {role: _log_lines(logdir / f"egress-{role}-sidecar.log")
                                for role in ("client", "server")}
    except (RuntimeError, OSError) as exc:
        results["notes"].append(f"egress: failed: {exc}")
        say(f"  egress FAILED: {exc}")
    finally:
        nets.close()
        results["summary"] = summary(results["runs"])
        results["notes"] += problems(results)


def combine(slices: list[dict], slice_s: float) -> dict:
    """One path's figures from its slices of a round: rate within the windows, latency percentiles over every
    connection, each sidecar's CPU per 1000 connections."""
    latencies = sorted(us for one in slices for us in one["latencies_us"])
    done = len(latencies)
    errors: dict[str, int] = {}
    for one in slices:
        for kind, count in one["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    result = {"slices": len(slices), "done": done, "errors": errors,
              "rate_per_s": sum(one["in_window"] for one in slices) / (slice_s * len(slices))}
    for name, q in (("p50_us", 0.5), ("p90_us", 0.9), ("p99_us", 0.99)):
        result[name] = latencies[min(done - 1, int(q * done))] if done else None
    for role in ("client", "server", "load"):  # the two sidecars, and the load client itself
        cpu = sum(one[f"{role}_cpu_s"] for one in slices)
        result[f"{role}_cpu_s"] = round(cpu, 3)
        result[f"{role}_cpu_s_per_1000"] = cpu / done * 1000 if done else None
    return result


def summary(runs: list[dict]) -> dict[str, dict[str, float]]:
    """"figure@c=N" -> path -> median over rounds."""
    values: dict[str, dict[str, list[float]]] = {}
    for run_ in runs:
        for figure in ("rate_per_s", "p50_us", "p90_us", "p99_us", "client_cpu_s_per_1000", "server_cpu_s_per_1000"):
            if run_.get(figure) is not None:
                values.setdefault(f"{figure}@c={run_['conns']}", {}).setdefault(run_["path"], []).append(run_[figure])
    return {key: {path: statistics.median(v) for path, v in by_path.items()} for key, by_path in values.items()}


def problems(results: dict) -> list[str]:
    """What went wrong or looks wrong: client errors, log lines, counters that do not add up."""
    notes = []
    for run_ in results["runs"]:
        if run_["errors"]:
            notes.append(f"egress round {run_['round']}, {run_['path']}, c={run_['conns']}: "
                         f"client errors {run_['errors']}")
    for role, lines in results.get("log_lines", {}).items():
        if lines:
            notes.append(f"egress: the {role}-side sidecar wrote {len(lines)} log line(s) at warning or above; "
                         f"first: {lines[0][:300]}")
    counters = results.get("counters", {})
    allowed = {path: sum(v for k, v in counters.items() if k.startswith("sidecar_connections_total{")
                         and f'listener="{path}"' in k and 'result="allowed"' in k) for path in PATHS}
    done = {path: sum(r["done"] for r in results["runs"] if r["path"] == path) for path in PATHS}
    for path in PATHS:
        if counters and allowed[path] < done[path]:
            notes.append(f"egress: the client-side sidecar counted {allowed[path]:.0f} allowed connections on "
                         f"listener {path}, fewer than the {done[path]} the load client completed there")
    return notes


def table(results: dict) -> str:
    summ = results.get("summary", {})
    lines = ["| figure | c | explicit `outbound:` | egress (redirected) | egress - explicit | egress / explicit |",
             "|---|---:|---:|---:|---:|---:|"]
    for figure, label, conns, decimals in ROWS:
        got = summ.get(f"{figure}@c={conns}", {})
        explicit, egress = got.get("explicit"), got.get("egress")
        both = None not in (explicit, egress)
        diff = _num(egress - explicit, decimals, signed=True) if both else "-"
        ratio = f"{egress / explicit:.2f}" if both and explicit else "-"
        shown = " | ".join([_num(explicit, decimals), _num(egress, decimals), diff, ratio])
        lines.append(f"| {label} | {conns} | {shown} |")
    return "\n".join(lines)


def _num(value, decimals: int, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:{'+' if signed else ''},.{decimals}f}"


def _log_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return []


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:8])}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _listens(pid: int, port: int) -> bool:
    """True when a socket of ``pid``'s network namespace listens on ``port`` (its /proc/PID/net/tcp)."""
    try:
        rows = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(re.fullmatch(rf"[0-9A-F]+:{port:04X}", row.split()[1]) and row.split()[3] == "0A" for row in rows)


def _wait_listening(child: Child, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _listens(child.pid, port):
            return
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}: {child.log_tail()}")
        time.sleep(0.02)
    raise RuntimeError(f"{child.name} did not listen on port {port} within {timeout:g}s: {child.log_tail()}")
