"""Renewals per second through `ca serve`, and what one renewal costs the CA in CPU.

A benchmark, not a test. Three set-ups, each a fresh CA made by `ca init` in a temporary directory:

- ``sqlite``: one `ca serve` on the embedded index (DIR/ca.db);
- ``pg1``: one `ca serve` on PostgreSQL (a throwaway server, started like the tests start theirs);
- ``pg2``: two `ca serve` replicas on that PostgreSQL, each on a state directory of its own, the
  clients spread over both.

``--clients`` workloads renew at once, each in a loop: a fresh P-256 key, a CSR over it, ``POST
/v1/renew`` over mTLS with its current certificate (proxy/caclient.py, as the sidecar's renewer
does), then the new certificate is the one it renews with next. The clients run in ``--procs``
processes of their own, so the load generator is not one Python thread. After ``--warmup`` seconds
the window opens for ``--seconds``; the figures count only renewals answered inside it:

- ``renewals/s``: 200 answers in the window / its length;
- ``p50 / p99 ms``: their latencies (new connection, handshake, request, answer);
- ``CA CPU ms/renewal``: utime+stime of the `ca serve` processes (/proc/PID/stat) over the window /
  renewals in it; ``DB CPU ms/renewal``: the same for the PostgreSQL server's processes; ``client
  CPU ms/renewal``: the same for the client processes (key, CSR, handshake, checking the answer);
- ``workloads at 1 h``: how many workloads that rate keeps renewed when certificates live 1 hour
  and are renewed at 2/3 of their life (each workload renews once per 2400 s): renewals/s x 2400.

Everything shares the machine's CPUs (clients, replicas, PostgreSQL): the figures say what this box
does with all of it on it.

    .venv/bin/python bench/ca_renewals.py                       # all three, 16 clients, 10 s each
    .venv/bin/python bench/ca_renewals.py --only pg2 --clients 32 --seconds 20 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # support.postgres: the tests' throwaway PostgreSQL server

PY = sys.executable
TD = "example.org"
SETUPS = {"sqlite": (False, 1), "pg1": (True, 1), "pg2": (True, 2)}  # name -> (PostgreSQL?, replicas)
RENEWED_AT = 2 / 3
LIFETIME_S = 3600
START_TIMEOUT_S = 30.0


# --- the clients (run as `ca_renewals.py --worker`, one process per share of the clients) -------


def worker(spec: dict) -> None:
    """Renew in a loop with each identity of ``spec`` until ``spec['until']``; print one JSON line: the
    (monotonic end time, latency s) of each 200 answer, error codes, our CPU seconds over the window."""
    import trio
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from proxy import caclient

    roots = x509.load_pem_x509_certificates(Path(spec["bundle"]).read_bytes())
    done: list[tuple[float, float]] = []
    errors: dict[str, int] = {}

    async def renew_forever(ident: dict) -> None:
        chain = x509.load_pem_x509_certificates(Path(ident["cert"]).read_bytes())
        key = load_pem_private_key(Path(ident["key"]).read_bytes(), None)
        url = caclient.ServiceUrl.parse(ident["url"])
        while time.monotonic() < spec["until"]:
            new_key, csr = caclient.new_key_and_csr()
            started = time.monotonic()
            try:
                answer = await caclient.post(
                    url, "/v1/renew", csr, "application/pkcs10", caclient.client_context(roots, tuple(chain), key),
                    expect_trust_domain=TD,
                )
            except caclient.ServiceError as exc:
                errors[exc.code or "unreachable"] = errors.get(exc.code or "unreachable", 0) + 1
                continue
            if answer.status != 200:
                code = answer.error()[0] or str(answer.status)
                errors[code] = errors.get(code, 0) + 1
                continue
            done.append((time.monotonic(), time.monotonic() - started))
            chain, key = caclient.chain_from(answer, ident["url"]), new_key

    cpu: list[float] = []

    async def sample_cpu() -> None:
        for moment in (spec["opens"], spec["closes"]):
            await trio.sleep(max(0.0, moment - time.monotonic()))
            cpu.append(time.process_time())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_cpu)
            for ident in spec["identities"]:
                nursery.start_soon(renew_forever, ident)

    trio.run(main)
    print(json.dumps({"done": done, "errors": errors, "cpu_s": cpu[1] - cpu[0]}))


# --- the CA side ------------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime of ``pids`` (/proc/PID/stat fields 14 and 15), in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def postgres_pids(data_dir: Path) -> list[int]:
    """The postmaster (first line of postmaster.pid) and every process it started."""
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    children.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return [postmaster, *children]


def run_ca(ca_dir: Path, db: str | None, *args: str) -> str:
    env = dict(os.environ, CA_DIR=str(ca_dir), **({"CA_DB": db} if db else {}))
    result = subprocess.run([PY, "-m", "ca", *args], capture_output=True, text=True, env=env, timeout=120)
    if result.returncode != 0:
        sys.exit(f"ca {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


class Replica:
    """`ca serve --listen 127.0.0.1:0` on ``ca_dir``, its JSON log in ``log``; ready once it logged so."""

    def __init__(self, ca_dir: Path, db: str | None, log: Path):
        env = dict(os.environ, CA_DIR=str(ca_dir), **({"CA_DB": db} if db else {}))
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([PY, "-m", "ca", "serve", "--listen", "127.0.0.1:0"],
                                         stdout=subprocess.DEVNULL, stderr=out, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
            if any(e["event"] == "ready" for e in events):
                address = next(e["address"] for e in events if e["event"] == "listening")
                self.url = f"https://127.0.0.1:{address.rsplit(':', 1)[1]}"
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"ca serve did not start (exit {self.proc.returncode}); its log, {log}:\n{log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def refusals(self) -> int:
        """Request log lines that were not 200."""
        events = (json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{"))
        return sum(1 for e in events if e["event"] == "request" and e.get("status") != 200)


def measure(name: str, work: Path, postgres, args) -> dict:
    """One round of one set-up: a fresh CA, its replicas, ``args.clients`` renewing clients."""
    from ca import issuance
    from ca.store import StateDir

    on_postgres, replicas = SETUPS[name]
    db = postgres.new_database() if on_postgres else None
    admin = work / "admin"
    run_ca(admin, db, "init", "--trust-domain", TD)
    state = StateDir.open(admin, db)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    started: list[Replica] = []
    try:
        for i in range(replicas):
            started.append(Replica(admin if i == 0 else work / f"replica-{i}", db, work / f"ca-serve-{i}.log"))
        identities = []
        for i in range(args.clients):
            issued = issuance.issue(state, f"spiffe://{TD}/ns/bench/sa/w{i}", ttl=timedelta(seconds=LIFETIME_S),
                                    now=now, out_dir=work / f"w{i}")
            identities.append({"cert": str(issued.cert_path), "key": str(issued.key_path),
                               "url": started[i % replicas].url})
        state.index.close()
        opens = time.monotonic() + args.warmup
        until = opens + args.seconds + 1.0  # the clients go on a little past the window: it ends under full load
        workers = []
        for share in range(args.procs):
            spec = {"bundle": str(admin / "bundle.pem"), "opens": opens, "closes": opens + args.seconds,
                    "until": until, "identities": identities[share::args.procs]}
            workers.append(subprocess.Popen([PY, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                                            text=True))
        ca_pids = [replica.proc.pid for replica in started]
        db_pids = postgres_pids(postgres.data) if on_postgres else []
        time.sleep(max(0.0, opens - time.monotonic()))
        ca_before, db_before = cpu_seconds(ca_pids), cpu_seconds(db_pids)
        time.sleep(args.seconds)
        ca_used, db_used = cpu_seconds(ca_pids) - ca_before, cpu_seconds(db_pids) - db_before
        closes = time.monotonic()
        results = []
        for proc in workers:
            out, _ = proc.communicate(timeout=args.seconds + 60)
            if proc.returncode != 0:
                sys.exit(f"a client process failed ({proc.returncode})")
            results.append(json.loads(out))
    finally:
        for replica in started:
            replica.stop()
    latencies = sorted(lat for r in results for end, lat in r["done"] if opens <= end <= closes)
    errors: dict[str, int] = {}
    for r in results:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    count = len(latencies)
    return {
        "setup": name, "clients": args.clients, "window_s": round(closes - opens, 3), "renewals": count,
        "per_s": count / (closes - opens),
        "p50_ms": 1000 * latencies[count // 2] if count else None,
        "p99_ms": 1000 * latencies[min(count - 1, int(count * 0.99))] if count else None,
        "ca_cpu_ms": 1000 * ca_used / count if count else None,
        "db_cpu_ms": 1000 * db_used / count if count and on_postgres else None,
        "client_cpu_ms": 1000 * sum(r["cpu_s"] for r in results) / count if count else None,
        "errors": errors, "refused_in_logs": sum(replica.refusals() for replica in started),
    }


def table(rows: list[dict]) -> str:
    def cell(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| set-up | clients | renewals/s | p50 ms | p99 ms | CA CPU ms/renewal | DB CPU ms/renewal "
             "| client CPU ms/renewal | workloads at 1 h (renewed at 2/3) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in SETUPS:
        mine = [row for row in rows if row["setup"] == name]
        if not mine:
            continue
        median = {key: statistics.median(row[key] for row in mine) if mine[0][key] is not None else None
                  for key in ("per_s", "p50_ms", "p99_ms", "ca_cpu_ms", "db_cpu_ms", "client_cpu_ms")}
        workloads = median["per_s"] * LIFETIME_S * RENEWED_AT
        lines.append(
            f"| {name} | {mine[0]['clients']} | {cell(median['per_s'])} | {cell(median['p50_ms'])} "
            f"| {cell(median['p99_ms'])} | {cell(median['ca_cpu_ms'], 2)} | {cell(median['db_cpu_ms'], 2)} "
            f"| {cell(median['client_cpu_ms'], 2)} | {workloads:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SETUPS), help=f"among {', '.join(SETUPS)} (default: all)")
    parser.add_argument("--clients", type=int, default=16, help="workloads renewing at once (default 16)")
    parser.add_argument("--procs", type=int, default=2, help="client processes they are spread over (default 2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="load before the window opens (default 2)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per set-up; the table shows medians")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SETUPS))
    if unknown or not chosen:
        sys.exit(f"--only {args.only!r}: choose among {', '.join(SETUPS)}")
    if args.clients < 1 or not 1 <= args.procs <= args.clients:
        sys.exit("--clients must be at least 1 and --procs between 1 and --clients")

    postgres = None
    if any(SETUPS[name][0] for name in chosen):
        from support.postgres import PostgresServer

        try:
            postgres = PostgresServer()
        except RuntimeError as exc:
            sys.exit(f"PostgreSQL: {exc}")
    rows = []
    try:
        for round_ in range(args.rounds):
            for name in chosen:
                with tempfile.TemporaryDirectory(prefix=f"bench-ca-{name}-") as work:
                    row = measure(name, Path(work), postgres, args)
                print(f"round {round_ + 1} {name}: {row['renewals']} renewals in {row['window_s']} s "
                      f"({row['per_s']:.1f}/s), errors {row['errors'] or 'none'}", file=sys.stderr)
                rows.append(row)
    finally:
        if postgres is not None:
            postgres.close()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
