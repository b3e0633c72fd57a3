"""What runs during the benchmark: identities, the proxy pairs, the backends.

A pair is a client-side instance (plaintext in on 127.0.0.1, mTLS out) and a server-side
instance (mTLS in, plaintext out to a backend), of our sidecar or of a peer (stunnel, haproxy),
all with the same certificates from our own CA. ``direct`` is no pair at all: the load goes
straight to the backend, to show what the load generator and the backend can do without TLS.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from procs import Child, free_port, wait_listening

from mtls.tlsio import TLS13_CIPHERSUITES

TRUST_DOMAIN = "example.org"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/web"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/backend"
BENCH_DIR = Path(__file__).resolve().parent
LOADGEN = BENCH_DIR / "loadgen.py"
# Every pair offers and prefers the TLS 1.3 suites in our sidecar's order, so no column wins by its cipher.
SUITES = TLS13_CIPHERSUITES.decode()


@dataclass(frozen=True)
class Identity:
    cert: Path  # leaf, then intermediate
    key: Path
    bundle: Path  # trust roots
    combined: Path  # cert chain and key in one file, as haproxy wants it


def make_identities(workdir: Path) -> dict[str, Identity]:
    """A fresh CA (our ``ca``) and the two workload identities: 'client' (web) and 'server' (backend)."""
    env = dict(os.environ, CA_DIR=str(workdir / "ca"))

    def ca(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "ca", *args], env=env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"ca {' '.join(args)} failed: {done.stderr.strip()}")

    ca("init", "--trust-domain", TRUST_DOMAIN)
    identities = {}
    for side, spiffe_id in (("client", CLIENT_ID), ("server", SERVER_ID)):
        out = workdir / side
        ca("issue", spiffe_id, "--out", str(out))
        combined = out / "combined.pem"
        combined.write_bytes((out / "cert.pem").read_bytes() + (out / "key.pem").read_bytes())
        combined.chmod(0o600)
        identities[side] = Identity(out / "cert.pem", out / "key.pem", out / "bundle.pem", combined)
    return identities


def tool(name: str) -> str | None:
    """Path of an installed program; the sbin directories count even when not on PATH."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError:
        return "?"
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"


# --- the systems under test ---------------------------------------------------------------------

@dataclass
class Side:
    """How to start one instance: its argv, and for our sidecar the admin port to ask for /metrics."""

    argv: list[str]
    admin_port: int | None = None


class Ours:
    name = "ours"

    def available(self) -> bool:
        return True

    def version(self) -> str:
        proxy = _first_line([sys.executable, "-m", "proxy", "--version"])
        tls = _first_line([sys.executable, "-c",
                           "from OpenSSL import SSL; print(SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode())"])
        return f"mtls-sidecar {proxy.split()[-1]}, {tls}, Python {sys.version.split()[0]}"

    extra = ""  # more config lines (see OursResumed)

    def _config(self, path: Path, ident: Identity, listeners: str) -> Side:
        admin_port = free_port()
        path.write_text(
            f"identity: {{cert: {ident.cert}, key: {ident.key}, bundle: {ident.bundle}}}\n"
            f"{listeners}"
            f"admin: {{listen: 127.0.0.1:{admin_port}}}\n"
            "timeouts: {drain: 5s}\n"
            "limits: {max_connections: 5000}\n"
            "log: {level: warning, format: json}\n"
            f"{self.extra}"
        )
        return Side([sys.executable, "-m", "proxy", "run", "-c", str(path)], admin_port)

    def client(self, ident: Identity, listen: int, connect: int, workdir: Path) -> Side:
        return self._config(workdir / f"{self.name}-client.yaml", ident, (
            "outbound:\n"
            f"  - {{name: bench, listen: 127.0.0.1:{listen}, connect: 127.0.0.1:{connect}, expect: [{SERVER_ID}]}}\n"
        ))

    def server(self, ident: Identity, listen: int, forward: int, workdir: Path) -> Side:
        return self._config(workdir / f"{self.name}-server.yaml", ident, (
            "inbound:\n"
            f"  - {{name: bench, listen: 127.0.0.1:{listen}, forward: 127.0.0.1:{forward}, allow: [{CLIENT_ID}]}}\n"
        ))


class OursResumed(Ours):
    """Our pair with TLS 1.3 session resumption between the two sidecars (policy still checked on
    every connection). Not a peer: the "best peer" ratio never compares against it."""

    name = "ours-resumed"
    extra = "tls: {session_resumption: true}\n"


class Stunnel:
    """stunnel, TLS 1.3 only, peer certificate required both ways; the client side does not resume
    sessions, so every new connection is a full handshake."""

    name = "stunnel"

    def _binary(self) -> str | None:
        return tool("stunnel4") or tool("stunnel")

    def available(self) -> bool:
        return self._binary() is not None

    def version(self) -> str:
        done = subprocess.run([self._binary(), "-version"], capture_output=True, text=True, timeout=30)
        version = re.search(r"stunnel ([\d.]+)", done.stdout + done.stderr)
        openssl = re.search(r"Running\s+with OpenSSL ([\d.]+)", done.stdout + done.stderr)
        return f"stunnel {version.group(1) if version else '?'}, OpenSSL {openssl.group(1) if openssl else '?'}"

    def _config(self, path: Path, ident: Identity, role_lines: str) -> Side:
        path.write_text(
            "foreground = yes\npid =\ndebug = warning\n[bench]\n"
            f"sslVersionMin = TLSv1.3\nciphersuites = {SUITES}\nverifyChain = yes\nrequireCert = yes\n"
            f"CAfile = {ident.bundle}\ncert = {ident.cert}\nkey = {ident.key}\n{role_lines}"
        )
        return Side([self._binary(), str(path)])

    def client(self, ident: Identity, listen: int, connect: int, workdir: Path) -> Side:
        return self._config(workdir / "stunnel-client.conf", ident, (
            f"client = yes\nsessionResume = no\naccept = 127.0.0.1:{listen}\nconnect = 127.0.0.1:{connect}\n"
        ))

    def server(self, ident: Identity, listen: int, forward: int, workdir: Path) -> Side:
        return self._config(workdir / "stunnel-server.conf", ident,
                            f"accept = 127.0.0.1:{listen}\nconnect = 127.0.0.1:{forward}\n")


class Haproxy:
    """haproxy in TCP mode, TLS 1.3 only, certificates verified both ways; the client side does not
    reuse sessions (no-ssl-reuse), so every new connection is a full handshake. Threads: its default."""

    name = "haproxy"
    COMMON = ("global\n    maxconn {maxconn}\n"
              "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 300s\n    timeout server 300s\n")

    def available(self) -> bool:
        return tool("haproxy") is not None

    def version(self) -> str:
        done = subprocess.run([tool("haproxy"), "-vv"], capture_output=True, text=True, timeout=30)
        version = re.search(r"version ([\d.]+)", done.stdout)
        openssl = re.search(r"Running on OpenSSL version : OpenSSL ([\d.]+)", done.stdout)
        return f"haproxy {version.group(1) if version else '?'}, OpenSSL {openssl.group(1) if openssl else '?'}"

    def _config(self, path: Path, text: str) -> Side:
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # haproxy refuses a maxconn it has no fds for
        path.write_text(self.COMMON.format(maxconn=min(10000, (open_files - 100) // 2)) + text)
        return Side([tool("haproxy"), "-db", "-f", str(path)])

    def client(self, ident: Identity, listen: int, connect: int, workdir: Path) -> Side:
        return self._config(workdir / "haproxy-client.cfg", (
            f"frontend plain_in\n    bind 127.0.0.1:{listen}\n    default_backend mtls_out\n"
            f"backend mtls_out\n    server upstream 127.0.0.1:{connect} ssl crt {ident.combined} "
            f"ca-file {ident.bundle} verify required ssl-min-ver TLSv1.3 ciphersuites {SUITES} no-ssl-reuse\n"
        ))

    def server(self, ident: Identity, listen: int, forward: int, workdir: Path) -> Side:
        return self._config(workdir / "haproxy-server.cfg", (
            f"frontend mtls_in\n    bind 127.0.0.1:{listen} ssl crt {ident.combined} ca-file {ident.bundle} "
            f"verify required ssl-min-ver TLSv1.3 ciphersuites {SUITES}\n    default_backend plain_out\n"
            f"backend plain_out\n    server app 127.0.0.1:{forward}\n"
        ))


class Direct:
    """No proxy: the load goes straight to the backend (a ceiling, not a competitor)."""

    name = "direct"

    def available(self) -> bool:
        return True

    def version(self) -> str:
        return "no proxy, no TLS"


SYSTEMS = {cls.name: cls for cls in (Ours, OursResumed, Stunnel, Haproxy, Direct)}


class Pair:
    """A started client side and server side of ``system`` in front of ``backend_port``.

    ``entry`` is where the load generator connects. For ``direct`` it is the backend itself.
    """

    def __init__(self, system, identities: dict[str, Identity], backend_port: int, workdir: Path, logdir: Path, tag: str):
        self.system = system
        self.sides: dict[str, tuple[Child, Side]] = {}
        if isinstance(system, Direct):
            self.entry = backend_port
            return
        server_port, client_port = free_port(), free_port()
        self.server_port = server_port
        try:
            server = system.server(identities["server"], server_port, backend_port, workdir)
            self._start("server", server, server_port, logdir, tag)
            client = system.client(identities["client"], client_port, server_port, workdir)
            self._start("client", client, client_port, logdir, tag)
        except BaseException:
            self.stop()
            raise
        self.entry = client_port

    def _start(self, role: str, side: Side, port: int, logdir: Path, tag: str) -> None:
        child = Child(f"{self.system.name} {role}", side.argv, logdir / f"{self.system.name}-{tag}-{role}.log")
        self.sides[role] = (child, side)
        wait_listening(port, child)

    def children(self) -> dict[str, Child]:
        return {role: child for role, (child, _) in self.sides.items()}

    def metrics(self) -> dict[str, dict[str, float]]:
        """Our sidecar's counters, per side, from its admin /metrics (empty for the peers)."""
        found = {}
        for role, (_, side) in self.sides.items():
            if side.admin_port:
                admin = http.client.HTTPConnection("127.0.0.1", side.admin_port, timeout=5)  # no proxy from env
                try:
                    admin.request("GET", "/metrics")
                    found[role] = _interesting_metrics(admin.getresponse().read().decode())
                except (OSError, http.client.HTTPException) as exc:
                    found[role] = {"scrape_error": str(exc)}
                finally:
                    admin.close()
        return found

    def metrics_when_idle(self, patience: float = 3.0) -> dict[str, dict[str, float]]:
        """``metrics()`` once no connection is counted open any more, or after ``patience`` seconds."""
        deadline = time.monotonic() + patience
        while True:
            found = self.metrics()
            if time.monotonic() > deadline or not any(m.get("sidecar_active_connections") for m in found.values()):
                return found
            time.sleep(0.1)

    def stop(self) -> dict[str, dict]:
        """Stop both sides; per side: was it still running, exit code, SIGKILL needed, log summary."""
        report = {}
        for role, (child, _) in self.sides.items():
            report[role] = child.stop() | {"log": summarize_log(child.log_path)}
        return report


def _interesting_metrics(text: str) -> dict[str, float]:
    """Connection results, denial reasons and open connections, summed over listeners."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"(sidecar_(?:connections_total|denials_total|active_connections))\{(.*)\} (\S+)", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            key = match.group(1) + "".join(f"/{labels[k]}" for k in ("result", "reason") if k in labels)
            found[key] = found.get(key, 0) + float(match.group(3))
    return found


def summarize_log(path: Path) -> dict[str, int]:
    """Count log lines: for JSON lines by level/event/reason, otherwise as 'other' (first words kept)."""
    counts: dict[str, int] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return counts
    for line in lines:
        try:
            record = json.loads(line)
            key = "/".join(str(record.get(k)) for k in ("level", "event", "reason") if record.get(k))
        except ValueError:
            key = "text: " + re.sub(r"\d+", "N", line.strip())[:100]
        if key.strip():
            counts[key] = counts.get(key, 0) + 1
    return counts


# --- backends -----------------------------------------------------------------------------------

class Sink:
    """The discard server of the bulk figure (``loadgen.py sink``)."""

    def __init__(self, logdir: Path):
        self.port, self.stats_port = free_port(), free_port()
        self.child = Child("sink", [sys.executable, str(LOADGEN), "sink", "--port", str(self.port),
                                    "--stats-port", str(self.stats_port)], logdir / "sink.log")
        wait_listening(self.port, self.child)
        wait_listening(self.stats_port, self.child)


class HttpBackend:
    """nginx answering ``return 200`` (2 workers) when installed, else ``loadgen.py http`` (one Python thread)."""

    def __init__(self, workdir: Path, logdir: Path):
        self.port = free_port()
        nginx = tool("nginx")
        if nginx:
            self.kind = _first_line([nginx, "-v"]).replace("nginx version: ", "")
            conf = _nginx_config(workdir / "nginx", self.port)
            argv = [nginx, "-p", str(conf.parent), "-c", str(conf), "-e", str(conf.parent / "error.log")]
        else:
            self.kind = "python fallback (loadgen.py http, one thread)"
            argv = [sys.executable, str(LOADGEN), "http", "--port", str(self.port)]
        self.child = Child("http backend", argv, logdir / "http-backend.log")
        wait_listening(self.port, self.child)

    @property
    def is_python(self) -> bool:
        return not self.kind.startswith("nginx")


def _nginx_config(directory: Path, port: int) -> Path:
    (directory / "tmp").mkdir(parents=True, exist_ok=True)
    temp_paths = "".join(f"    {kind}_temp_path {directory}/tmp/{kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = directory / "nginx.conf"
    conf.write_text(
        f"daemon off;\nworker_processes 2;\nworker_rlimit_nofile 20000;\npid {directory}/nginx.pid;\n"
        f"error_log {directory}/error.log warn;\n"
        "events { worker_connections 10000; }\n"
        "http {\n    access_log off;\n    keepalive_timeout 300s;\n    keepalive_requests 100000000;\n"
        f"{temp_paths}"
        f"    server {{\n        listen 127.0.0.1:{port} backlog=4096;\n"
        '        location / { default_type text/plain; return 200 "pong-0123456789abcdef\\n"; }\n    }\n}\n'
    )
    return conf
