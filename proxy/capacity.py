"""Whether a config's limits fit the process: open-file descriptors and memory.

The per-connection costs are measured figures (``bench/idle_conns.py`` for the unauthenticated
stages; an established connection holds two sockets, an OpenSSL object and relay buffers), on
x86-64 Linux with Python 3.11; they are estimates for a budget, not guarantees.
"""

from __future__ import annotations

import resource
from pathlib import Path

from proxy.config import Config

BASE_KIB = 48 * 1024  # RSS of a started sidecar with no connection
ESTABLISHED_KIB = 50  # an authorized, relaying connection (`make bench`: 47-50 KiB per side)
HANDSHAKING_KIB = 57  # a handshake in progress (an OpenSSL object)
WAITING_KIB = 7  # an accepted connection whose first TLS record has not arrived
SPARE_DESCRIPTORS = 64  # the config, identity files, admin connections, the event loop's own
CGROUP_MEMORY_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (what an unprivileged process may); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup in bytes (v2, else v1), or None when there is none to read."""
    for path in CGROUP_MEMORY_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 says "no limit" with a huge number, v2 with "max"
            return int(text)
        return None
    return None


def descriptors_needed(config: Config) -> int:
    """Two per established connection, one per unauthenticated one, plus listeners and spares."""
    listeners = len(config.inbound) + len(config.outbound) + (config.admin is not None) + (config.egress is not None)
    hs = config.limits.handshakes
    pending = len(config.inbound) * (hs.waiting + hs.per_listener)
    return 2 * config.limits.max_connections + pending + listeners + SPARE_DESCRIPTORS


def memory_needed_kib(config: Config) -> int:
    """RSS with every limit reached: max_connections established, every handshake budget full."""
    hs = config.limits.handshakes
    per_listener = hs.waiting * WAITING_KIB + hs.per_listener * HANDSHAKING_KIB
    return BASE_KIB + config.limits.max_connections * ESTABLISHED_KIB + len(config.inbound) * per_listener


def capacity_warnings(config: Config, open_files: int | None, memory_bytes: int | None) -> list[str]:
    """What cannot be reached with ``open_files`` descriptors or fit in ``memory_bytes``, in words."""
    warnings = []
    limits = config.limits
    if open_files is not None and open_files != resource.RLIM_INFINITY:
        needed = descriptors_needed(config)
        if needed > open_files:
            warnings.append(
                f"limits.max_connections {limits.max_connections} cannot be reached: it needs about {needed} open "
                f"files (two per relayed connection, plus handshakes, listeners and files) and the limit is "
                f"{open_files}; lower max_connections or raise the open-file limit (ulimit -n, LimitNOFILE)"
            )
    if memory_bytes is not None:
        needed_kib = memory_needed_kib(config)
        if needed_kib * 1024 > memory_bytes:
            fits = max(0, (memory_bytes // 1024 - (needed_kib - limits.max_connections * ESTABLISHED_KIB))
                       // ESTABLISHED_KIB)
            warnings.append(
                f"limits do not fit in {memory_bytes // (1024 * 1024)} MiB of memory: max_connections "
                f"{limits.max_connections} at about {ESTABLISHED_KIB} KiB each, plus full handshake budgets, needs "
                f"about {needed_kib // 1024} MiB; about {fits} connections fit: lower limits.max_connections "
                "or raise the memory limit"
            )
    return warnings
