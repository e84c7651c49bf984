"""Prometheus scrapes every service compose starts; the Grafana dashboard queries metrics the
services really expose."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.deploy import compose_file, service_facts
from tests.deploy.layout import ROOT, TOPOLOGIES

PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "baton.json"


def scrape_targets() -> set[tuple[str, int]]:
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    out = set()
    for job in cfg["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job["dns_sd_configs"]:
            assert sd["type"] == "A"
            out |= {(name, sd["port"]) for name in sd["names"]}
    return out


@pytest.mark.parametrize("profile", TOPOLOGIES)
def test_prometheus_scrapes_every_service(compose, profile, tiny_qwen3):
    targets = scrape_targets()
    image = compose["x-baton"]["image"]
    for s in compose_file.services(compose, {profile}).values():
        if s.spec.get("image") != image or "entrypoint" in s.spec:
            continue
        port = int(s.environment["BATON_PORT"])
        assert ("GET", "/metrics") in service_facts.routes(s.command[0], str(tiny_qwen3))
        assert {(n, port) for n in s.dns_names} & targets, f"{s.name} ({sorted(s.dns_names)}:{port}) is not scraped"


def test_prometheus_and_grafana_are_wired(compose):
    svcs = compose_file.services(compose, {"monitoring"})
    mounts = [v for s in svcs.values() for v in s.spec.get("volumes", []) if str(v).startswith("./")]
    for m in mounts:
        assert (ROOT / m.split(":")[0]).exists(), m
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_real_metrics():
    dash = json.loads(DASHBOARD.read_text())
    known = service_facts.metric_names()
    used = set()
    for expr in _exprs(dash):
        used |= set(re.findall(r"\bbaton_[a-z0-9_]+", expr))
    unknown = sorted(used - known)
    assert not unknown, f"the dashboard queries metrics no service exposes: {unknown}"
    # and it shows most of what the services expose
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in known}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert len(shown) >= 0.8 * len(families), sorted(families - shown)


def test_dashboard_is_importable():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    # queries go through a data source variable, so the dashboard imports into any Grafana
    assert {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])} == {"${datasource}"}
