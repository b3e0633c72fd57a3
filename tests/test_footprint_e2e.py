"""What `proxy run` loads: what its config needs, not what other commands or sections would.

Every library a sidecar imports stays resident for its whole life, so a role that does not use one
should not load it: dnspython only with an egress section (its resolver), importlib.metadata only
for ``proxy --version``. Python's own import profile (PYTHONPROFILEIMPORTTIME, on stderr, which is
the sidecar's log file here) says what was loaded.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from support.certs import FRONTEND
from support.processes import Sidecar, inbound_config

pytestmark = pytest.mark.e2e


def imported_modules(side: Sidecar) -> set[str]:
    """The modules the profile lists (``import time: SELF | CUMULATIVE | NAME`` lines)."""
    return {
        line.split("|")[2].strip()
        for line in side.log_path.read_text().splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def test_a_sidecar_without_egress_loads_neither_dnspython_nor_package_metadata(tmp_path, ids):
    config = inbound_config(ids["api"], "127.0.0.1:9", [FRONTEND], extra="admin: {listen: 127.0.0.1:0}\n")
    side = Sidecar(tmp_path, "api", config, env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        side.wait_ready()
        imported = imported_modules(side)
    finally:
        side.stop()
    assert {"trio", "proxy.sidecar", "prometheus_client"} <= imported  # the profile covers the whole start
    assert not {name for name in imported if name == "dns" or name.startswith("dns.")}
    assert "importlib.metadata" not in imported


def test_version_is_looked_up_when_asked():
    done = subprocess.run([sys.executable, "-m", "proxy", "--version"], check=False, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    name, version = done.stdout.split()
    assert name == "proxy" and version[0].isdigit()
