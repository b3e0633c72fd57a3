"""The measurements, each bounded in time and bytes, each run against one started Pair.

Each returns a dict of raw results; CPU seconds are read from /proc for every process group
in the pair (and the backend) before and after the load, so they cover exactly the load.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path

from procs import Child
from systems import LOADGEN, Pair, tool

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_summary.lua"
SLACK_SECONDS = 60  # beyond a load generator's own time bound, before we kill it


def _cpu(children: dict[str, Child]) -> dict[str, float]:
    return {role: child.cpu_seconds() for role, child in children.items()}


def _cpu_used(before: dict[str, float], children: dict[str, Child]) -> dict[str, float]:
    return {role: round(child.cpu_seconds() - before[role], 3) for role, child in children.items()}


def _run_load(name: str, argv: list[str], timeout: float, logdir: Path) -> tuple[str, float]:
    """Run a load generator to its end (killed after ``timeout``); return its stdout and wall time."""
    started = time.monotonic()
    child = Child(name, argv, logdir / "loadgen.log", stdout=subprocess.PIPE)
    try:
        out, _ = child.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = b""
    finally:
        child.stop()
        child.proc.stdout.close()
    return out.decode(errors="replace"), time.monotonic() - started


def bulk(pair: Pair, sink, conns: int, nbytes: int, cap_seconds: float, logdir: Path) -> dict:
    """Push ``nbytes`` over ``conns`` connections through the pair into the sink; MB/s at the sink."""
    watched = pair.children()
    before = _cpu(watched)
    out, _ = _run_load("bulk sender", [
        sys.executable, str(LOADGEN), "send", "--port", str(pair.entry), "--stats-port", str(sink.stats_port),
        "--conns", str(conns), "--bytes", str(nbytes), "--seconds", str(cap_seconds),
    ], cap_seconds + SLACK_SECONDS, logdir)
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"MBps": None, "complete": False, "errors": [f"sender printed no result: {out[-300:]!r}"]}
    result["proxy_cpu_s"] = _cpu_used(before, watched)
    return result


def probe_under_bulk(pair: Pair, sink, conns: int, seconds: float, logdir: Path) -> dict:
    """New connections one after the other (each: connect, a few bytes, the sink's answer, close)
    while ``conns`` bulk streams run through the same pair: how long a small request waits behind
    big transfers, handshake included."""
    sender = Child("bulk sender", [
        sys.executable, str(LOADGEN), "send", "--port", str(pair.entry), "--stats-port", str(sink.stats_port),
        "--conns", str(conns), "--bytes", str(1 << 40), "--seconds", str(seconds + 1),
    ], logdir / "loadgen.log", stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # the streams are up to speed
        out, _ = _run_load("prober", [sys.executable, str(LOADGEN), "probe", "--port", str(pair.entry),
                                      "--seconds", str(seconds)], seconds + SLACK_SECONDS, logdir)
        sender.proc.wait(seconds + SLACK_SECONDS)
    finally:
        sender.stop()
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"probes": 0, "errors": [f"prober printed no result: {out[-300:]!r}"]}


def wrk(pair: Pair, backend: Child, conns: int, seconds: int, new_connection_each: bool, logdir: Path) -> dict:
    """wrk against the pair: keep-alive, or ``Connection: close`` so that every request is a new
    connection (a full mTLS handshake between the proxies)."""
    watched = pair.children() | {"backend": backend}
    argv = [tool("wrk"), f"-t{min(conns, 2)}", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "--latency",
            "-s", str(WRK_SCRIPT)]
    if new_connection_each:
        argv += ["-H", "Connection: close"]
    before = _cpu(watched)
    out, wall = _run_load(f"wrk -c{conns}", argv + [f"http://127.0.0.1:{pair.entry}/"], seconds + SLACK_SECONDS, logdir)
    used = _cpu_used(before, watched)
    summary = next((line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("WRK_SUMMARY ")), None)
    if summary is None:
        return {"rate_per_s": None, "errors": 1, "output": out[-500:], "proxy_cpu_s": used}
    result = json.loads(summary)
    result["rate_per_s"] = round(result["requests"] / result["seconds"], 1) if result["seconds"] else None
    result["errors"] = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors", "non_2xx", "timeouts"))
    result["backend_cpu_percent"] = round(100 * used.pop("backend") / wall, 1)
    result["proxy_cpu_s"] = used
    return result


def memory(pair: Pair, conns: int, logdir: Path) -> dict:
    """RSS of each side fresh, with ``conns`` idle connections held through the pair, and after."""
    children = pair.children()
    time.sleep(1.0)  # let a freshly started process finish its start-up allocations
    result = {"rss_start_KiB": {role: c.rss_kib() for role, c in children.items()}}
    holder = Child("holder", [sys.executable, str(LOADGEN), "hold", "--port", str(pair.entry), "--conns", str(conns),
                              "--open-timeout", "60", "--seconds", "120"],
                   logdir / "loadgen.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        readable, _, _ = select.select([holder.proc.stdout], [], [], 90)
        line = holder.proc.stdout.readline() if readable else b""
        try:
            result["held"] = json.loads(line)
        except ValueError:
            result["held"] = {"ok": 0, "failed": conns, "errors": [f"holder printed {line[-200:]!r}"]}
        time.sleep(2.0)
        result["rss_held_KiB"] = {role: c.rss_kib() for role, c in children.items()}
        holder.proc.stdin.close()
        holder.proc.wait(15)
    except subprocess.TimeoutExpired:
        pass
    finally:
        holder.stop()
        holder.proc.stdout.close()
    time.sleep(2.0)
    result["rss_released_KiB"] = {role: c.rss_kib() for role, c in children.items()}
    ok = result["held"]["ok"]
    result["KiB_per_conn"] = {
        role: round((result["rss_held_KiB"][role] - result["rss_start_KiB"][role]) / ok, 2) if ok else None
        for role in children
    }
    return result
