"""``proxy redirect``: the kernel rules that send every outbound TCP connection of the app to the
sidecar's egress listener, printed, applied or removed.

Theory of operation
-------------------
The rules live in the workload's network namespace (a pod, or a container whose namespace others
join). In the ``nat`` table's output hook, a locally created TCP connection is redirected to the
egress listener's port on loopback, unless it was opened by the sidecar's own uid (its upstream
connections must leave as they are, or they would come back to it) or goes to an address of this
host (loopback included: the app reaching the sidecar's ``outbound:`` ports or a local service).
The kernel keeps the original destination, which the listener reads with ``SO_ORIGINAL_DST``.

One address family is redirected: the family of ``egress.listen``. TCP of the other family is
refused outright (a TCP reset, with the same exceptions), so the app cannot step around the
sidecar by speaking IPv6; UDP is left alone (the app needs DNS).

Everything we add sits in one place of its own (nftables: table ``mtls_sidecar`` in each family;
iptables: chain ``MTLS_SIDECAR`` with one jump from ``OUTPUT``), so ``--remove`` takes exactly it
away and ``--apply`` replaces it whole: applying twice leaves one copy. nftables is used where the
``nft`` binary exists (the whole change is one atomic transaction), else ``iptables``/``ip6tables``.

A plan is a list of shell steps; ``--print`` shows the script ``--apply`` runs, step by step, so
``proxy redirect --print | sh`` does the same thing.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass

NFT, IPTABLES = "nft", "iptables"
TABLE = "mtls_sidecar"
CHAIN = "MTLS_SIDECAR"


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
    """What the rules serve: the egress listener's port and family, and the sidecar's uid."""

    port: int
    ipv6: bool  # the listener is on [::1]: redirect IPv6, refuse IPv4
    sidecar_uid: int

    def describe(self) -> str:
        redirected, refused = ("IPv6", "IPv4") if self.ipv6 else ("IPv4", "IPv6")
        loopback = "[::1]" if self.ipv6 else "127.0.0.1"
        return (f"{redirected} TCP from any uid but {self.sidecar_uid} (the sidecar) to a non-local address "
                f"goes to the egress listener on {loopback}:{self.port}; {refused} TCP is refused (reset)")


def pick_backend() -> str:
    if shutil.which("nft"):
        return NFT
    if shutil.which("iptables") and shutil.which("ip6tables"):
        return IPTABLES
    raise RedirectError("neither nft (apt package nftables) nor iptables and ip6tables (package iptables) "
                        "is installed")


def apply_plan(backend: str, target: Target) -> list[Step]:
    return _nft_apply(target) if backend == NFT else _iptables_apply(target)


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


def _nft_apply(target: Target) -> list[Step]:
    redirect_family, refuse_family = ("ip6", "ip") if target.ipv6 else ("ip", "ip6")
    keep = (f"    meta skuid {target.sidecar_uid} return\n"
            "    fib daddr type local return\n")
    text = (
        # "add" then "delete" then the definition, in one transaction: whatever was there is replaced.
        _nft_delete(redirect_family) + _nft_delete(refuse_family)
        + f"table {redirect_family} {TABLE} {{\n  chain egress {{\n"
        + "    type nat hook output priority -100; policy accept;\n"
        + keep + f"    meta l4proto tcp redirect to :{target.port}\n  }}\n}}\n"
        + f"table {refuse_family} {TABLE} {{\n  chain egress {{\n"
        + "    type filter hook output priority 0; policy accept;\n"
        + keep + "    meta l4proto tcp reject with tcp reset\n  }\n}\n"
    )
    return [Step(("nft", "-f", "-"), stdin=text)]


def _nft_remove() -> list[Step]:
    return [Step(("nft", "-f", "-"), stdin=_nft_delete("ip") + _nft_delete("ip6"))]


def _nft_delete(family: str) -> str:
    return f"add table {family} {TABLE}\ndelete table {family} {TABLE}\n"


# --- iptables ---------------------------------------------------------------------------------


def _iptables_apply(target: Target) -> list[Step]:
    redirect_tool, refuse_tool = ("ip6tables", "iptables") if target.ipv6 else ("iptables", "ip6tables")
    steps = _iptables_remove()
    for tool, table, verdict in (
        (redirect_tool, "nat", ("-j", "REDIRECT", "--to-ports", str(target.port))),
        (refuse_tool, "filter", ("-j", "REJECT", "--reject-with", "tcp-reset")),
    ):
        rules = (
            ("-m", "owner", "--uid-owner", str(target.sidecar_uid), "-j", "RETURN"),
            ("-m", "addrtype", "--dst-type", "LOCAL", "-j", "RETURN"),
            ("-p", "tcp", *verdict),
        )
        steps.append(Step((tool, "-w", "-t", table, "-N", CHAIN)))
        steps.extend(Step((tool, "-w", "-t", table, "-A", CHAIN, *rule)) for rule in rules)
        steps.append(Step((tool, "-w", "-t", table, "-A", "OUTPUT", "-p", "tcp", "-j", CHAIN)))
    return steps


def _iptables_remove() -> list[Step]:
    steps = []
    for tool in ("iptables", "ip6tables"):
        for table in ("nat", "filter"):
            jump = (tool, "-w", "-t", table, "-C", "OUTPUT", "-p", "tcp", "-j", CHAIN)
            exists = (tool, "-w", "-t", table, "-n", "-L", CHAIN)
            steps.append(Step((tool, "-w", "-t", table, "-D", "OUTPUT", "-p", "tcp", "-j", CHAIN), only_if=jump))
            steps.append(Step((tool, "-w", "-t", table, "-F", CHAIN), only_if=exists))
            steps.append(Step((tool, "-w", "-t", table, "-X", CHAIN), only_if=exists))
    return steps


# --- the command ------------------------------------------------------------------------------


def target_from_config(config_path, sidecar_uid: int) -> Target:
    """The egress listener of the sidecar config at ``config_path``. Raises RedirectError."""
    from proxy.config import ConfigError, load_config

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise RedirectError(f"{config_path}: not a valid config:\n" + "\n".join(exc.problems)) from None
    if config.egress is None:
        raise RedirectError(f"{config_path} has no egress section: there is no listener to redirect to")
    listen = config.egress.listen
    return Target(listen.port, ":" in listen.host, sidecar_uid)


def redirect_main(action: str, target: Target | None, backend: str | None, out, err) -> int:
    """``action``: print | apply | remove. Exit 0 done, 1 a command failed, 2 nothing to do it with."""
    try:
        backend = backend or pick_backend()
    except RedirectError as exc:
        print(f"proxy redirect: {exc}", file=err)
        return 2
    if action == "remove":
        steps, comment = remove_plan(backend), "Remove the egress redirection of the mTLS sidecar."
    else:
        assert target is not None
        steps, comment = apply_plan(backend, target), f"Egress redirection ({backend}): {target.describe()}."
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
