"""Who may hold what, as counts: unauthenticated connections per inbound listener, and established slots.

Pure bookkeeping (no sockets, no clock): the sidecar and the handlers act on what these return.

Theory of operation
-------------------
An accepted inbound connection is *waiting* until its first TLS record has arrived (a socket and a
task, a few KiB), then *handshaking* (an OpenSSL object, about 50 KiB) until the peer is authorized
or refused. ``PendingBudget`` bounds, per listener, how many wait and how many handshake, and how
many of both come from one source address. A full bound does not refuse the newcomer: the oldest
connection under that bound yields to it. A stalled attacker's connections are always older than a
good peer's, which finishes its handshake in milliseconds, so an attacker who holds every slot only
ever pushes out its own connections, and a good peer still gets through (refusing the newcomer
would instead hand the port to whoever filled it first). The per-source bound makes one address
evict its own connections before anybody else's.

``ConnectionSlots`` counts established connections: an inbound one takes its slot only once its
peer is authorized, an outbound one at accept. So a flood of unauthenticated connections on an
inbound port never takes a slot that an outbound listener or an authorized peer needs.
"""

from __future__ import annotations

from collections.abc import Hashable

# Why a connection had to yield, as the ``budget`` label of sidecar_handshake_evictions_total.
PER_SOURCE = "per_source"
WAITING = "waiting"
PER_LISTENER = "per_listener"


class PendingBudget:
    """The unauthenticated connections of one inbound listener, oldest first in each group.

    Items are any hashable (the sidecar uses its ``Tracked`` connections). ``arrive`` and
    ``start_handshake`` return the items that must yield, each with the budget that was full; those
    are already out of the budget. ``leave`` may be called for an item that already left.
    """

    __slots__ = ("_waiting", "_handshaking", "_by_source", "_source_of")

    def __init__(self) -> None:
        # Plain dicts keep insertion order: the first key is the oldest.
        self._waiting: dict[Hashable, None] = {}
        self._handshaking: dict[Hashable, None] = {}
        self._by_source: dict[str, dict[Hashable, None]] = {}
        self._source_of: dict[Hashable, str] = {}

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def handshaking(self) -> int:
        return len(self._handshaking)

    def from_source(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    def arrive(self, item: Hashable, source: str, *, per_source: int, waiting: int) -> list[tuple[Hashable, str]]:
        """A connection was accepted from ``source``: it waits for its first record."""
        evicted = []
        same = self._by_source.get(source)
        while same and len(same) >= per_source:
            evicted.append((self._oldest(same), PER_SOURCE))
        while len(self._waiting) >= waiting:
            evicted.append((self._oldest(self._waiting), WAITING))
        self._waiting[item] = None
        self._by_source.setdefault(source, {})[item] = None
        self._source_of[item] = source
        return evicted

    def start_handshake(self, item: Hashable, *, per_listener: int) -> list[tuple[Hashable, str]]:
        """``item``'s first record arrived: it moves from waiting to handshaking (if it is still here)."""
        if item not in self._waiting:  # it already yielded
            return []
        del self._waiting[item]
        evicted = []
        while len(self._handshaking) >= per_listener:
            evicted.append((self._oldest(self._handshaking), PER_LISTENER))
        self._handshaking[item] = None
        return evicted

    def leave(self, item: Hashable) -> None:
        """``item`` is authorized, refused or closed: it no longer counts."""
        source = self._source_of.pop(item, None)
        if source is None:
            return
        self._waiting.pop(item, None)
        self._handshaking.pop(item, None)
        same = self._by_source[source]
        del same[item]
        if not same:
            del self._by_source[source]

    def _oldest(self, group: dict[Hashable, None]) -> Hashable:
        item = next(iter(group))
        self.leave(item)
        return item


class ConnectionSlots:
    """Established connections, per listener and over all of them."""

    __slots__ = ("total", "_per_listener")

    def __init__(self) -> None:
        self.total = 0
        self._per_listener: dict[str, int] = {}

    def on(self, listener: str) -> int:
        return self._per_listener.get(listener, 0)

    def refusal(self, listener: str, max_connections: int, per_listener: int | None) -> str | None:
        """Why ``listener`` cannot take one more connection now, or None if it can."""
        if self.total >= max_connections:
            return f"{self.total} connections established, limits.max_connections is {max_connections}"
        held = self.on(listener)
        if per_listener is not None and held >= per_listener:
            return f"{held} connections established on {listener}, limits.per_listener is {per_listener}"
        return None

    def take(self, listener: str) -> None:
        self.total += 1
        self._per_listener[listener] = self.on(listener) + 1

    def give_back(self, listener: str) -> None:
        self.total -= 1
        self._per_listener[listener] -= 1
