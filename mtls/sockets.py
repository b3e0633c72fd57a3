"""Plain sockets on trio: listening, non-blocking connect under a deadline, closing."""

from __future__ import annotations

import errno
import os
import socket

import trio

from mtls.endpoints import Endpoint, format_address


def listen_socket(endpoint: Endpoint, backlog: int = 4096) -> socket.socket:
    """Bind and listen (non-blocking). Raises OSError with the address in the message."""
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((endpoint.host, endpoint.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bound_address(sock: socket.socket) -> str:
    return format_address(sock.getsockname())


def close_socket(sock: socket.socket) -> None:
    """Close a socket that trio may be watching."""
    try:
        trio.lowlevel.notify_closing(sock)
    except Exception:
        pass
    sock.close()


async def _connect_one(family: int, addr) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(addr)
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"{os.strerror(err)} ({format_address(addr)})")
        return sock
    except BaseException:
        close_socket(sock)
        raise


async def connect(endpoint: Endpoint, timeout: float) -> socket.socket:
    """Connect to ``endpoint`` within ``timeout`` seconds; raise OSError saying why not."""
    with trio.move_on_after(timeout):
        if endpoint.kind == "unix":
            return await _connect_one(socket.AF_UNIX, endpoint.path)
        infos = await trio.socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for family, _type, _proto, _canon, addr in infos:
            try:
                return await _connect_one(family, addr)
            except OSError as exc:
                last = exc
        raise last or OSError(errno.EHOSTUNREACH, f"no address for {endpoint}")
    raise OSError(errno.ETIMEDOUT, f"connect to {endpoint} timed out after {timeout:g}s")


OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_BACKOFF = 0.05  # seconds between accept attempts while out of descriptors
ACCEPT_BATCH = 16  # connections taken from the backlog in a row before other tasks run


async def accept_loop(
    lsock: socket.socket, on_connection, log, *, listener: str, slots: trio.Semaphore | None = None
) -> None:
    """Accept on ``lsock`` (listening, non-blocking) until cancelled; hand each connection over.

    ``on_connection(sock, addr)`` is called synchronously with a non-blocking socket and owns it
    from then on: it must start a task that closes it, or close it itself. With ``slots``, one is
    acquired before each accept and handed over with the connection (its task releases it): while
    none is free, new connections wait in the kernel's accept backlog. The backlog is drained up to
    ``ACCEPT_BATCH`` connections at a time, so that under a flood of connection attempts a good
    client's connection does not wait one scheduling round per connection ahead of it. The one
    error policy of every listener (sidecar ports, admin, ``ca serve``):

    - out of descriptors or buffers: log ``accept_failed`` once per episode, retry every
      ``ACCEPT_BACKOFF`` seconds (the connection waits in the backlog meanwhile);
    - a connection aborted before we took it (ECONNABORTED, EPROTO): skip it silently;
    - anything else is a bug or a closed listener: it propagates.

    ``lsock`` is not closed here; its owner closes it after cancelling this loop.
    """
    in_a_row = 0
    while True:
        if in_a_row == ACCEPT_BATCH:
            await trio.lowlevel.checkpoint()
            in_a_row = 0
        if slots is not None:
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:
                await slots.acquire()
        sock, addr = await _accept(lsock, log, listener)  # waits (a checkpoint) only on an empty backlog
        sock.setblocking(False)
        on_connection(sock, addr)
        in_a_row += 1


async def _accept(lsock: socket.socket, log, listener: str):
    """The next connection on ``lsock``, retried under the policy of ``accept_loop``."""
    out_of_resources_logged = False
    while True:
        try:
            return lsock.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(lsock)
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES:
                if not out_of_resources_logged:
                    log.emit(
                        "error", "accept_failed", listener=listener,
                        detail=f"{exc.strerror}; new connections wait until descriptors free up",
                    )
                    out_of_resources_logged = True
                await trio.sleep(ACCEPT_BACKOFF)
            elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO):
                raise
