"""Floods for the under-attack tests: idle TCP connections held against a port, the raised descriptor
limit they need, and the figures a good client's timings are reported with."""

from __future__ import annotations

import resource
import socket
import statistics
from dataclasses import dataclass


def raise_nofile(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to at least ``needed`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise AssertionError(f"RLIMIT_NOFILE hard limit {hard} < {needed}: cannot hold the flood")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class IdleFlood:
    """``count`` TCP connections to ``port`` from ``source`` that never send a byte, held until ``close``."""

    def __init__(self, port: int, count: int, source: str = "127.0.0.1"):
        raise_nofile(count + 1024)
        self.sockets: list[socket.socket] = []
        try:
            for _ in range(count):
                sock = socket.socket()
                self.sockets.append(sock)
                sock.bind((source, 0))
                sock.settimeout(10)
                sock.connect(("127.0.0.1", port))  # completes from the kernel's backlog
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


@dataclass(frozen=True)
class Timings:
    """A good client's results during a flood: successes and per-attempt seconds."""

    attempts: int
    successes: int
    seconds: tuple[float, ...]

    @property
    def success_rate(self) -> float:
        return self.successes / self.attempts

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.seconds)
        if len(ordered) == 1:
            return ordered[0]
        return statistics.quantiles(ordered, n=100, method="inclusive")[round(fraction * 100) - 1]

    def summary(self) -> str:
        return (
            f"{self.successes}/{self.attempts} ok ({self.success_rate:.0%}), "
            f"p50 {self.percentile(0.50) * 1000:.1f} ms, p99 {self.percentile(0.99) * 1000:.1f} ms"
        )
