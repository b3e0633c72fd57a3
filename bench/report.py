"""From raw measurements to the figures of the table: medians over rounds, ratios, notes."""

from __future__ import annotations

import statistics

PEERS_NOT_COMPARED = {"ours", "ours-resumed", "direct"}

# (figure id, label, which way is better, decimals)
ROWS = [
    ("bulk_1_MBps", "bulk MB/s, 1 connection", "higher", 0),
    ("bulk_8_MBps", "bulk MB/s, 8 connections", "higher", 0),
    ("bulk_cpu_s_per_GB", "bulk: proxy CPU s per GB (both sides)", "lower", 2),
    ("probe_p50_ms", "new connection + reply while 4 bulk streams run, p50 ms", "lower", 1),
    ("probe_p99_ms", "new connection + reply while 4 bulk streams run, p99 ms", "lower", 1),
    ("conn_16_per_s", "new connections/s, full mTLS handshake each, c=16", "higher", 0),
    ("conn_64_per_s", "new connections/s, full mTLS handshake each, c=64", "higher", 0),
    ("conn_cpu_s_per_1000", "proxy CPU s per 1000 new connections (both sides), c=64", "lower", 2),
    ("latency_1_p50_us", "request/reply p50 latency, c=1, us", "lower", 0),
    ("latency_32_per_s", "request/reply req/s, c=32, keep-alive", "higher", 0),
    ("latency_32_p99_us", "request/reply p99 latency, c=32, us", "lower", 0),
    ("latency_cpu_us_per_req", "proxy CPU us per request (both sides), c=32, keep-alive", "lower", 0),
    ("rss_start_KiB", "RSS with 0 connections, KiB (both sides)", "lower", 0),
    ("KiB_per_conn_client", "KiB per idle connection, client side", "lower", 1),
    ("KiB_per_conn_server", "KiB per idle connection, server side", "lower", 1),
]


def figures_of(kind: str, result: dict) -> dict[str, float]:
    """The table's figures found in one measurement's raw result."""
    cpu_both = sum(result.get("proxy_cpu_s", {}).get(role, 0) for role in ("client", "server"))
    if kind.startswith("bulk_"):
        gb = result.get("bytes_received", 0) / 1e9
        return {f"{kind}_MBps": result.get("MBps"), f"{kind}_cpu_s": cpu_both, f"{kind}_GB": gb}
    if kind.startswith("conn_"):
        found = {f"{kind}_per_s": result.get("rate_per_s")}
        if kind == "conn_64" and result.get("requests") and cpu_both:
            found["conn_cpu_s_per_1000"] = cpu_both / result["requests"] * 1000
        return found
    if kind == "probe_under_bulk":
        return {"probe_p50_ms": result.get("p50_ms"), "probe_p99_ms": result.get("p99_ms")}
    if kind == "latency_1":
        return {"latency_1_p50_us": result.get("p50_us")}
    if kind == "latency_32":
        found = {"latency_32_per_s": result.get("rate_per_s"), "latency_32_p99_us": result.get("p99_us")}
        if result.get("requests") and cpu_both:
            found["latency_cpu_us_per_req"] = cpu_both / result["requests"] * 1e6
        return found
    if kind == "memory":
        return {
            "rss_start_KiB": sum(result["rss_start_KiB"].values()),
            "KiB_per_conn_client": result["KiB_per_conn"].get("client"),
            "KiB_per_conn_server": result["KiB_per_conn"].get("server"),
        }
    return {}


def round_figures(measurements: list[dict]) -> dict[str, float]:
    """All figures of one system in one round (bulk CPU per GB over both bulk runs)."""
    found: dict[str, float] = {}
    for m in measurements:
        found.update({k: v for k, v in figures_of(m["kind"], m["result"]).items() if v is not None})
    gb = found.get("bulk_1_GB", 0) + found.get("bulk_8_GB", 0)
    cpu = found.get("bulk_1_cpu_s", 0) + found.get("bulk_8_cpu_s", 0)
    if gb and cpu:
        found["bulk_cpu_s_per_GB"] = cpu / gb
    return found


def medians(measurements: list[dict], systems: list[str]) -> dict[str, dict[str, float]]:
    """figure id -> system -> median over the rounds that produced it."""
    per_round: dict[tuple[str, int], list[dict]] = {}
    for m in measurements:
        per_round.setdefault((m["system"], m["round"]), []).append(m)
    values: dict[str, dict[str, list[float]]] = {}
    for (system, _), ms in per_round.items():
        for figure, value in round_figures(ms).items():
            values.setdefault(figure, {}).setdefault(system, []).append(value)
    return {
        figure: {system: statistics.median(v) for system, v in by_system.items() if system in systems}
        for figure, by_system in values.items()
    }


def _fmt(value, decimals: int) -> str:
    return "-" if value is None else f"{value:,.{decimals}f}"


def table(summary: dict[str, dict[str, float]], systems: list[str]) -> str:
    """Markdown: one row per figure, a column per system, and ours / best peer."""
    peers = [s for s in systems if s not in PEERS_NOT_COMPARED]
    head = ["figure", "better", *systems, "ours / best peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for figure, label, better, decimals in ROWS:
        row = summary.get(figure, {})
        if not row:
            continue
        peer_values = [row[p] for p in peers if row.get(p) is not None]
        best = (max if better == "higher" else min)(peer_values) if peer_values else None
        ours = row.get("ours")
        ratio = f"{ours / best:.2f}" if ours is not None and best else "-"
        cells = [label, better, *(_fmt(row.get(s), decimals) for s in systems), ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def problems(measurements: list[dict], pairs: list[dict]) -> list[str]:
    """Everything that went wrong or looks wrong: lost bytes, failed requests, crashes, log lines,
    our sidecar's error counters, connections it still counts as open, and how its RSS moved."""
    found = []
    for m in measurements:
        where, r = f"round {m['round']}, {m['system']}, {m['kind']}", m["result"]
        if m["kind"].startswith("bulk_") and not r.get("complete"):
            found.append(f"{where}: incomplete: {r.get('bytes_received')} of {r.get('bytes_sent')} bytes at the sink, "
                         f"{r.get('sink_resets')} reset(s), time capped: {r.get('time_capped')}, errors: {r.get('errors')}")
        elif m["kind"] == "probe_under_bulk" and (r.get("failed") or not r.get("probes")):
            found.append(f"{where}: {r.get('failed')} probe(s) failed, {r.get('probes')} answered: {r.get('errors')}")
        elif m["kind"].startswith(("conn_", "latency_")) and r.get("errors"):
            kinds = {k: r[k] for k in ("connect_errors", "read_errors", "write_errors", "non_2xx", "timeouts") if r.get(k)}
            found.append(f"{where}: {r['errors']} wrk errors {kinds or r.get('output')} in {r.get('requests')} requests")
        elif m["kind"] == "memory":
            held = r["held"]
            if held.get("failed"):
                found.append(f"{where}: {held['failed']} idle connection(s) failed to open: {held.get('errors')}")
            if m["system"] == "ours":
                steps = ", ".join(f"{role} side {r['rss_start_KiB'][role]:,} -> {r['rss_held_KiB'][role]:,} with "
                                  f"{held['ok']} idle -> {r['rss_released_KiB'][role]:,} after release"
                                  for role in r["rss_start_KiB"])
                found.append(f"{where}: RSS KiB: {steps}")
    for p in pairs:
        where = f"round {p['round']}, {p['system']}, {p['pair']} pair"
        for role, stop in p["stop"].items():
            if not stop["was_running"]:
                found.append(f"{where}: {role} side had exited by itself (exit code {stop['exit_code']})")
            elif p["system"] == "ours" and (stop["exit_code"] != 0 or stop["killed"]):
                found.append(f"{where}: {role} side did not exit cleanly on SIGTERM: exit code "
                             f"{stop['exit_code']}, SIGKILL needed: {stop['killed']}")
            if p["system"] == "ours" and stop["log"]:
                lines = ", ".join(f"{n}x {key}" for key, n in sorted(stop["log"].items(), key=lambda kv: -kv[1])[:6])
                found.append(f"{where}: {role} side logged {lines}")
        for role, counters in p.get("metrics", {}).items():
            bad = {k: v for k, v in counters.items()
                   if v and (k.startswith("sidecar_denials") or k.endswith(("/error", "/denied")) or k == "scrape_error")}
            active = counters.get("sidecar_active_connections", 0)
            if bad:
                found.append(f"{where}: {role} side counted {bad}")
            if active:
                found.append(f"{where}: {role} side still counted {active:g} open connection(s) after the load ended")
            if p["system"] == "ours" and p["pair"] == "http":
                found.append(f"{where}: {role} side RSS at the end {p['rss_end_KiB'][role]:,} KiB")
    return found
