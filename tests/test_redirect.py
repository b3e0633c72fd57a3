"""`proxy redirect`: the printed script, and the rules it leaves in a real network namespace.

What the rules do to traffic: test_egress_netns.py (egress), test_inbound_redirect_netns.py (inbound).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.cli import main
from proxy.redirect import IPTABLES, NFT, InboundPort, Rules, Target, apply_plan, remove_plan, script

TARGET = Target(15001, ipv6=False, sidecar_uid=1337)
EGRESS = Rules(egress=TARGET)
IDENTITY = "identity: {cert: c.pem, key: k.pem, bundle: b.pem}\n"


def test_nft_script_redirects_ipv4_and_refuses_ipv6_except_the_sidecar_and_local_addresses():
    text = script(apply_plan(NFT, EGRESS), "comment")
    assert "table ip mtls_sidecar {" in text and "table ip6 mtls_sidecar {" in text
    assert text.count("meta skuid 1337 return") == 2 and text.count("fib daddr type local return") == 2
    assert "meta l4proto tcp redirect to :15001" in text
    assert "tcp flags & (syn | ack) == syn reject with tcp reset" in text, "only connections opened here"
    # replaced whole in one transaction: what was there goes first
    assert text.index("delete table ip mtls_sidecar") < text.index("table ip mtls_sidecar {")


def test_ipv6_listener_redirects_ipv6_and_refuses_ipv4():
    text = script(apply_plan(NFT, Rules(Target(15001, ipv6=True, sidecar_uid=1337))), "comment")
    assert "table ip6 mtls_sidecar {\n  chain egress {\n    type nat" in text
    assert "table ip mtls_sidecar {\n  chain egress {\n    type filter" in text


def test_iptables_script_replaces_its_own_chain_and_one_jump():
    text = script(apply_plan(IPTABLES, EGRESS), "comment")
    assert "iptables -w -t nat -A MTLS_SIDECAR -m owner --uid-owner 1337 -j RETURN" in text
    assert "iptables -w -t nat -A MTLS_SIDECAR -p tcp -j REDIRECT --to-ports 15001" in text
    assert "ip6tables -w -t filter -A MTLS_SIDECAR -p tcp --syn -j REJECT --reject-with tcp-reset" in text
    assert text.count("-A OUTPUT") == 2
    assert text.index("-D OUTPUT") < text.index("-A OUTPUT"), "an earlier copy is removed first"


def test_print_reads_the_port_from_the_config(tmp_path, capsys):
    config = tmp_path / "sidecar.yaml"
    config.write_text(IDENTITY + "egress: {listen: 127.0.0.1:15111}\n")
    assert main(["redirect", "--print", "--uid", "1337", "-c", str(config), "--backend", "nft"]) == 0
    assert "redirect to :15111" in capsys.readouterr().out


def test_config_without_egress_is_a_usage_error(tmp_path, capsys):
    config = tmp_path / "sidecar.yaml"
    config.write_text(IDENTITY)
    assert main(["redirect", "--print", "--uid", "1337", "-c", str(config)]) == 2
    assert "no egress section" in capsys.readouterr().err


def test_uid_is_required_to_apply(capsys):
    assert main(["redirect", "--apply", "--port", "15001"]) == 2
    assert "--uid is required" in capsys.readouterr().err


def test_remove_needs_no_uid():
    assert "delete table ip6 mtls_sidecar" in script(remove_plan(NFT), "comment")


# --- inbound -----------------------------------------------------------------------------------


def _inbound_config(tmp_path, *listeners: tuple[str, str, str], extra: str = "") -> Path:
    """A config with one inbound listener per (name, listen, forward)."""
    config = tmp_path / "sidecar.yaml"
    config.write_text(IDENTITY + "inbound:\n" + "".join(
        f"  - {{name: {name}, listen: '{listen}', forward: '{forward}', allow: [spiffe://example.org/ns/a/sa/b]}}\n"
        for name, listen, forward in listeners) + extra)
    return config


def _print(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["redirect", "--print", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


INBOUND_SCRIPT = """\
#!/bin/sh
set -e
# Inbound redirection (nft): {comment}
nft -f - <<'EOF'
add table ip mtls_sidecar
delete table ip mtls_sidecar
add table ip6 mtls_sidecar
delete table ip6 mtls_sidecar
table ip mtls_sidecar {{
  chain inbound {{
    type nat hook prerouting priority -100; policy accept;
    iifname "lo" return
    tcp dport 8080 redirect to :8443
    tcp dport 9090 redirect to :9443
  }}
}}
table ip6 mtls_sidecar {{
  chain inbound_refused {{
    type filter hook input priority 0; policy accept;
    iifname "lo" return
    tcp dport 8080 reject with tcp reset
    tcp dport 9090 reject with tcp reset
  }}
}}
EOF
"""


def test_inbound_print_redirects_each_listeners_forward_port_to_its_listen_port(tmp_path, capsys):
    config = _inbound_config(tmp_path, ("web", "0.0.0.0:8443", "127.0.0.1:8080"),
                             ("metrics", "0.0.0.0:9443", "localhost:9090"))
    code, out, err = _print(capsys, "--inbound", "-c", str(config), "--backend", "nft")
    assert (code, err) == (0, "")
    assert out == INBOUND_SCRIPT.format(comment=(
        "IPv4 TCP arriving from outside this namespace to port 8080 goes to the inbound listener web on port 8443; "
        "IPv6 TCP to port 8080 is refused (reset); "
        "IPv4 TCP arriving from outside this namespace to port 9090 goes to the inbound listener metrics on port "
        "9443; IPv6 TCP to port 9090 is refused (reset)."))


def test_inbound_and_egress_share_the_table_of_their_family(tmp_path, capsys):
    config = _inbound_config(tmp_path, ("web", "0.0.0.0:8443", "127.0.0.1:8080"),
                             extra="egress: {listen: 127.0.0.1:15001}\n")
    code, out, _ = _print(capsys, "--egress", "--inbound", "--uid", "1337", "-c", str(config), "--backend", "nft")
    assert code == 0 and out.count("table ip mtls_sidecar {") == 1 and out.count("table ip6 mtls_sidecar {") == 1
    ip = out[out.index("table ip mtls_sidecar {"):out.index("table ip6 mtls_sidecar {")]
    assert "chain egress {\n    type nat hook output" in ip and "chain inbound {\n    type nat hook prerouting" in ip
    ip6 = out[out.index("table ip6 mtls_sidecar {"):]
    assert "chain egress {\n    type filter hook output" in ip6 and "chain inbound_refused {" in ip6
    assert "# Egress redirection (nft):" in out and "# Inbound redirection (nft):" in out


def test_inbound_alone_needs_no_uid_and_writes_no_egress_rule(tmp_path, capsys):
    config = _inbound_config(tmp_path, ("web", "0.0.0.0:8443", "127.0.0.1:8080"),
                             extra="egress: {listen: 127.0.0.1:15001}\n")
    code, out, _ = _print(capsys, "--inbound", "-c", str(config), "--backend", "nft")
    assert code == 0 and "egress" not in out.lower() and "skuid" not in out


def test_ipv6_listener_redirects_ipv6_and_refuses_ipv4_to_the_app_port(tmp_path, capsys):
    config = _inbound_config(tmp_path, ("web", "[::]:8443", "[::1]:8080"))
    code, out, _ = _print(capsys, "--inbound", "-c", str(config), "--backend", "nft")
    assert code == 0
    assert "table ip mtls_sidecar {\n  chain inbound_refused {\n    type filter hook input" in out
    assert "table ip6 mtls_sidecar {\n  chain inbound {\n    type nat hook prerouting" in out
    assert "IPv6 TCP arriving from outside this namespace to port 8080" in out


def test_iptables_inbound_jumps_from_prerouting_and_input_to_a_chain_of_its_own():
    text = script(apply_plan(IPTABLES, Rules(inbound=(InboundPort("web", 8080, 8443, ipv6=False),))), "comment")
    assert "iptables -w -t nat -A MTLS_SIDECAR_IN -i lo -j RETURN" in text
    assert "iptables -w -t nat -A MTLS_SIDECAR_IN -p tcp --dport 8080 -j REDIRECT --to-ports 8443" in text
    assert "ip6tables -w -t filter -A MTLS_SIDECAR_IN -p tcp --dport 8080 -j REJECT --reject-with tcp-reset" in text
    assert "iptables -w -t nat -A PREROUTING -p tcp -j MTLS_SIDECAR_IN" in text
    assert "ip6tables -w -t filter -A INPUT -p tcp -j MTLS_SIDECAR_IN" in text
    assert "-A OUTPUT" not in text and "-N MTLS_SIDECAR\n" not in text
    removal = script(remove_plan(IPTABLES), "comment")
    for tool in ("iptables", "ip6tables"):
        for jump in ("nat -D OUTPUT -p tcp -j MTLS_SIDECAR;", "filter -D OUTPUT -p tcp -j MTLS_SIDECAR;",
                     "nat -D PREROUTING -p tcp -j MTLS_SIDECAR_IN;", "filter -D INPUT -p tcp -j MTLS_SIDECAR_IN;"):
            assert f"then {tool} -w -t {jump}" in removal


@pytest.mark.parametrize(("listeners", "message"), [
    ([("web", "0.0.0.0:8443", "10.1.2.3:8080")],
     ("inbound listener web forwards to 10.1.2.3:8080, not to loopback: --inbound protects an app in this network "
      "namespace")),
    ([("web", "0.0.0.0:8443", "app.internal:8080")], "inbound listener web forwards to app.internal:8080, not to "),
    ([("web", "127.0.0.1:8443", "127.0.0.1:8080")],
     "inbound listener web listens on 127.0.0.1:8443, a loopback address: connections redirected from outside"),
    ([("web", "0.0.0.0:0", "127.0.0.1:8080")], "inbound listener web listens on port 0 (any free port)"),
    ([("web", "0.0.0.0:8443", "127.0.0.1:8080"), ("api", "0.0.0.0:9443", "[::1]:8080")],
     ("inbound listener api and inbound listener web both forward to port 8080: a connection to it can be "
      "redirected to one listener only")),
    ([("web", "0.0.0.0:8443", "unix:/run/app.sock")],
     "has no inbound listener forwarding to a TCP port: --inbound has nothing to redirect"),
])
def test_inbound_refuses_listeners_it_cannot_protect_in_one_line_naming_them(tmp_path, capsys, listeners, message):
    config = _inbound_config(tmp_path, *listeners)
    code, out, err = _print(capsys, "--inbound", "-c", str(config), "--backend", "nft")
    assert (code, out) == (2, "")
    assert err.startswith(f"proxy redirect: {config}") and message in err and err.count("\n") == 1


def test_listener_forwarding_to_a_unix_socket_is_noted_and_skipped(tmp_path, capsys):
    config = _inbound_config(tmp_path, ("web", "0.0.0.0:8443", "127.0.0.1:8080"),
                             ("files", "0.0.0.0:9443", "unix:/run/app.sock"))
    code, out, _ = _print(capsys, "--inbound", "-c", str(config), "--backend", "nft")
    assert code == 0 and "9443" not in out.split("<<'EOF'")[1]
    assert "\n# inbound listener files forwards to unix:/run/app.sock: no TCP port, nothing to redirect\n" in out


def test_egress_options_without_egress_are_a_usage_error(tmp_path, capsys):
    config = _inbound_config(tmp_path, ("web", "0.0.0.0:8443", "127.0.0.1:8080"))
    code, _, err = _print(capsys, "--inbound", "--uid", "1337", "-c", str(config), "--backend", "nft")
    assert code == 2 and "--uid, --port and --ipv6 are for the egress rules: add --egress" in err


def test_inbound_needs_a_config(monkeypatch, capsys):
    monkeypatch.delenv("PROXY_CONFIG", raising=False)
    code, _, err = _print(capsys, "--inbound", "--backend", "nft")
    assert code == 2 and "--inbound reads the inbound listeners from a config: pass -c FILE" in err


def test_remove_takes_everything_and_no_direction(capsys):
    assert main(["redirect", "--remove", "--inbound", "--backend", "nft"]) == 2
    assert "--remove takes away every rule --apply wrote, egress and inbound" in capsys.readouterr().err


def test_the_kubernetes_init_container_redirects_the_apps_port_to_the_tls_port(tmp_path, capsys):
    """The example manifests' `egress-redirect` args, run on their ConfigMap's sidecar config."""
    manifests = Path(__file__).parent.parent / "config" / "kubernetes"
    docs = [doc for name in ("web-deployment.yaml", "web-configmap.yaml")
            for doc in yaml.safe_load_all((manifests / name).read_text())]
    pod = next(doc for doc in docs if doc["kind"] == "Deployment")["spec"]["template"]["spec"]
    args = next(c for c in pod["initContainers"] if c["name"] == "egress-redirect")["args"]
    config = tmp_path / "config.yaml"
    config.write_text(next(doc for doc in docs if doc["kind"] == "ConfigMap")["data"]["config.yaml"])
    args[args.index("-c") + 1] = str(config)
    assert args[:2] == ["redirect", "--apply"] and "--inbound" in args and "--egress" in args
    assert main([args[0], "--print", *args[2:], "--backend", "nft"]) == 0
    out = capsys.readouterr().out
    assert "tcp dport 8080 redirect to :8443" in out and "meta l4proto tcp redirect to :15001" in out


# --- in a network namespace --------------------------------------------------------------------


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.skip("network namespaces and packet rules need root")
    name = f"redirect-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def _in(ns: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=60)


def _redirect(ns: str, *args: str) -> None:
    done = _in(ns, sys.executable, "-m", "proxy", "redirect", *args)
    assert done.returncode == 0, done.stderr


def _our_rules(ns: str) -> str:
    """Every rule of ours in ``ns``: our nftables tables whole, and the iptables lines naming our chains."""
    nft = "".join(_in(ns, "nft", "list", "table", family, "mtls_sidecar").stdout for family in ("ip", "ip6"))
    saved = "".join(_in(ns, tool).stdout for tool in ("iptables-save", "ip6tables-save"))
    ours = [line.strip() for line in saved.splitlines() if "MTLS_SIDECAR" in line]
    return "\n".join(sorted([*nft.splitlines(), *ours]))  # chains may be listed in another order once re-created


# Egress alone (--port, as before --inbound existed), and egress with inbound in the same tables.
DIRECTIONS = {
    "egress": ("--uid", "1337", "--port", "15001"),
    "egress+inbound": ("--egress", "--inbound", "--uid", "1337", "-c", "CONFIG"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("backend", [NFT, IPTABLES])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_apply_twice_leaves_one_copy_and_remove_leaves_nothing(netns, backend, direction, tmp_path):
    needed = {NFT: ("nft",), IPTABLES: ("iptables", "ip6tables", "iptables-save")}[backend]
    if any(shutil.which(tool) is None for tool in needed):
        pytest.fail(f"{backend} is missing: .ci/run installs nftables and iptables")
    config = _inbound_config(tmp_path, ("web", "0.0.0.0:8443", "127.0.0.1:8080"), ("api", "[::]:9443", "[::1]:9090"),
                             extra="egress: {listen: 127.0.0.1:15001}\n")
    args = [str(config) if arg == "CONFIG" else arg for arg in DIRECTIONS[direction]]
    _redirect(netns, "--apply", *args, "--backend", backend)
    once = _our_rules(netns)
    assert ("redirect to :8443" in once or "--to-ports 8443" in once) == (direction == "egress+inbound")
    _redirect(netns, "--apply", *args, "--backend", backend)
    assert _our_rules(netns) == once and once
    _redirect(netns, "--remove", "--backend", backend)
    _redirect(netns, "--remove", "--backend", backend)
    assert _our_rules(netns) == ""


@pytest.mark.e2e
def test_printed_script_does_what_apply_does(netns, tmp_path):
    config = _inbound_config(tmp_path, ("web", "0.0.0.0:8443", "127.0.0.1:8080"))
    args = ("--egress", "--inbound", "--uid", "1337", "--port", "15001", "-c", str(config))
    printed = _in(netns, sys.executable, "-m", "proxy", "redirect", "--print", *args)
    assert _in(netns, "sh", "-c", printed.stdout).returncode == 0
    by_script = _our_rules(netns)
    assert "redirect to :15001" in by_script and "redirect to :8443" in by_script
    _redirect(netns, "--remove")
    _redirect(netns, "--apply", *args)
    assert _our_rules(netns) == by_script
