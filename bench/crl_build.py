"""How long the CA takes to sign its CRL as revocations pile up.

A benchmark, not a test. It makes a CA in a temporary directory (``ca init``, SQLite index), then
for each count of ``--counts`` (ascending) issues real leaves from its intermediate until the index
holds that many revoked, unexpired certificates (recorded and revoked the way ``ca issue`` and ``ca
revoke`` record them), and times ``ca crl``'s work (``ca.revocation.refresh_crl``: read what the
CRL must list, sign it, write DIR/crl.pem) ``--rounds`` times. Every ``ca revoke`` does the same
work after changing the index, so this is also the cost of each revocation.

Figures per count (medians of the rounds): ``crl_s`` (the whole of refresh_crl), ``query_s`` (reading
the revocations of the index alone), ``crl_bytes`` (size of the intermediate's CRL, DER).

    .venv/bin/python bench/crl_build.py --counts 10000,30000,100000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from ca import generations, revocation  # noqa: E402
from ca.authority import generate_key  # noqa: E402
from ca.store import StateDir  # noqa: E402

TD = "example.org"
BATCH = 5000  # leaves recorded per index transaction while filling


def fill(state: StateDir, count: int, *, have: int, now: datetime) -> None:
    """Issue and revoke leaves until the index holds ``count`` revoked ones (it holds ``have``)."""
    issuer = state.load_issuer(None)
    public_key = generate_key().public_key()  # one key for all: the CRL only cares about serials
    while have < count:
        batch = min(BATCH, count - have)
        ids = [f"spiffe://{TD}/ns/bench/sa/w{have + i}" for i in range(batch)]
        leaves = [issuer.issue(spiffe_id, public_key, ttl=timedelta(days=30), now=now) for spiffe_id in ids]
        with state.transaction() as db:
            for leaf, spiffe_id in zip(leaves, ids):
                StateDir.insert(db, leaf, spiffe_id, now=now)
            StateDir.mark_revoked(
                db, [leaf.serial_number for leaf in leaves], at=now, reason="keyCompromise"
            )
        have += batch


def measure(state: StateDir, *, now: datetime, rounds: int) -> dict[str, float]:
    crl_s, query_s, size = [], [], 0
    subject = state.load_issuer(None).cert.subject
    for _ in range(rounds):
        started = time.perf_counter()
        with state.index.reading() as db:
            listed = StateDir.revocations(db, now=now, issuer=subject)
        query_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        crl = revocation.refresh_crl(state, now=now)
        crl_s.append(time.perf_counter() - started)
        size = len(crl.public_bytes(serialization.Encoding.DER))
        assert len(crl) == len(listed), (len(crl), len(listed))
    return {
        "crl_s": round(statistics.median(crl_s), 3),
        "query_s": round(statistics.median(query_s), 3),
        "crl_bytes": size,
        "entries": len(listed),
    }


def crl_figures(counts: list[int], rounds: int) -> Iterator[tuple[int, dict[str, float]]]:
    """(count, figures) for each count, ascending, on one CA in a temporary directory."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    with tempfile.TemporaryDirectory(prefix="crl-bench-") as scratch:
        state = generations.init_ca(
            Path(scratch) / "ca", trust_domain=TD, key_type="ec-p256", root_ttl=timedelta(days=3650),
            ttl=timedelta(days=365), passphrase=None, now=now,
        )
        have = 0
        for count in sorted(counts):
            fill(state, count, have=have, now=now)
            have = count
            yield count, measure(state, now=now, rounds=rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="10000,30000,100000", help="revoked entries (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="timings per count; medians shown (default: 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per count")
    args = parser.parse_args()
    if not args.json:
        print(f"{'revoked':>8}  {'crl_s':>7}  {'query_s':>7}  {'crl_bytes':>10}")
    for count, figures in crl_figures([int(text) for text in args.counts.split(",")], args.rounds):
        if args.json:
            print(json.dumps({"revoked": count, **figures}))
        else:
            print(f"{count:>8}  {figures['crl_s']:>7.3f}  {figures['query_s']:>7.3f}  {figures['crl_bytes']:>10}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
