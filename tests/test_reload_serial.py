"""Reloads run one at a time, and the requests made while one runs are answered by one more reload.

In process, on a real Sidecar object (not serving) with a real `ca init` identity. The config file is
made a named pipe, so the first reload waits in its worker thread until the test writes the config.
"""

from __future__ import annotations

import gc
import io
import json
import os
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from support.ca_cli import issue, run_ca
from support.certs import TD
from support.polling import wait_until_async
from support.processes import identity_yaml

from mtls.events import EventLog
from mtls.workers import WORKER_SWITCH_INTERVAL
from proxy.metrics import Metrics
from proxy.sidecar import Sidecar
from proxy.snapshot import StartupError, load_snapshot

pytestmark = pytest.mark.e2e  # each test runs `ca init` and `ca issue`


def idle_sidecar(tmp_path: Path, listeners: str = "") -> tuple[Sidecar, Path, io.StringIO]:
    """A Sidecar (not serving) on ``tmp_path/api.yaml``: a fresh identity from `ca init`, then
    ``listeners``. Returns it, its config path and its log."""
    ca_dir = tmp_path / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    config = tmp_path / "api.yaml"
    config.write_text(identity_yaml(issue(ca_dir, tmp_path / "api", f"spiffe://{TD}/ns/prod/sa/api")) + listeners)
    log = io.StringIO()
    return Sidecar(config, load_snapshot(config), EventLog("info", "json", log), Metrics()), config, log


def _open_writer(fifo) -> int | None:
    """The write end of ``fifo``, or None while nobody has opened it for reading yet."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


async def test_requests_during_a_reload_are_coalesced_into_the_next_one(tmp_path):
    sidecar, config, log = idle_sidecar(tmp_path, (
        f"inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:9\n    allow: [spiffe://{TD}/ns/a/*]\n"
    ))
    text = config.read_text()
    fifo = tmp_path / "api.fifo"
    os.mkfifo(fifo)
    os.replace(fifo, config)
    results = {}

    async def reload(trigger):
        results[trigger] = await sidecar.reload(trigger)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reload, "first")
        writer = await wait_until_async(lambda: _open_writer(config), what="the first reload's worker to open the pipe")
        nursery.start_soon(reload, "second")
        nursery.start_soon(reload, "third")
        await trio.testing.wait_all_tasks_blocked()
        assert "reloaded" not in log.getvalue()
        regular = tmp_path / "api.new"
        regular.write_text(text)
        os.replace(regular, config)  # the reloads after the first read a regular file
        os.set_blocking(writer, True)
        with open(writer, "wb", buffering=0) as pipe:
            pipe.write(text.encode())

    events = [json.loads(line) for line in log.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["reloaded", "reloaded"]
    assert events[0]["trigger"] == "first"
    assert sorted(events[1]["trigger"].split("; ")) == ["second", "third"]
    assert results == {"first": True, "second": True, "third": True}


async def test_an_unexpected_error_while_loading_fails_the_reload_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    sidecar, _, log = idle_sidecar(tmp_path)
    good = sidecar.snapshot

    def broken_loader(path, previous=None):
        raise RuntimeError("a library refused something we did not foresee")

    monkeypatch.setattr("proxy.sidecar.load_snapshot", broken_loader)
    assert await sidecar.reload("SIGHUP") is False
    assert sidecar.snapshot is good
    failed = [json.loads(line) for line in log.getvalue().splitlines()][-1]
    assert failed["event"] == "reload_failed"
    assert "RuntimeError: a library refused something we did not foresee" in failed["detail"]


@pytest.mark.parametrize("outcome", ["loaded", "failed"])
async def test_while_the_worker_loads_nothing_collects_and_the_loop_waits_little_for_the_gil(
    tmp_path, monkeypatch, outcome
):
    """A collection started by the worker would hold the GIL over every object of every open
    connection; a long switch interval would make each of the loop's system calls wait for it."""
    sidecar, _, _ = idle_sidecar(tmp_path)
    seen = {}

    def observed_loader(path, previous=None):
        seen.update(collecting=gc.isenabled(), switch_interval=sys.getswitchinterval())
        if outcome == "failed":
            raise StartupError([f"{path}:1: broken"])
        return load_snapshot(path, previous=previous)

    monkeypatch.setattr("proxy.sidecar.load_snapshot", observed_loader)
    interval = sys.getswitchinterval()
    assert gc.isenabled()

    assert await sidecar.reload("SIGHUP") is (outcome == "loaded")

    assert seen == {"collecting": False, "switch_interval": WORKER_SWITCH_INTERVAL}
    assert gc.isenabled() and sys.getswitchinterval() == interval


async def test_the_write_of_a_sync_or_renewal_runs_under_the_same_settings(tmp_path):
    """A sync's write loads the credentials with the fetched CRL first: as long as a reload with a large one."""
    sidecar, _, _ = idle_sidecar(tmp_path)
    seen = {}
    interval = sys.getswitchinterval()

    def observed_write():
        seen.update(collecting=gc.isenabled(), switch_interval=sys.getswitchinterval())

    assert await sidecar.install_identity(observed_write, trigger="sync from test") is True

    assert seen == {"collecting": False, "switch_interval": WORKER_SWITCH_INTERVAL}
    assert gc.isenabled() and sys.getswitchinterval() == interval
