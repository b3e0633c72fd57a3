"""The scale section of `make bench` (``--only scale``): how costs grow with the size of the work.

- reload stall: ``reload_stall.one_round`` for each (allow rules x open connections);
- handshake CPU: ``trust_domains``' in-process handshake with a 1-rule allowlist and with 10,000
  more rules (prefix, then exact) ahead of the one the client matches;
- CRL build: ``crl_build.crl_figures`` for each revoked count.

Each measurement comes back as one row, ``{"figure", "setting", "value" (text), "detail"}``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import crl_build
import reload_stall
import trust_domains
from proxy.snapshot import load_snapshot

FULL = {"reload": [(entries, conns) for entries in (1, 1000, 10000) for conns in (100, 1000)],
        "handshakes": 500, "handshake_rounds": 3, "crl_counts": [10000, 30000, 100000], "crl_rounds": 3}
QUICK = {"reload": [(1, 100), (1, 1000), (10000, 100), (10000, 1000)],
         "handshakes": 300, "handshake_rounds": 2, "crl_counts": [10000, 30000, 100000], "crl_rounds": 1}
HANDSHAKE_ALLOWLISTS = (("1 rule", 0, "prefix"), ("10,000 prefix rules + 1", 10000, "prefix"),
                        ("10,000 exact rules + 1", 10000, "exact"))


def rows(quick: bool, say: Callable[[str], None]) -> Iterator[dict]:
    amounts = QUICK if quick else FULL
    yield from reload_rows(amounts["reload"], say)
    yield from handshake_rows(amounts["handshakes"], amounts["handshake_rounds"], say)
    yield from crl_rows(amounts["crl_counts"], amounts["crl_rounds"], say)


def reload_rows(combinations: list[tuple[int, int]], say) -> Iterator[dict]:
    with tempfile.TemporaryDirectory(prefix="scale-reload-") as tmp:
        work = Path(tmp)
        idents = reload_stall.make_identities(work)
        for entries, conns in combinations:
            say(f"scale: reload with {entries} prefix rules, {conns} open connections")
            args = argparse.Namespace(connections=conns, entries=entries, kind="prefix")
            try:
                result = reload_stall.one_round(args, work, idents)
            except SystemExit as exc:  # reload_stall reports its failures by exiting
                result = {"error": str(exc.code)}
            if "error" in result:
                value = f"failed: {result['error']}"
            else:
                value = " / ".join(_ms(result[key]) for key in ("healthz_max_ms", "echo_max_ms", "revoked_ms"))
            yield {"figure": "reload: longest /healthz / longest echo / forbidden connections closed, after SIGHUP",
                   "setting": f"{entries:,} prefix rule{'s' if entries > 1 else ''}, {conns:,} open connections", "value": value,
                   "detail": result}

def handshake_rows(handshakes: int, rounds: int, say) -> Iterator[dict]:
    with tempfile.TemporaryDirectory(prefix="scale-handshake-") as tmp:
        root = Path(tmp)
        for label, entries, kind in HANDSHAKE_ALLOWLISTS:
            say(f"scale: handshake CPU, allowlist of {label}")
            snapshot = load_snapshot(trust_domains.make_config(root, (), tuple(reload_stall.rules(entries, kind))))
            trust_domains.handshake(snapshot)  # warm up
            ms = trust_domains.cpu_per_1000(snapshot, handshakes, rounds)  # CPU s per 1000 = ms per handshake
            yield {"figure": "CPU per full mTLS handshake (both ends, in process)", "setting": f"allowlist of {label}",
                   "value": _ms(ms),
                   "detail": {"handshakes": handshakes, "rounds": rounds, "best_of_rounds": True}}


def crl_rows(counts: list[int], rounds: int, say) -> Iterator[dict]:
    say(f"scale: CRL build for {', '.join(f'{c:,}' for c in counts)} revoked")
    for count, figures in crl_build.crl_figures(counts, rounds):
        yield {"figure": "CA: sign the CRL (refresh_crl)", "setting": f"{count:,} revoked",
               "value": _ms(figures["crl_s"] * 1000), "detail": figures | {"rounds": rounds}}


def _ms(value: float | None) -> str:
    if value is None:
        return "none"
    return f"{value:,.2f} ms" if value < 10 else f"{value:,.0f} ms"


def table(measured: list[dict]) -> str:
    return "\n".join(["| figure | setting | value |", "|---|---|---:|",
                      *(f"| {row['figure']} | {row['setting']} | {row['value']} |" for row in measured)])
