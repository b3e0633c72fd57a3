"""Admission bookkeeping (proxy/budgets.py), the `limits` section, and the capacity estimates: no sockets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.budgets import (
    PER_LISTENER,
    PER_SOURCE,
    WAITING,
    ConnectionSlots,
    PendingBudget,
)
from proxy.capacity import (
    ESTABLISHED_KIB,
    capacity_warnings,
    descriptors_needed,
    memory_needed_kib,
)
from proxy.config import ConfigError, HandshakeLimits, Limits, parse_config

SOURCE = Path("config.yaml")
IDENTITY = "identity: {cert: cert.pem, key: key.pem, bundle: bundle.pem}\n"
INBOUND = ("inbound:\n  - {name: api, listen: 0.0.0.0:8443, forward: 127.0.0.1:8080, "
           "allow: [spiffe://example.org/ns/prod/sa/web]}\n")


def arrive(budget: PendingBudget, item: str, source: str, per_source: int = 100, waiting: int = 100):
    return budget.arrive(item, source, per_source=per_source, waiting=waiting)


# --- the pending budget ------------------------------------------------------------------------


def test_a_source_over_its_budget_evicts_its_own_oldest_connection():
    budget = PendingBudget()
    for i in range(3):
        assert arrive(budget, f"a{i}", "10.0.0.1", per_source=3) == []
    assert arrive(budget, "b0", "10.0.0.2", per_source=3) == []
    assert arrive(budget, "a3", "10.0.0.1", per_source=3) == [("a0", PER_SOURCE)]
    assert budget.from_source("10.0.0.1") == 3 and budget.from_source("10.0.0.2") == 1


def test_a_full_waiting_budget_evicts_the_oldest_waiting_connection_of_any_source():
    budget = PendingBudget()
    arrive(budget, "old", "10.0.0.1", waiting=2)
    arrive(budget, "mid", "10.0.0.2", waiting=2)
    assert arrive(budget, "new", "10.0.0.3", waiting=2) == [("old", WAITING)]
    assert budget.waiting == 2 and budget.from_source("10.0.0.1") == 0


def test_a_full_handshake_budget_evicts_the_oldest_handshake_not_a_waiting_connection():
    budget = PendingBudget()
    for item in ("h1", "h2", "w"):
        arrive(budget, item, "10.0.0.1")
    assert budget.start_handshake("h1", per_listener=2) == []
    assert budget.start_handshake("h2", per_listener=2) == []
    assert budget.start_handshake("w", per_listener=2) == [("h1", PER_LISTENER)]
    assert (budget.waiting, budget.handshaking) == (0, 2)


def test_a_connection_that_already_yielded_does_not_come_back():
    budget = PendingBudget()
    arrive(budget, "gone", "10.0.0.1", per_source=1)
    arrive(budget, "next", "10.0.0.1", per_source=1)
    assert budget.start_handshake("gone", per_listener=10) == []
    budget.leave("gone")  # its handler ends later: a no-op
    assert (budget.waiting, budget.handshaking, budget.from_source("10.0.0.1")) == (1, 0, 1)


def test_leaving_frees_every_count():
    budget = PendingBudget()
    arrive(budget, "x", "10.0.0.1")
    budget.start_handshake("x", per_listener=10)
    budget.leave("x")
    assert (budget.waiting, budget.handshaking, budget.from_source("10.0.0.1")) == (0, 0, 0)


def test_ten_thousand_arrivals_against_full_budgets_keep_them_exactly_full():
    budget = PendingBudget()
    evicted = 0
    for i in range(10_000):
        evicted += len(arrive(budget, i, f"10.0.{i % 50}.1", per_source=30, waiting=1000))
    assert budget.waiting == 1000 and evicted == 9000


# --- established slots -------------------------------------------------------------------------


def test_slots_refuse_over_the_total_and_over_one_listeners_share():
    slots = ConnectionSlots()
    slots.take("api")
    slots.take("api")
    assert "limits.per_listener is 2" in slots.refusal("api", 10, 2)
    assert slots.refusal("orders", 10, 2) is None
    slots.take("orders")
    assert "limits.max_connections is 3" in slots.refusal("orders", 3, None)
    slots.give_back("api")
    assert slots.refusal("api", 3, 2) is None


# --- config ------------------------------------------------------------------------------------


def test_limits_default_to_the_documented_budgets():
    limits = parse_config(IDENTITY, SOURCE).limits
    assert limits == Limits(10000, None, HandshakeLimits(per_listener=256, per_source=64, waiting=4096))


def test_an_old_limits_section_still_reads_the_same():
    assert parse_config(IDENTITY + "limits: {max_connections: 50}\n", SOURCE).limits.max_connections == 50


def test_limits_read_every_budget():
    text = IDENTITY + ("limits: {max_connections: 9, per_listener: 5, "
                       "handshakes: {per_listener: 4, per_source: 2, waiting: 3}}\n")
    assert parse_config(text, SOURCE).limits == Limits(9, 5, HandshakeLimits(4, 2, 3))


@pytest.mark.parametrize("limits, message", [
    ("{handshakes: {per_source: 0}}", "limits.handshakes.per_source: 0 is not a positive number"),
    ("{handshakes: {burst: 3}}", "limits.handshakes"),
    ("{per_listener: -1}", "limits.per_listener: -1 is not a positive number"),
])
def test_bad_budgets_are_named_by_their_key_path(limits, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(IDENTITY + f"limits: {limits}\n", SOURCE)
    assert any(message in problem for problem in caught.value.problems), caught.value.problems


# --- capacity ----------------------------------------------------------------------------------


def test_a_config_that_does_not_fit_the_memory_limit_is_warned_about_with_what_fits():
    config = parse_config(IDENTITY + INBOUND + "limits: {max_connections: 10000}\n", SOURCE)
    (warning,) = capacity_warnings(config, None, 256 * 1024 * 1024)
    assert "do not fit in 256 MiB" in warning and "lower limits.max_connections" in warning
    fits = int(warning.split("about ")[-1].split(" connections fit")[0])
    smaller = parse_config(IDENTITY + INBOUND + f"limits: {{max_connections: {fits}}}\n", SOURCE)
    assert capacity_warnings(smaller, None, 256 * 1024 * 1024) == []
    assert memory_needed_kib(smaller) + ESTABLISHED_KIB > 256 * 1024


def test_a_limit_the_descriptors_cannot_reach_is_warned_about():
    config = parse_config(IDENTITY + INBOUND + "limits: {max_connections: 10000}\n", SOURCE)
    assert descriptors_needed(config) > 20000
    (warning,) = capacity_warnings(config, 20000, None)
    assert "cannot be reached" in warning and "20000" in warning
    assert capacity_warnings(config, 1 << 20, None) == []


def test_the_shipped_kubernetes_config_fits_its_memory_limit():
    root = Path(__file__).resolve().parent.parent / "config" / "kubernetes"
    text = yaml.safe_load((root / "web-configmap.yaml").read_text())["data"]["config.yaml"]
    deployment = list(yaml.safe_load_all((root / "web-deployment.yaml").read_text()))
    pods = [d["spec"]["template"]["spec"] for d in deployment if d and d.get("kind") == "Deployment"]
    sidecar = next(c for pod in pods for c in pod.get("initContainers", []) + pod["containers"]
                   if c["name"] == "mtls-sidecar")
    limit = sidecar["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    config = parse_config(text, SOURCE)
    assert capacity_warnings(config, None, int(limit[:-2]) * 1024 * 1024) == []
