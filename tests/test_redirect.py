"""`proxy redirect`: the printed script, and the rules it leaves in a real network namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from proxy.cli import main
from proxy.redirect import IPTABLES, NFT, Target, apply_plan, remove_plan, script

TARGET = Target(15001, ipv6=False, sidecar_uid=1337)


def test_nft_script_redirects_ipv4_and_refuses_ipv6_except_the_sidecar_and_local_addresses():
    text = script(apply_plan(NFT, TARGET), "comment")
    assert "table ip mtls_sidecar {" in text and "table ip6 mtls_sidecar {" in text
    assert text.count("meta skuid 1337 return") == 2 and text.count("fib daddr type local return") == 2
    assert "meta l4proto tcp redirect to :15001" in text and "meta l4proto tcp reject with tcp reset" in text
    # replaced whole in one transaction: what was there goes first
    assert text.index("delete table ip mtls_sidecar") < text.index("table ip mtls_sidecar {")


def test_ipv6_listener_redirects_ipv6_and_refuses_ipv4():
    text = script(apply_plan(NFT, Target(15001, ipv6=True, sidecar_uid=1337)), "comment")
    assert "table ip6 mtls_sidecar {\n  chain egress {\n    type nat" in text
    assert "table ip mtls_sidecar {\n  chain egress {\n    type filter" in text


def test_iptables_script_replaces_its_own_chain_and_one_jump():
    text = script(apply_plan(IPTABLES, TARGET), "comment")
    assert "iptables -w -t nat -A MTLS_SIDECAR -m owner --uid-owner 1337 -j RETURN" in text
    assert "iptables -w -t nat -A MTLS_SIDECAR -p tcp -j REDIRECT --to-ports 15001" in text
    assert "ip6tables -w -t filter -A MTLS_SIDECAR -p tcp -j REJECT --reject-with tcp-reset" in text
    assert text.count("-A OUTPUT") == 2
    assert text.index("-D OUTPUT") < text.index("-A OUTPUT"), "an earlier copy is removed first"


def test_print_reads_the_port_from_the_config(tmp_path, capsys):
    config = tmp_path / "sidecar.yaml"
    config.write_text("identity: {cert: c.pem, key: k.pem, bundle: b.pem}\negress: {listen: 127.0.0.1:15111}\n")
    assert main(["redirect", "--print", "--uid", "1337", "-c", str(config), "--backend", "nft"]) == 0
    assert "redirect to :15111" in capsys.readouterr().out


def test_config_without_egress_is_a_usage_error(tmp_path, capsys):
    config = tmp_path / "sidecar.yaml"
    config.write_text("identity: {cert: c.pem, key: k.pem, bundle: b.pem}\n")
    assert main(["redirect", "--print", "--uid", "1337", "-c", str(config)]) == 2
    assert "no egress section" in capsys.readouterr().err


def test_uid_is_required_to_apply(capsys):
    assert main(["redirect", "--apply", "--port", "15001"]) == 2
    assert "--uid is required" in capsys.readouterr().err


def test_remove_needs_no_uid():
    assert "delete table ip6 mtls_sidecar" in script(remove_plan(NFT), "comment")


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
    nft = _in(ns, "nft", "list", "ruleset").stdout
    saved = "".join(_in(ns, tool).stdout for tool in ("iptables-save", "ip6tables-save"))
    ours = (line.strip() for line in (nft + saved).splitlines() if "mtls_sidecar" in line.lower() or "redirect" in line)
    return "\n".join(sorted(ours))  # the listing order of chains may change when they are re-created


@pytest.mark.e2e
@pytest.mark.parametrize("backend", [NFT, IPTABLES])
def test_apply_twice_leaves_one_copy_and_remove_leaves_nothing(netns, backend):
    needed = {NFT: ("nft",), IPTABLES: ("iptables", "ip6tables", "iptables-save")}[backend]
    if any(shutil.which(tool) is None for tool in needed):
        pytest.fail(f"{backend} is missing: .ci/run installs nftables and iptables")
    _redirect(netns, "--apply", "--uid", "1337", "--port", "15001", "--backend", backend)
    once = _our_rules(netns)
    _redirect(netns, "--apply", "--uid", "1337", "--port", "15001", "--backend", backend)
    assert _our_rules(netns) == once and once
    _redirect(netns, "--remove", "--backend", backend)
    _redirect(netns, "--remove", "--backend", backend)
    assert _our_rules(netns) == ""


@pytest.mark.e2e
def test_printed_script_does_what_apply_does(netns):
    printed = _in(netns, sys.executable, "-m", "proxy", "redirect", "--print", "--uid", "1337", "--port", "15001")
    assert _in(netns, "sh", "-c", printed.stdout).returncode == 0
    by_script = _our_rules(netns)
    _redirect(netns, "--remove")
    _redirect(netns, "--apply", "--uid", "1337", "--port", "15001")
    assert _our_rules(netns) == by_script

