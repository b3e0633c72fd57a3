"""``proxy redirect``: the kernel rules that send every outbound TCP connection of the app to the
sidecar's egress listener and, with ``--inbound``, every connection from outside to the app's ports
to the inbound listeners; printed, applied or removed.

Theory of operation
-------------------
The rules live in the workload's network namespace (a pod, or a container whose namespace others
join). In the ``nat`` table's output hook, a locally created TCP connection is redirected to the
egress listener's port on loopback, unless it was opened by the sidecar's own uid (its upstream
connections must leave as they are, or they would come back to it) or goes to an address of this
host (loopback included: the app reaching the sidecar's ``outbound:`` ports or a local service).
The kernel keeps the original destination, which the listener reads with ``SO_ORIGINAL_DST``.

One address family is redirected: the family of ``egress.listen``. A TCP connection opened in the
other family is refused outright (its SYN answered by a reset, with the same exceptions), so the app
cannot step around the sidecar by speaking IPv6; replies to connections from outside pass (the
reset the inbound rules send, for one). UDP is left alone (the app needs DNS).

Inbound (``--inbound``), so that an app may listen on ``0.0.0.0``: an inbound listener forwards to
the app's port on loopback (``forward: 127.0.0.1:8080``). In the ``nat`` table's prerouting hook, a
TCP connection arriving from outside the namespace (not on ``lo``) to that port is redirected to the
listener's port, so it meets mTLS and the allowlist like any other. The sidecar's own forward to
``127.0.0.1:8080`` is created locally: it never passes prerouting, so it reaches the app (no loop).
Same family rule: the family of the listener's ``listen`` address is redirected; in the other, TCP
from outside to the app's port is refused (a reset, in the input hook), so an app on ``[::]`` cannot
be reached around the sidecar over the other family. A listener that forwards elsewhere than
loopback is refused: the app it protects is not in this namespace.

Everything we add sits in one place of its own (nftables: table ``mtls_sidecar`` in each family;
iptables: chain ``MTLS_SIDECAR`` with one jump from ``OUTPUT``, and ``MTLS_SIDECAR_IN`` with one
jump from ``PREROUTING`` or ``INPUT``), so ``--remove`` takes exactly it away (egress and inbound)
and ``--apply`` replaces it whole: applying twice leaves one copy, and one ``--apply`` states every
rule wanted. nftables is used where the ``nft`` binary exists (the whole change is one atomic
transaction), else ``iptables``/``ip6tables``.

A plan is a list of shell steps; ``--print`` shows the script ``--apply`` runs, step by step, so
``proxy redirect --print | sh`` does the same thing.
"""

from __future__ import annotations

import ipaddress
import shlex
import shutil
import subprocess
from dataclasses import dataclass

NFT, IPTABLES = "nft", "iptables"
TABLE = "mtls_sidecar"
CHAIN = "MTLS_SIDECAR"
INBOUND_CHAIN = "MTLS_SIDECAR_IN"
# The first packet of a connection opened here. Refusing only these leaves replies alone: an outside
# client's SYN-ACK, and the resets the kernel (or the inbound refusal) sends back.
NFT_OPENING = "tcp flags & (syn | ack) == syn"


class RedirectError(Exception):
    """A step failed or a tool is missing; the message names the command and what it said."""


@dataclass(frozen=True)
class Step:
    """One command. ``only_if``: run only when this check succeeds; ``unless``: only when it fails."""

    argv: tuple[str, ...]
    stdin: str | None = None
    only_if: tuple[str, ...] | None = None
    unless: tuple[str, ...] | None = None

    def shell(self) -> str:
        command = shlex.join(self.argv)
        if self.stdin is not None:
            command += " <<'EOF'\n" + self.stdin + "EOF"
        if self.only_if is not None:
            return f"if {shlex.join(self.only_if)} >/dev/null 2>&1; then {command}; fi"
        if self.unless is not None:
            return f"{shlex.join(self.unless)} >/dev/null 2>&1 || {command}"
        return command


@dataclass(frozen=True)
class Target:
    """What the egress rules serve: the egress listener's port and family, and the sidecar's uid."""

    port: int
    ipv6: bool  # the listener is on [::1]: redirect IPv6, refuse IPv4
    sidecar_uid: int

    def describe(self) -> str:
        redirected, refused = _families(self.ipv6)
        loopback = "[::1]" if self.ipv6 else "127.0.0.1"
        return (f"{redirected} TCP from any uid but {self.sidecar_uid} (the sidecar) to a non-local address "
                f"goes to the egress listener on {loopback}:{self.port}; {refused} TCP is refused (reset)")


@dataclass(frozen=True)
class InboundPort:
    """One inbound listener: TCP from outside to the app's port (its ``forward``) goes to its ``listen`` port."""

    listener: str
    app_port: int
    listen_port: int
    ipv6: bool  # the listener listens on IPv6: redirect IPv6, refuse IPv4 to the app's port

    def describe(self) -> str:
        redirected, refused = _families(self.ipv6)
        return (f"{redirected} TCP arriving from outside this namespace to port {self.app_port} goes to the "
                f"inbound listener {self.listener} on port {self.listen_port}; {refused} TCP to port {self.app_port} "
                "is refused (reset)")


@dataclass(frozen=True)
class Rules:
    """Everything one ``--apply`` writes: egress (None: none) and the inbound listeners' ports."""

    egress: Target | None = None
    inbound: tuple[InboundPort, ...] = ()
    notes: tuple[str, ...] = ()  # inbound listeners with nothing to redirect, and why

    def describe(self, backend: str) -> str:
        lines = []
        if self.egress is not None:
            lines.append(f"Egress redirection ({backend}): {self.egress.describe()}.")
        if self.inbound:
            lines.append(f"Inbound redirection ({backend}): "
                         + "; ".join(port.describe() for port in self.inbound) + ".")
        return "\n".join([*lines, *self.notes])


def _families(ipv6: bool) -> tuple[str, str]:
    """(the family redirected, the family refused)"""
    return ("IPv6", "IPv4") if ipv6 else ("IPv4", "IPv6")


def pick_backend() -> str:
    if shutil.which("nft"):
        return NFT
    if shutil.which("iptables") and shutil.which("ip6tables"):
        return IPTABLES
    raise RedirectError("neither nft (apt package nftables) nor iptables and ip6tables (package iptables) "
                        "is installed")


def apply_plan(backend: str, rules: Rules) -> list[Step]:
    return _nft_apply(rules) if backend == NFT else _iptables_apply(rules)


def remove_plan(backend: str) -> list[Step]:
    return _nft_remove() if backend == NFT else _iptables_remove()


def script(steps: list[Step], comment: str) -> str:
    """The shell script that does what ``run_steps(steps)`` does."""
    lines = ["#!/bin/sh", "set -e", *(f"# {line}" for line in comment.splitlines())]
    return "\n".join([*lines, *(step.shell() for step in steps)]) + "\n"


def run_steps(steps: list[Step]) -> None:
    """Run each step as ``script`` would; raise RedirectError at the first failing command."""
    for step in steps:
        if step.only_if is not None and not _succeeds(step.only_if):
            continue
        if step.unless is not None and _succeeds(step.unless):
            continue
        try:
            done = subprocess.run(step.argv, input=step.stdin, capture_output=True, text=True, timeout=60)
        except OSError as exc:
            raise RedirectError(f"{shlex.join(step.argv)}: {exc.strerror or exc}") from None
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip()
            raise RedirectError(f"{shlex.join(step.argv)} failed (exit {done.returncode}): {said}")


def _succeeds(argv: tuple[str, ...]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=60).returncode == 0
    except OSError:
        return False


# --- nftables ---------------------------------------------------------------------------------


def _nft_apply(rules: Rules) -> list[Step]:
    chains: dict[str, list[str]] = {"ip": [], "ip6": []}
    if rules.egress is not None:
        target = rules.egress
        redirect_family, refuse_family = ("ip6", "ip") if target.ipv6 else ("ip", "ip6")
        keep = (f"meta skuid {target.sidecar_uid} return", "fib daddr type local return")
        chains[redirect_family].append(_nft_chain(
            "egress", "type nat hook output priority -100", (*keep, f"meta l4proto tcp redirect to :{target.port}")))
        chains[refuse_family].append(_nft_chain(
            "egress", "type filter hook output priority 0", (*keep, f"{NFT_OPENING} reject with tcp reset")))
    for family, ipv6 in (("ip", False), ("ip6", True)):
        redirected = [port for port in rules.inbound if port.ipv6 == ipv6]
        refused = [port for port in rules.inbound if port.ipv6 != ipv6]
        if redirected:
            chains[family].append(_nft_chain("inbound", "type nat hook prerouting priority -100", (
                'iifname "lo" return',
                *(f"tcp dport {port.app_port} redirect to :{port.listen_port}" for port in redirected))))
        if refused:
            chains[family].append(_nft_chain("inbound_refused", "type filter hook input priority 0", (
                'iifname "lo" return', *(f"tcp dport {port.app_port} reject with tcp reset" for port in refused))))
    # "add" then "delete" then the definition, in one transaction: whatever was there is replaced.
    text = _nft_delete("ip") + _nft_delete("ip6")
    for family, body in chains.items():
        if body:
            text += f"table {family} {TABLE} {{\n" + "".join(body) + "}\n"
    return [Step(("nft", "-f", "-"), stdin=text)]


def _nft_chain(name: str, hook: str, rules: tuple[str, ...]) -> str:
    return f"  chain {name} {{\n    {hook}; policy accept;\n" + "".join(f"    {rule}\n" for rule in rules) + "  }\n"


def _nft_remove() -> list[Step]:
    return [Step(("nft", "-f", "-"), stdin=_nft_delete("ip") + _nft_delete("ip6"))]


def _nft_delete(family: str) -> str:
    return f"add table {family} {TABLE}\ndelete table {family} {TABLE}\n"


# --- iptables ---------------------------------------------------------------------------------

# (table, built-in chain, our chain jumped to from it): everything the iptables backend may write.
_JUMPS = (("nat", "OUTPUT", CHAIN), ("filter", "OUTPUT", CHAIN),
          ("nat", "PREROUTING", INBOUND_CHAIN), ("filter", "INPUT", INBOUND_CHAIN))


def _iptables_apply(rules: Rules) -> list[Step]:
    steps = _iptables_remove()
    if rules.egress is not None:
        target = rules.egress
        redirect_tool, refuse_tool = ("ip6tables", "iptables") if target.ipv6 else ("iptables", "ip6tables")
        for tool, table, verdict in (
            (redirect_tool, "nat", ("-j", "REDIRECT", "--to-ports", str(target.port))),
            (refuse_tool, "filter", ("--syn", "-j", "REJECT", "--reject-with", "tcp-reset")),
        ):
            steps.extend(_iptables_chain(tool, table, "OUTPUT", CHAIN, (
                ("-m", "owner", "--uid-owner", str(target.sidecar_uid), "-j", "RETURN"),
                ("-m", "addrtype", "--dst-type", "LOCAL", "-j", "RETURN"),
                ("-p", "tcp", *verdict),
            )))
    for tool, ipv6 in (("iptables", False), ("ip6tables", True)):
        redirected = [port for port in rules.inbound if port.ipv6 == ipv6]
        refused = [port for port in rules.inbound if port.ipv6 != ipv6]
        if redirected:
            steps.extend(_iptables_chain(tool, "nat", "PREROUTING", INBOUND_CHAIN, (
                ("-i", "lo", "-j", "RETURN"),
                *(("-p", "tcp", "--dport", str(port.app_port), "-j", "REDIRECT", "--to-ports", str(port.listen_port))
                  for port in redirected))))
        if refused:
            steps.extend(_iptables_chain(tool, "filter", "INPUT", INBOUND_CHAIN, (
                ("-i", "lo", "-j", "RETURN"),
                *(("-p", "tcp", "--dport", str(port.app_port), "-j", "REJECT", "--reject-with", "tcp-reset")
                  for port in refused))))
    return steps


def _iptables_chain(tool: str, table: str, hook: str, chain: str, rules) -> list[Step]:
    """Create ``chain`` with ``rules``, then the one jump to it from ``hook``."""
    return [
        Step((tool, "-w", "-t", table, "-N", chain)),
        *(Step((tool, "-w", "-t", table, "-A", chain, *rule)) for rule in rules),
        Step((tool, "-w", "-t", table, "-A", hook, "-p", "tcp", "-j", chain)),
    ]


def _iptables_remove() -> list[Step]:
    steps = []
    for tool in ("iptables", "ip6tables"):
        for table, hook, chain in _JUMPS:
            jump = (tool, "-w", "-t", table, "-C", hook, "-p", "tcp", "-j", chain)
            exists = (tool, "-w", "-t", table, "-n", "-L", chain)
            steps.append(Step((tool, "-w", "-t", table, "-D", hook, "-p", "tcp", "-j", chain), only_if=jump))
            steps.append(Step((tool, "-w", "-t", table, "-F", chain), only_if=exists))
            steps.append(Step((tool, "-w", "-t", table, "-X", chain), only_if=exists))
    return steps


# --- what to redirect, from the command line and the config --------------------------------------


def requested_rules(config_path, *, egress: bool, inbound: bool, uid: int | None, port: int | None,
                    ipv6: bool) -> Rules:
    """The rules the command line asks for: egress to ``port`` (else the config's ``egress.listen``),
    the config's inbound listeners. Raises RedirectError, a usage error."""
    if egress and uid is None:
        raise RedirectError("--uid is required: the sidecar's uid, whose connections are not redirected")
    if not egress and (uid is not None or port is not None or ipv6):
        raise RedirectError("--uid, --port and --ipv6 are for the egress rules: add --egress, or leave them out")
    config = None
    if inbound or (egress and port is None):
        if config_path is None:
            raise RedirectError("--inbound reads the inbound listeners from a config: pass -c FILE (or set "
                                "PROXY_CONFIG)" if inbound else
                                "pass --port PORT, or a config with an egress section (-c FILE or PROXY_CONFIG)")
        config = _load_config(config_path)
    target = None
    if egress:
        target = Target(port, ipv6, uid) if port is not None else _egress_target(config, uid)
    ports, notes = _inbound_ports(config) if inbound else ((), ())
    return Rules(target, ports, notes)


def _load_config(config_path):
    from proxy.config import ConfigError, load_config

    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise RedirectError(f"{config_path}: not a valid config:\n" + "\n".join(exc.problems)) from None


def _egress_target(config, sidecar_uid: int) -> Target:
    if config.egress is None:
        raise RedirectError(f"{config.source} has no egress section: there is no listener to redirect to")
    listen = config.egress.listen
    return Target(listen.port, ":" in listen.host, sidecar_uid)


def _inbound_ports(config) -> tuple[tuple[InboundPort, ...], tuple[str, ...]]:
    """Each inbound listener's app port and listen port; notes for those with no TCP port to redirect."""
    ports: list[InboundPort] = []
    notes: list[str] = []
    taken: dict[int, str] = {}
    for listener in config.inbound:
        where = f"{config.source}: inbound listener {listener.name}"
        forward, listen = listener.forward, listener.listen
        if forward.kind == "unix":
            notes.append(f"inbound listener {listener.name} forwards to {forward}: no TCP port, nothing to redirect")
            continue
        if not _is_loopback(forward.host):
            raise RedirectError(f"{where} forwards to {forward}, not to loopback: --inbound protects an app in "
                                "this network namespace, reached on 127.0.0.1 or [::1]; forward there, or leave "
                                "--inbound out")
        if ipaddress.ip_address(listen.host).is_loopback:
            raise RedirectError(f"{where} listens on {listen}, a loopback address: connections redirected from "
                                "outside arrive on this namespace's own address; listen on 0.0.0.0 or [::]")
        if listen.port == 0:
            raise RedirectError(f"{where} listens on port 0 (any free port): the redirect needs the port; "
                                "give it one")
        if forward.port in taken:
            raise RedirectError(f"{where} and inbound listener {taken[forward.port]} both forward to port "
                                f"{forward.port}: a connection to it can be redirected to one listener only")
        taken[forward.port] = listener.name
        ports.append(InboundPort(listener.name, forward.port, listen.port, ":" in listen.host))
    if not ports:
        raise RedirectError(f"{config.source} has no inbound listener forwarding to a TCP port: --inbound has "
                            "nothing to redirect")
    return tuple(ports), tuple(notes)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a DNS name
        return False


# --- the command ------------------------------------------------------------------------------


def redirect_main(action: str, rules: Rules | None, backend: str | None, out, err) -> int:
    """``action``: print | apply | remove. Exit 0 done, 1 a command failed, 2 nothing to do it with."""
    try:
        backend = backend or pick_backend()
    except RedirectError as exc:
        print(f"proxy redirect: {exc}", file=err)
        return 2
    if action == "remove":
        steps, comment = remove_plan(backend), "Remove the egress and inbound redirection of the mTLS sidecar."
    else:
        assert rules is not None
        steps, comment = apply_plan(backend, rules), rules.describe(backend)
    if action == "print":
        out.write(script(steps, comment))
        return 0
    try:
        run_steps(steps)
    except RedirectError as exc:
        print(f"proxy redirect: {exc}", file=err)
        return 1
    print(f"proxy redirect: {'removed' if action == 'remove' else 'applied'} ({backend})", file=out)
    return 0
