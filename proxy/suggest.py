"""``proxy suggest``: turn a decision log into the allow rules that would have admitted what it saw.

How an operator writes a first policy for an app whose traffic nobody documented: run the sidecar
with ``mode: audit`` (egress and inbound), let the app do its work, then feed the log to
``proxy suggest --log FILE``. Every connection the log shows let through becomes part of one rule;
rules are grouped by destination (egress) or by listener (inbound) and commented with counts.
Connections that an enforcing sidecar refused are listed too, commented out: they may be attacks.

Pure but for reading the file: ``suggest`` takes log lines and returns YAML text.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mtls import reasons
from mtls.endpoints import format_host_port

_CONNECTION_LINES = ("conn_allowed", "conn_denied")  # exactly one of these per connection
_POLICY_REFUSALS = (reasons.EGRESS_DENIED, reasons.IDENTITY_NOT_ALLOWED)


@dataclass
class _Seen:
    """Connections that one suggested rule admits: how many, and the names or IDs behind them."""

    admitted: int = 0
    refused: int = 0
    values: Counter = field(default_factory=Counter)  # SNI names or SPIFFE IDs seen, with counts


def _egress_key(line: dict) -> tuple[str, str, str] | None:
    """(to, kind, value) of an egress line: kind ``mtls`` (value: server ID), ``sni`` (value: SNI) or plain."""
    address = line.get("peer_addr")
    if not address:
        return None
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    name = (line.get("dst_name") or "").split(", ")[0]
    to = format_host_port(name or host, int(port))
    if line.get("peer_id"):
        return to, "expect", line["peer_id"]
    if line.get("sni"):
        return to, "sni", line["sni"]
    return to, "plain", ""


def suggest(lines: list[str], source: str) -> str:
    """The YAML for the decision lines in ``lines`` (other lines are skipped)."""
    egress: dict[tuple[str, str, bool], _Seen] = {}  # (to, kind, refused) -> what was seen
    inbound: dict[str, dict[str, _Seen]] = {}
    first = last = None
    total = 0
    for text in lines:
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if not isinstance(line, dict) or line.get("event") not in _CONNECTION_LINES:
            continue
        refused = line["event"] == "conn_denied"
        if refused and line.get("reason") not in _POLICY_REFUSALS:
            continue  # failed for another reason (handshake, unreachable): says nothing about policy
        if line.get("direction") == "egress":
            key = _egress_key(line)
            if key is None:
                continue
            seen = egress.setdefault((*key[:2], refused), _Seen())
            if key[2]:
                seen.values[key[2]] += 1
        elif line.get("direction") == "inbound" and line.get("peer_id"):
            seen = inbound.setdefault(line["listener"], {}).setdefault(line["peer_id"], _Seen())
        else:
            continue
        total += 1
        seen.refused += refused
        seen.admitted += not refused
        first = first or line.get("ts")
        last = line.get("ts") or last
    out = [f"# Suggested by `proxy suggest` from {source}: {total} connection{_s(total)}"
           + (f" from {first} to {last}." if first else "."),
           "# Each rule admits what was seen and nothing more; review it before you enforce it."]
    if egress:
        out += ["egress:", "  allow:"]
        out += _egress_rules(egress, refused=False) + _egress_rules(egress, refused=True)
    if inbound:
        out += ["inbound:  # merge each allow list into the listener of that name"]
        for listener in sorted(inbound):
            out += [f"  - name: {listener}", "    allow:"]
            peers = inbound[listener]
            out += [f"      - {peer}  # {_count(peers[peer].admitted)}" for peer in sorted(peers) if peers[peer].admitted]
            out += [f"      # - {peer}  # refused {_count(peers[peer].refused)}"
                    for peer in sorted(peers) if not peers[peer].admitted]
    if not egress and not inbound:
        out.append("# No connection decisions in this log: nothing to suggest.")
    return "\n".join(out) + "\n"


def _egress_rules(egress: dict[tuple[str, str, bool], _Seen], *, refused: bool) -> list[str]:
    out = []
    chosen = [(to, kind, seen) for (to, kind, was_refused), seen in sorted(egress.items()) if was_refused == refused]
    if refused and chosen:
        out.append("    # refused while enforcing (they may be attacks); uncomment only what the app needs:")
    for to, kind, seen in chosen:
        lead = "    # - " if refused else "    - "
        more = "    #   " if refused else "      "
        count = f"refused {_count(seen.refused)}" if refused else _count(seen.admitted)
        out.append(f"{lead}to: {to}  # {count}")
        if kind != "plain":
            values = sorted(seen.values)
            by_value = ", ".join(f"{value} {seen.values[value]}" for value in values)
            out.append(f"{more}{kind}: [{', '.join(values)}]" + (f"  # {by_value}" if len(values) > 1 else ""))
    return out


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _count(n: int) -> str:
    return f"{n} connection{_s(n)}"


def suggest_main(log_path: Path, out, err) -> int:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError as exc:
        print(f"proxy suggest: cannot read {log_path}: {exc.strerror or exc}", file=err)
        return 2
    out.write(suggest(lines, str(log_path)))
    return 0
