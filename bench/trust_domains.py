"""CPU per 1000 full mTLS handshakes with 1 trust domain configured vs 4 (ours + 3 federated).

Both ends run in this process over memory BIOs, with the sidecar's own TLS contexts and verify
callback (``load_snapshot`` of a real config, certificates from real ``ca init``s), so the figure is
the handshake's cost including our chain checks, without sockets. Run:

    .venv/bin/python bench/trust_domains.py [--handshakes 1000] [--rounds 3]

Prints one line per configuration: CPU seconds per 1000 handshakes (the best of the rounds).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from OpenSSL import SSL

from proxy.snapshot import INBOUND, OUTBOUND, load_snapshot

OURS = "example.org"
PARTNERS = ("partner-1.org", "partner-2.org", "partner-3.org")


def ca(*args: str | Path) -> None:
    subprocess.run([sys.executable, "-m", "ca", *map(str, args)], check=True, capture_output=True)


def make_config(root: Path, federated: tuple[str, ...], extra_allow: tuple[str, ...] = ()) -> Path:
    """A config for the api side; ``extra_allow`` rules come before the one the client matches."""
    for trust_domain in (OURS, *federated):
        ca_dir = root / trust_domain
        if not ca_dir.exists():
            ca("--dir", ca_dir, "init", "--trust-domain", trust_domain)
            ca("--dir", ca_dir, "bundle", "--format", "spiffe", "--out", root / f"{trust_domain}.json")
    for name in ("api", "web"):
        if not (root / name).exists():
            ca("--dir", root / OURS, "issue", f"spiffe://{OURS}/ns/prod/sa/{name}", "--out", root / name)
    allow = [*extra_allow, f"spiffe://{OURS}/ns/prod/*"]
    config = root / f"api-{len(federated) + 1}-{len(allow)}.yaml"
    text = (
        f"identity: {{cert: {root}/api/cert.pem, key: {root}/api/key.pem, bundle: {root}/api/bundle.pem}}\n"
        "inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:9\n    allow:\n"
        + "".join(f"      - {rule}\n" for rule in allow) +
        f"outbound:\n  - {{name: out, listen: 127.0.0.1:0, connect: 127.0.0.1:9, expect: [spiffe://{OURS}/ns/prod/*]}}\n"
    )
    if federated:
        text += "trust_domains:\n" + "".join(f"  {td}: {{bundle: {root}/{td}.json}}\n" for td in federated)
    config.write_text(text)
    return config


def handshake(snapshot) -> None:
    """One full TLS 1.3 mutual handshake, client and server both the sidecar's contexts and checks."""
    server = SSL.Connection(snapshot.contexts.server, None)
    server.set_app_data(snapshot.policy(INBOUND, "api").peer_check())
    server.set_accept_state()
    client = SSL.Connection(snapshot.contexts.client, None)
    client.set_app_data(snapshot.policy(OUTBOUND, "out").peer_check())
    client.set_connect_state()
    done = {id(server): False, id(client): False}
    while not all(done.values()):
        for this, other in ((client, server), (server, client)):
            if not done[id(this)]:
                try:
                    this.do_handshake()
                    done[id(this)] = True
                except SSL.WantReadError:
                    pass
            try:
                data = this.bio_read(65536)
            except SSL.WantReadError:
                continue
            other.bio_write(data)
    assert server.get_app_data().failure is None and client.get_app_data().failure is None


def cpu_per_1000(snapshot, handshakes: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(handshakes):
            handshake(snapshot)
        best = min(best, (time.process_time() - start) * 1000 / handshakes)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handshakes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        for federated in ((), PARTNERS):
            snapshot = load_snapshot(make_config(root, federated))
            handshake(snapshot)  # warm up
            seconds = cpu_per_1000(snapshot, args.handshakes, args.rounds)
            print(f"{len(federated) + 1} trust domain(s), {len(snapshot.creds.trust.roots)} root(s): "
                  f"{seconds:.3f} CPU s per 1000 handshakes (both ends, best of {args.rounds})")


if __name__ == "__main__":
    main()
