"""The image and the manifests: Dockerfile, config/kubernetes/ and config/examples/.

No container engine or cluster exists where the suite runs, so these artifacts are checked offline:
hadolint and checkov lint the Dockerfile, kubernetes-validate checks every manifest against the
Kubernetes schemas, checkov runs its Kubernetes checks, and the sidecar configs (the one embedded in
the ConfigMap and every example) are loaded with the validator behind ``proxy check``.

The lint tools are not in the project's venv: the Makefile installs them into .venv-tools, and `make test`
puts that on PATH (support.tools finds them). A missing tool fails its test (a broken set-up, not a reason
to skip); only a binary that cannot run on this platform skips. checkov is slow (a few seconds per run),
so it runs once per framework.
"""

from __future__ import annotations

import errno
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from support.tools import tool

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "config" / "kubernetes"
EXAMPLES = ROOT / "config" / "examples"
MANIFESTS = sorted(K8S.glob("*.yaml"))
EXAMPLE_CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
SIDECAR_CONFIG_PATH = Path("/etc/sidecar/config.yaml")  # where the ConfigMap is mounted in the pod
NAMESPACE = "mtls-demo"
EGRESS_REDIRECT = "egress-redirect"  # the init container that runs `proxy redirect --apply`


# --- running the tools -------------------------------------------------------------------------


def _run(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [tool(name), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except OSError as exc:
        if exc.errno == errno.ENOEXEC:
            pytest.skip(f"the {name} binary cannot run on this platform: {exc}")
        raise


def _checkov(directory: Path, framework: str) -> dict:
    """One checkov run (offline) of one framework over a directory, as its JSON report."""
    result = _run(
        "checkov", "-d", str(directory), "--framework", framework,
        "--compact", "--skip-download", "--output", "json",
    )
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no JSON report (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    report["returncode"] = result.returncode
    return report


@pytest.fixture(scope="module")
def checkov_dockerfile() -> dict:
    return _checkov(ROOT, "dockerfile")


@pytest.fixture(scope="module")
def checkov_kubernetes() -> dict:
    return _checkov(K8S, "kubernetes")


def _assert_checkov_passed(report: dict, what: str) -> None:
    summary = report.get("summary", report)  # with nothing to scan, checkov prints the summary alone
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']}:{c['file_line_range'][0]})"
        for c in report.get("results", {}).get("failed_checks", [])
    ]
    assert not failed, f"checkov {what} checks failed:\n" + "\n".join(failed)
    assert summary["parsing_errors"] == 0, f"checkov could not parse {summary['parsing_errors']} file(s)"
    assert summary["passed"] > 0, f"checkov ran no {what} check at all: {summary}"
    assert report["returncode"] == 0, f"checkov exited {report['returncode']}"


# --- reading the artifacts ---------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    pairs = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        pairs.append((keyword.upper(), " ".join(rest.split())))
    return pairs


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def _documents() -> list[dict]:
    docs = []
    for path in MANIFESTS:
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def _resource(kind: str, name: str) -> dict:
    found = [d for d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in {K8S}, found {len(found)}"
    return found[0]


def _workloads() -> list[dict]:
    return [d for d in _documents() if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")]


def _all_containers(workload: dict) -> list[dict]:
    pod = workload["spec"]["template"]["spec"]
    return pod.get("initContainers", []) + pod["containers"]


def _web_pod() -> dict:
    return _resource("Deployment", "web")["spec"]["template"]["spec"]


def _sidecar() -> dict:
    sidecars = [c for c in _web_pod().get("initContainers", []) if c.get("restartPolicy") == "Always"]
    assert len(sidecars) == 1, "the web Deployment must inject exactly one native sidecar"
    return sidecars[0]


def _embedded_config_text() -> str:
    return _resource("ConfigMap", "web-sidecar-config")["data"][SIDECAR_CONFIG_PATH.name]


def _parse(text: str, source: Path):
    from proxy.config import ConfigError, parse_config

    try:
        return parse_config(text, source)
    except ConfigError as exc:
        pytest.fail(f"{source} is not a valid sidecar config:\n" + "\n".join(exc.problems))


# --- Dockerfile --------------------------------------------------------------------------------


@pytest.mark.e2e
def test_dockerfile_has_no_hadolint_warnings():
    result = _run("hadolint", "--no-color", "--failure-threshold", "warning", str(DOCKERFILE))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.e2e
def test_dockerfile_passes_checkov_dockerfile_checks(checkov_dockerfile):
    _assert_checkov_passed(checkov_dockerfile, "Dockerfile")


def test_dockerfile_is_multi_stage_on_a_version_pinned_slim_bookworm_python():
    bases = [args.split()[0] for keyword, args in _dockerfile_instructions() if keyword == "FROM"]
    assert len(bases) >= 2, "a builder stage and a runtime stage"
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base


def test_runtime_stage_copies_only_the_venv_and_runs_nothing():
    runtime = _stages()[-1]
    copies = [args for keyword, args in runtime if keyword in ("COPY", "ADD")]
    assert copies and all(args.startswith("--from=") for args in copies), copies
    assert any(args.split()[1] == "/opt/venv" for args in copies), "the final stage copies /opt/venv"
    assert not [args for keyword, args in runtime if keyword == "RUN"], "no RUN (so no shell) in the final stage"


def test_egress_redirect_target_adds_nftables_and_is_what_the_init_container_runs():
    """`proxy redirect --apply` drives nft: its image is a target of its own, never the default one."""
    stages = {args.split()[-1]: stage for stage in _stages() for keyword, args in stage[:1]}
    redirect = stages["egress-redirect"]
    installs = " ".join(args for keyword, args in redirect if keyword == "RUN")
    assert re.search(r"apt-get install .*\bnftables=\S+", installs), "nftables, version pinned"
    assert _stages()[-1] is not redirect and "nftables" not in str(_stages()[-1]), "the sidecar image has no nft"
    init = _web_pod()["initContainers"][0]
    assert init["image"].split("/")[-1].startswith("mtls-sidecar-redirect:")


def test_image_runs_as_numeric_non_root_user_with_proxy_entrypoint_and_healthcheck():
    runtime = dict(_stages()[-1])  # the last of each instruction wins, as in Docker
    user, _, group = runtime["USER"].partition(":")
    assert user.isdigit() and int(user) != 0, runtime["USER"]
    assert group == "" or (group.isdigit() and int(group) != 0), runtime["USER"]
    assert json.loads(runtime["ENTRYPOINT"]) == ["proxy"]
    assert json.loads(runtime["CMD"]) == ["run", "-c", str(SIDECAR_CONFIG_PATH)]
    health = runtime["HEALTHCHECK"]
    assert json.loads(health[health.index("CMD ") + 4:]) == ["proxy", "health", "--admin", "127.0.0.1:15000"]
    assert {"8443", "15000"} <= set(runtime["EXPOSE"].split())


def test_dockerignore_admits_only_the_sources_of_the_wheel():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "an allow-list: everything is excluded first"
    admitted = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert admitted == {"pyproject.toml", "README.md", "ca", "mtls", "proxy"}


# --- Kubernetes manifests ----------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_against_the_kubernetes_schemas_strictly(manifest):
    result = _run("kubernetes-validate", "--strict", str(manifest), timeout=60)
    lines = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
    assert result.returncode == 0, "\n".join(lines)
    # A kind without a schema is only a warning to the tool; here it is a failure.
    assert lines and all(ln.startswith("INFO ") and " passed " in ln for ln in lines), "\n".join(lines)


@pytest.mark.e2e
def test_manifests_pass_checkov_kubernetes_checks(checkov_kubernetes):
    _assert_checkov_passed(checkov_kubernetes, "Kubernetes")


@pytest.mark.e2e
def test_every_skipped_checkov_check_states_its_reason(checkov_dockerfile, checkov_kubernetes):
    for report in (checkov_dockerfile, checkov_kubernetes):
        for check in report.get("results", {}).get("skipped_checks", []):
            reason = check["check_result"].get("suppress_comment", "")
            assert len(reason) > 20 and reason != "No comment provided", (check["check_id"], check["resource"])


def test_every_resource_is_namespaced_outside_default():
    for doc in _documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, (doc["kind"], doc["metadata"]["name"])


def test_sidecar_is_a_native_sidecar_init_container_on_a_pinned_image():
    sidecar = _sidecar()
    assert sidecar["restartPolicy"] == "Always"
    image = sidecar["image"]
    assert "@sha256:" in image or re.search(r":[0-9][\w.-]*$", image), f"not pinned: {image}"
    assert not image.endswith(":latest")
    assert sidecar.get("args", ["run", "-c", str(SIDECAR_CONFIG_PATH)]) == ["run", "-c", str(SIDECAR_CONFIG_PATH)]


@pytest.mark.parametrize("kind,name", [("Deployment", "web"), ("Deployment", "ca"), ("Job", "ca-init")])
def test_workload_is_read_only_non_root_without_capabilities_or_token(kind, name):
    workload = _resource(kind, name)
    pod = workload["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod.get("serviceAccountName", "default") != "default"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in _all_containers(workload):
        if container["name"] == EGRESS_REDIRECT:
            continue  # root with NET_ADMIN for one command: see test_egress_redirect_...
        sc = container["securityContext"]
        label = f"{name}/{container['name']}"
        assert sc["readOnlyRootFilesystem"] is True, label
        assert sc["runAsNonRoot"] is True, label
        assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0, label
        assert sc["allowPrivilegeEscalation"] is False, label
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), label
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", label


def test_egress_redirect_init_container_alone_adds_net_admin_and_runs_before_the_sidecar():
    pod = _web_pod()
    init = pod["initContainers"]
    assert init[0]["name"] == EGRESS_REDIRECT and "restartPolicy" not in init[0], "runs once, before the others"
    assert [c["name"] for c in (*init, *pod["containers"])].count(EGRESS_REDIRECT) == 1
    sc = init[0]["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert all(m["mountPath"] != "/run/identity" for m in init[0].get("volumeMounts", [])), "no identity for it"
    args = init[0]["args"]
    assert args[:2] == ["redirect", "--apply"]
    sidecar_uid = _sidecar()["securityContext"]["runAsUser"]
    assert args[args.index("--uid") + 1] == str(sidecar_uid), "the rules exempt the sidecar's own uid"
    assert all(c["securityContext"]["runAsUser"] != sidecar_uid for c in pod["containers"]), \
        "the app must not share the sidecar's uid, or its connections would escape the redirect"
    config = _parse(_embedded_config_text(), SIDECAR_CONFIG_PATH)
    assert config.egress is not None and config.egress.mode == "enforce"
    assert args[args.index("-c") + 1] == str(SIDECAR_CONFIG_PATH)


def test_every_container_has_resource_requests_and_limits():
    for workload in _workloads():
        for container in _all_containers(workload):
            resources = container["resources"]
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[section]), (container["name"], section)


def test_sidecar_startup_and_readiness_probes_ask_readyz_on_the_admin_port():
    config = _parse(_embedded_config_text(), SIDECAR_CONFIG_PATH)
    sidecar = _sidecar()
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    for probe_name in ("startupProbe", "readinessProbe"):
        probe = sidecar[probe_name]["httpGet"]
        assert probe["path"] == "/readyz", probe_name
        port = ports.get(probe["port"], probe["port"])
        assert port == config.admin.listen.port, probe_name
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The kubelet probes the pod IP from the node, so admin must listen on all addresses in the pod.
    assert config.admin.listen.host in ("0.0.0.0", "::")


def test_identity_is_a_secret_and_config_a_configmap_both_mounted_read_only():
    pod = _web_pod()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in _sidecar()["volumeMounts"]}
    identity, config = mounts["/run/identity"], mounts[str(SIDECAR_CONFIG_PATH.parent)]
    assert identity["readOnly"] is True and config["readOnly"] is True
    assert "secret" in volumes[identity["name"]]
    assert volumes[config["name"]]["configMap"]["name"] == "web-sidecar-config"
    assert all("/run/identity" not in str(m.get("mountPath")) for c in pod["containers"] for m in c.get("volumeMounts", [])), \
        "only the sidecar sees the identity"
    parsed = _parse(_embedded_config_text(), SIDECAR_CONFIG_PATH)
    for path in (parsed.identity.cert, parsed.identity.key, parsed.identity.bundle):
        assert path.parent == Path("/run/identity"), path


def test_embedded_sidecar_config_loads_with_the_config_validator():
    config = _parse(_embedded_config_text(), SIDECAR_CONFIG_PATH)
    assert config.inbound and config.outbound and config.admin is not None


def test_termination_grace_period_outlasts_the_sidecar_drain():
    config = _parse(_embedded_config_text(), SIDECAR_CONFIG_PATH)
    assert _web_pod()["terminationGracePeriodSeconds"] > config.timeouts.drain


def test_network_policy_admits_only_the_sidecar_tls_port():
    config = _parse(_embedded_config_text(), SIDECAR_CONFIG_PATH)
    tls_ports = {listener.listen.port for listener in config.inbound}
    policy = _resource("NetworkPolicy", "web")["spec"]
    pod_labels = _resource("Deployment", "web")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert "Ingress" in policy["policyTypes"]
    opened = {(p.get("protocol", "TCP"), p["port"]) for rule in policy["ingress"] for p in rule["ports"]}
    assert opened == {("TCP", port) for port in tls_ports}
    assert config.admin.listen.port not in {port for _, port in opened}


def test_app_service_targets_the_sidecar_tls_port():
    config = _parse(_embedded_config_text(), SIDECAR_CONFIG_PATH)
    service = _resource("Service", "web")["spec"]
    assert [p["targetPort"] for p in service["ports"]] == [config.inbound[0].listen.port]
    assert service["selector"].items() <= _resource("Deployment", "web")["spec"]["template"]["metadata"]["labels"].items()


def test_ca_serve_runs_behind_a_service_with_state_on_a_volume():
    deployment = _resource("Deployment", "ca")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["ca"] and container["args"][-3:] == ["serve", "--listen", "0.0.0.0:8443"]
    state_dir = {e["name"]: e["value"] for e in container["env"]}["CA_DIR"]
    mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounted[state_dir]]["persistentVolumeClaim"]["claimName"]
    assert _resource("PersistentVolumeClaim", claim)
    service = _resource("Service", "ca")["spec"]
    assert service["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert [p["port"] for p in service["ports"]] == [8443]


# --- example configs ---------------------------------------------------------------------------


def test_the_three_example_shapes_exist():
    assert {p.name for p in EXAMPLE_CONFIGS} >= {"one-inbound.yaml", "client-two-upstreams.yaml", "audit-rollout.yaml"}


@pytest.mark.parametrize("example", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_example_config_loads_with_the_config_validator(example):
    _parse(example.read_text(), example)


def test_examples_have_the_shape_their_names_promise():
    one = _parse((EXAMPLES / "one-inbound.yaml").read_text(), EXAMPLES / "one-inbound.yaml")
    assert len(one.inbound) == 1 and not one.outbound
    client = _parse((EXAMPLES / "client-two-upstreams.yaml").read_text(), EXAMPLES / "client-two-upstreams.yaml")
    assert len(client.outbound) == 2 and not client.inbound
    audit = _parse((EXAMPLES / "audit-rollout.yaml").read_text(), EXAMPLES / "audit-rollout.yaml")
    assert any(listener.mode == "audit" for listener in audit.inbound)
