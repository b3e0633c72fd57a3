"""Child processes, each in a process group of its own, and what /proc says about them.

Every process the benchmark starts is a ``Child``: started in a new session, so that one
``killpg`` reaches it and everything it forked (nginx workers), and so that a Ctrl-C in the
terminal reaches only the benchmark, which then stops every child itself (``stop_all``).
CPU time and RSS are summed over the child's process group.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TCP_LISTEN = "0A"


class Child:
    """One started process and its group. ``stop()`` ends the group; ``stop_all()`` ends every one."""

    running: set[Child] = set()

    def __init__(self, name: str, argv: list[str], log_path: Path, *, cwd: Path | None = None,
                 stdin=subprocess.DEVNULL, stdout=None):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            argv, stdin=stdin, stdout=self._log if stdout is None else stdout, stderr=self._log,
            cwd=cwd, start_new_session=True,
        )
        self.pid = self.proc.pid
        self.stop_result: dict | None = None
        Child.running.add(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        return sum(_cpu_ticks(pid) for pid in group_pids(self.pid)) / CLOCK_TICKS

    def rss_kib(self) -> int:
        return sum(_rss_kib(pid) for pid in group_pids(self.pid))

    def log_tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> dict:
        """SIGTERM the group, SIGKILL whatever is left after ``grace`` seconds.

        Returns how it went: was it still running, its exit code, whether SIGKILL was needed.
        """
        if self.stop_result is not None:
            return self.stop_result
        was_running = self.alive()
        killed = False
        if was_running:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                killed = True
                _signal_group(self.pid, signal.SIGKILL)  # the leader is not reaped yet: the group is ours
                self.proc.wait()
        for pid in group_pids(self.pid):  # members that outlived their leader
            killed = True
            _kill(pid, signal.SIGKILL)
        self._log.close()
        Child.running.discard(self)
        self.stop_result = {"was_running": was_running, "exit_code": self.proc.returncode, "killed": killed}
        return self.stop_result

    @classmethod
    def stop_all(cls) -> None:
        for child in list(cls.running):
            child.stop(grace=2.0)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3, the state, comes first)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def group_pids(pgid: int) -> list[int]:
    """Live processes (zombies excluded) whose process group is ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and fields[0] != "Z" and int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def _cpu_ticks(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[11]) + int(fields[12]) if fields else 0  # utime + stime, all threads


def _rss_kib(pid: int) -> int:
    try:
        match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0
    return int(match.group(1)) if match else 0


def listening(port: int) -> bool:
    """True when some socket is in LISTEN state on ``port`` (read from /proc/net/tcp, no connect)."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if local.endswith(suffix) and state == TCP_LISTEN:
                return True
    return False


def wait_listening(port: int, child: Child, timeout: float = 20.0) -> None:
    """Wait until ``child`` listens on ``port``; raise RuntimeError (with its log) if it dies or is late."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(port):
            return
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}: {child.log_tail()}")
        time.sleep(0.02)
    raise RuntimeError(f"{child.name} did not listen on port {port} within {timeout:g}s: {child.log_tail()}")


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_open_files(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (children inherit it) as far as allowed; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))  # root may raise the hard limit
            return want
        except (ValueError, OSError):
            want = hard
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return want
    return soft
