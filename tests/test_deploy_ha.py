"""The fleet variant of the CA in config/kubernetes/ha/: several `ca serve` replicas on PostgreSQL.

checkov already scans config/kubernetes/ recursively (tests/test_deploy.py); here every manifest of ha/ is
checked against the Kubernetes schemas, and for what makes it highly available."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_deploy import _run

HA = Path(__file__).resolve().parent.parent / "config" / "kubernetes" / "ha"
MANIFESTS = sorted(HA.glob("*.yaml"))


def _resource(kind: str, name: str) -> dict:
    docs = [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _env(container: dict) -> dict:
    return {item["name"]: item for item in container["env"]}


@pytest.mark.e2e
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_ha_manifest_is_valid_against_the_kubernetes_schemas_strictly(manifest):
    result = _run("kubernetes-validate", "--strict", str(manifest), timeout=60)
    lines = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
    assert result.returncode == 0, "\n".join(lines)
    assert lines and all(ln.startswith("INFO ") and " passed " in ln for ln in lines), "\n".join(lines)


def test_ha_deployment_runs_several_replicas_on_the_database_from_a_secret():
    deployment = _resource("Deployment", "ca")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert _env(container)["CA_DB"]["valueFrom"]["secretKeyRef"] == {"name": "ca-database", "key": "url"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "persistentVolumeClaim" not in str(volumes)  # no shared volume: the database holds the state
    assert volumes["ca-secrets"]["secret"]["secretName"] == "ca-passphrase"


def test_ha_disruption_budget_keeps_one_replica_serving():
    budget = _resource("PodDisruptionBudget", "ca")
    assert budget["spec"]["minAvailable"] == 1
    labels = _resource("Deployment", "ca")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_ha_init_job_creates_the_ca_in_the_database():
    (container,) = _resource("Job", "ca-init")["spec"]["template"]["spec"]["containers"]
    assert "init" in container["args"]
    assert _env(container)["CA_DB"]["valueFrom"]["secretKeyRef"]["name"] == "ca-database"
