"""`make bench`: a pair of our sidecars beside stunnel and haproxy pairs, on loopback, with a table.

    load generator -> [client side: plaintext in, mTLS out] -> [server side: mTLS in, plaintext out] -> backend

Figures: bulk MB/s (1 and 8 connections, into a discard sink), new connections/s with a full mTLS
handshake each (wrk, Connection: close), request/reply latency and rate on keep-alive connections
(wrk --latency), RSS per idle connection (1000 held through the pair), and the proxies' CPU time.
The scale section (scale.py, no pairs): reload stall, handshake CPU and CRL build time as the work grows.
The egress section (egress_cost.py, network namespaces, root): the egress path's cost against `outbound:`.
Each round starts every system afresh; figures are medians over rounds. Results (table, raw JSON,
configs, logs) go to bench/results/<timestamp>/. It is a benchmark, not a test: see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import egress_cost
import figures
import report
import scale
from procs import Child, raise_open_files
from suites import negotiated_suite
from systems import SUITES, SYSTEMS, HttpBackend, Pair, Sink, make_identities, tool

BENCH_DIR = Path(__file__).resolve().parent
PAIR_SECTIONS = ("bulk", "conn", "latency", "memory")
SECTIONS = (*PAIR_SECTIONS, "scale", "egress")
PEERS = ("stunnel", "haproxy", "direct", "ours-resumed")
APT_PACKAGES = {"wrk": ["wrk"], "stunnel4": ["stunnel4"], "haproxy": ["haproxy"], "nginx": ["nginx-light", "nginx"],
                "nft": ["nftables"]}
FULL = {"bulk_bytes": 1 << 30, "bulk_cap_s": 30, "conn_s": 10, "latency_s": 8, "idle_conns": 1000, "rounds": 3}
QUICK = {"bulk_bytes": 1 << 28, "bulk_cap_s": 15, "conn_s": 3, "latency_s": 3, "idle_conns": 1000, "rounds": 1}


def say(text: str) -> None:
    print(time.strftime("%H:%M:%S"), text, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller amounts (256 MiB bulk, 3 s wrk runs), 1 round")
    parser.add_argument("--rounds", type=int, help="rounds; figures are medians (default 3, --quick 1)")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="comma list of stunnel, haproxy, direct (no proxy: the load generator's and "
                             "backend's own ceiling), ours-resumed (our pair with TLS session resumption); "
                             "'none' for our pair alone (default: all)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--no-install", action="store_true", help="never run apt-get, use what is installed")
    parser.add_argument("--out", type=Path, help="results directory (default: bench/results/<timestamp>)")
    args = parser.parse_args(argv)
    args.peers = [] if args.peers == "none" else [p for p in args.peers.split(",") if p]
    args.only = [s for s in args.only.split(",") if s]
    for name in args.peers:
        if name not in PEERS:
            parser.error(f"--peers: unknown peer {name!r}; choose from {', '.join(PEERS)}")
    for name in args.only:
        if name not in SECTIONS:
            parser.error(f"--only: unknown figure {name!r}; choose from {', '.join(SECTIONS)}")
    return args


def install_missing(programs: list[str], allowed: bool, log_path: Path) -> list[str]:
    """apt-get install the packages of missing programs when we are root and may; return notes."""
    missing = [p for p in programs if not tool(p)]
    if not missing:
        return []
    if not allowed:
        return [f"not installing {', '.join(missing)} (--no-install)"]
    if os.geteuid() != 0 or not tool("apt-get"):
        return [f"cannot install {', '.join(missing)}: needs root and apt-get"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    notes = []
    with open(log_path, "ab") as log:
        say(f"installing {', '.join(missing)} with apt-get (log: {log_path})")
        subprocess.run(["apt-get", "update", "-q"], stdout=log, stderr=log, env=env, timeout=600)
        for program in missing:
            for package in APT_PACKAGES[program]:
                done = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", package],
                                      stdout=log, stderr=log, env=env, timeout=600)
                if done.returncode == 0 and tool(program):
                    notes.append(f"installed {package}")
                    break
            else:
                notes.append(f"could not install {program} (see {log_path})")
    return notes


def programs_needed(args) -> list[str]:
    needed = ["nft"] if "egress" in args.only else []
    if not set(PAIR_SECTIONS) & set(args.only):
        return needed
    if {"conn", "latency"} & set(args.only):
        needed += ["wrk", "nginx"]
    elif "memory" in args.only:
        needed.append("nginx")
    return needed + [{"stunnel": "stunnel4", "haproxy": "haproxy"}[p] for p in args.peers if p in ("stunnel", "haproxy")]


class Bench:
    """One run: the systems, the backends, and everything measured so far."""

    def __init__(self, args, out: Path, workdir: Path):
        self.args = args
        self.amounts = dict(QUICK if args.quick else FULL)
        if args.rounds:
            self.amounts["rounds"] = args.rounds
        self.out = out
        self.logdir = out / "logs"
        self.confdir = out / "configs"
        self.workdir = workdir
        self.notes: list[str] = []
        self.measurements: list[dict] = []
        self.pairs: list[dict] = []
        self.systems: list = []
        self.versions: dict[str, str] = {}
        self.suites: dict[str, str] = {}  # system -> the TLS 1.3 suite its pair negotiated
        self.source = "unknown"
        self.sections = list(args.only)
        self.scale: list[dict] = []  # rows of the scale section
        self.egress: dict = {}  # the egress section's runs, medians and notes

    @property
    def pair_sections(self) -> list[str]:
        return [s for s in self.sections if s in PAIR_SECTIONS]

    def prepare(self) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.confdir.mkdir(parents=True, exist_ok=True)
        self.notes += install_missing(programs_needed(self.args), not self.args.no_install, self.logdir / "apt.log")
        if not tool("wrk"):
            dropped = [s for s in ("conn", "latency") if s in self.sections]
            if dropped:
                self.notes.append(f"wrk is not installed: skipped {', '.join(dropped)}")
                self.sections = [s for s in self.sections if s not in dropped]
        self.source = _source_state()
        if "egress" in self.sections and (why := egress_cost.unavailable()):
            self.notes.append(why)
            self.sections.remove("egress")
        if not self.pair_sections:
            return
        for name in ["ours", *self.args.peers]:
            system = SYSTEMS[name]()
            if system.available():
                self.systems.append(system)
            else:
                self.notes.append(f"{name} is not installed: no {name} column")
        self.versions.update({s.name: s.version() for s in self.systems})
        say("systems: " + "; ".join(f"{k}: {v}" for k, v in self.versions.items()))
        self.identities = make_identities(self.workdir)
        self.sink = Sink(self.logdir) if "bulk" in self.sections else None
        self.http = HttpBackend(self.confdir, self.logdir) if set(self.pair_sections) - {"bulk"} else None
        if self.http:
            self.versions["http backend"] = self.http.kind
            if self.http.is_python:
                self.notes.append("nginx is not installed: the HTTP backend is one Python thread, which may be the "
                                  "bottleneck of the conn and latency figures (compare the direct column)")

    def run(self) -> None:
        if self.pair_sections:
            self.run_pairs()
        if "scale" in self.sections:
            for row in scale.rows(self.args.quick, say):
                self.scale.append(row)
                say(f"  {row['setting']}: {row['value']}")
        if "egress" in self.sections:
            egress_cost.run(self.egress, self.amounts["rounds"], self.args.quick, self.workdir / "egress",
                            self.confdir, self.logdir, say)

    def run_pairs(self) -> None:
        rounds = self.amounts["rounds"]
        for number in range(1, rounds + 1):
            shift = (number - 1) % len(self.systems)
            for system in self.systems[shift:] + self.systems[:shift]:
                say(f"round {number}/{rounds}: {system.name}")
                try:
                    self.run_system(system, number)
                except (RuntimeError, OSError) as exc:
                    self.notes.append(f"round {number}, {system.name}: failed: {exc}")
                    say(f"  FAILED: {exc}")

    def record(self, system, number: int, kind: str, result: dict) -> None:
        self.measurements.append({"round": number, "system": system.name, "kind": kind, "result": result})
        shown = {k: result.get(k) for k in ("MBps", "complete", "rate_per_s", "p50_us", "errors", "KiB_per_conn", "held")
                 if k in result}
        say(f"  {kind}: {json.dumps(shown)}")

    def run_system(self, system, number: int) -> None:
        amounts = self.amounts
        if self.sink:
            pair = Pair(system, self.identities, self.sink.port, self.confdir, self.logdir, f"r{number}-bulk")
            try:
                figures.bulk(pair, self.sink, 1, 32 << 20, amounts["bulk_cap_s"], self.logdir)  # warm-up
                for conns in (1, 8):
                    result = figures.bulk(pair, self.sink, conns, amounts["bulk_bytes"], amounts["bulk_cap_s"], self.logdir)
                    self.record(system, number, f"bulk_{conns}", result)
                result = figures.probe_under_bulk(pair, self.sink, 4, amounts["conn_s"], self.logdir)
                self.record(system, number, "probe_under_bulk", result)
            finally:
                self.finish_pair(pair, number, "bulk")
        if self.http:
            pair = Pair(system, self.identities, self.http.port, self.confdir, self.logdir, f"r{number}-http")
            try:
                if pair.sides and system.name not in self.suites:
                    self.suites[system.name] = negotiated_suite(
                        system, self.identities, pair.server_port, self.confdir, self.logdir)
                    say(f"  negotiated suite: {self.suites[system.name]}")
                self.run_http(pair, system, number)
            finally:
                self.finish_pair(pair, number, "http")

    def run_http(self, pair: Pair, system, number: int) -> None:
        """Memory first, while the processes are fresh; then keep-alive latency; then new connections."""
        amounts, backend = self.amounts, self.http.child
        if "memory" in self.sections and pair.sides:
            self.record(system, number, "memory", figures.memory(pair, amounts["idle_conns"], self.logdir))
        if {"conn", "latency"} & set(self.sections):
            figures.wrk(pair, backend, 4, 1, False, self.logdir)  # warm-up
        if "latency" in self.sections:
            for conns in (1, 32):
                result = figures.wrk(pair, backend, conns, amounts["latency_s"], False, self.logdir)
                self.record(system, number, f"latency_{conns}", result)
                time.sleep(1)  # let the last connections close
        if "conn" in self.sections:
            for conns in (16, 64):
                result = figures.wrk(pair, backend, conns, amounts["conn_s"], True, self.logdir)
                self.record(system, number, f"conn_{conns}", result)
                time.sleep(1)

    def finish_pair(self, pair: Pair, number: int, use: str) -> None:
        """Record how the pair's processes ended up: RSS, our counters, exit codes, log lines."""
        if not pair.sides:
            return
        state = {"round": number, "system": pair.system.name, "pair": use,
                 "rss_end_KiB": {role: c.rss_kib() for role, c in pair.children().items()},
                 "metrics": pair.metrics_when_idle()}
        state["stop"] = pair.stop()
        self.pairs.append(state)

    def write(self, interrupted: bool) -> str:
        """Write results.md and results.json; return the markdown."""
        names = [s.name for s in self.systems]
        peers = [n for n in names if n not in report.PEERS_NOT_COMPARED]
        summary = report.medians(self.measurements, names)
        problems = report.problems(self.measurements, self.pairs)
        settings = self.amounts | {"quick": self.args.quick, "sections": self.sections}
        machine = f"{os.cpu_count()} CPUs, {_cpu_model()}, Linux {platform.release()}"
        pairs_part = [
            report.table(summary, names),
            "",
            "ours / best peer: the best of " + (", ".join(peers) or "no peer")
            + "; above 1 is better where higher is better, worse where lower is better. "
            "direct = no proxy at all (the ceiling of the load generator and backend).",
            "",
            "Versions: " + "; ".join(f"{k}: {v}" for k, v in self.versions.items()),
            f"Every pair is configured with the same TLS 1.3 suites, in this order: {SUITES}. Negotiated "
            "(ServerHello seen on the wire between the two sides): "
            + (", ".join(f"{name} {suite}" for name, suite in self.suites.items()) or "not probed") + ". "
            "Our sidecar also checks the peer's SPIFFE ID against the port's rule; stunnel and haproxy verify the "
            "chain only. haproxy runs one thread per CPU, stunnel one thread per connection, our sidecar one event loop (handshakes) plus one data-phase thread.",
            "",
        ]
        scale_part = [
            "## Scale",
            "",
            scale.table(self.scale),
            "",
            "Reload: one `proxy run` per row (`reload_stall.py`), the rules besides the 2 clients' IDs, a tenth of the "
            "connections from a client the new config forbids; the three figures are the longest /healthz answer, the "
            "longest echo round trip on a held connection, and when the last forbidden connection was closed. "
            "Handshake: CPU per full mTLS handshake, both ends in this process (`trust_domains.py`), best of rounds, "
            "the client's rule last in the allowlist. CRL: `ca.revocation.refresh_crl` on an index with that many "
            "revoked certificates (`crl_build.py`), median of rounds.",
            "",
        ]
        egress_part = [
            "## Egress path against `outbound:`",
            "",
            egress_cost.table(self.egress),
            "",
            "One client-side sidecar in a network namespace of its own, with an `outbound:` listener and an egress "
            "listener to the same server-side sidecar (another namespace) in front of an echo; `proxy redirect "
            "--apply` in the client's namespace. The load client (uid 65534, same namespace) dials the outbound port "
            "on loopback (explicit) or the server's address, redirected to the egress listener, which matches an "
            "`expect` rule and originates mTLS (egress). Each connection: connect, 64 bytes and their echo, close; "
            "a full mTLS handshake each. The paths take turns in 1-second slices; medians of rounds. CPU: utime+stime "
            "(/proc/PID/stat) of each sidecar over its path's slices, per 1000 connections completed.",
            "",
        ]
        text = "\n".join([
            f"# mtls-sidecar benchmark, {self.out.name}" + (" (INTERRUPTED: partial)" if interrupted else ""),
            "",
            f"Machine: {machine}. Loopback only; load generator, both proxies and backend share the CPUs.",
            f"Source: {self.source}.",
            f"Settings: {json.dumps(settings)}. Figures are medians of {self.amounts['rounds']} round(s).",
            "",
            *(pairs_part if self.pair_sections else []),
            *(scale_part if "scale" in self.sections else []),
            *(egress_part if "egress" in self.sections else []),
            "## Notes",
            "",
            *(f"- {note}" for note in self.notes + problems + self.egress.get("notes", [])),
            *(["- none"] if not self.notes + problems + self.egress.get("notes", []) else []),
        ]) + "\n"
        (self.out / "results.md").write_text(text)
        (self.out / "results.json").write_text(json.dumps({
            "argv": sys.argv, "source": self.source, "machine": machine, "settings": settings, "versions": self.versions,
            "suites": self.suites,
            "interrupted": interrupted, "summary": summary, "notes": self.notes, "problems": problems,
            "measurements": self.measurements, "pairs": self.pairs, "scale": self.scale,
            "egress": self.egress,
        }, indent=1) + "\n")
        return text


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _source_state() -> str:
    """The commit measured, and whether proxy/ or ca/ differ from it (git only reads: no index lock)."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(BENCH_DIR.parent), *args], capture_output=True, text=True,
                                  timeout=30, env=env)
        except OSError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "proxy", "ca")
    if not changed:
        return commit
    return f"{commit} with uncommitted changes in {len(changed.splitlines())} file(s) of proxy/ and ca/"


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or BENCH_DIR / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    for signum in (signal.SIGTERM, signal.SIGHUP):  # Ctrl-C already raises KeyboardInterrupt
        if signal.getsignal(signum) != signal.SIG_IGN:  # keep nohup's choice
            signal.signal(signum, _exit_on_signal)
    say(f"open-files limit: {raise_open_files()}; results in {out}")
    workdir = Path(tempfile.mkdtemp(prefix="mtls-bench-"))  # the CA and keys; removed at the end
    bench = Bench(args, out, workdir)
    interrupted = True
    try:
        bench.prepare()
        bench.run()
        interrupted = False
    except KeyboardInterrupt:
        say("interrupted: stopping every process we started")
    finally:
        Child.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
        if bench.measurements or bench.scale or bench.egress or not interrupted:
            print(bench.write(interrupted))
            say(f"written: {out / 'results.md'}, {out / 'results.json'}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
