"""k8s/: every overlay renders, every object is valid Kubernetes, and the objects are true to
the services and to each other (ports, probes, settings, selectors, network policy).

Rendering: tests/deploy/kustomize.py (and, where kubectl is installed, a check that it
renders exactly what `kubectl kustomize` renders). Validation: the `kubernetes-validate`
package's bundled OpenAPI-derived JSON schemas, strict (no unknown fields), offline.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from tests.deploy import kustomize, service_facts
from tests.deploy.k8s_objects import baton_deployments, by_kind, container_env, expand
from tests.deploy.layout import OVERLAYS, ROOT

# The oldest Kubernetes the manifests promise to work on (NetworkPolicy endPort, autoscaling/v2
# and policy/v1 are GA there), and the newest the validator knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
POD_ROLES = ("prefill", "decode")


def named_port(container, name) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_like_kubectl_kustomize(overlay, rendered):
    assert rendered[overlay]
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl not installed: rendered by tests/deploy/kustomize.py alone")
    out = subprocess.run([exe, "kustomize", str(OVERLAYS[overlay])], capture_output=True, text=True, check=True)
    theirs = [r for r in yaml.safe_load_all(out.stdout) if r]

    def key(r):
        return r["kind"], r["metadata"]["name"]

    assert sorted(rendered[overlay], key=key) == sorted(theirs, key=key)


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(NotImplementedError, match="namePrefix"):
        kustomize.build(tmp_path)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(overlay, version, rendered):
    for r in rendered[overlay]:
        try:
            kubernetes_validate.validate(r, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{r['kind']}/{r['metadata']['name']} (Kubernetes {version}): {e.message} at "
                        f"{'/'.join(map(str, e.path))}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_are_true_to_the_services(overlay, rendered, tiny_qwen3):
    res = rendered[overlay]
    deps = baton_deployments(res)
    assert set(deps) == {"router", "prefill", "decode"}
    for role, d in deps.items():
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        cmd = c["args"][0]
        assert "command" not in c and cmd in service_facts.subcommands()
        assert cmd == ("router" if role == "router" else role)
        env = container_env(res, c, {"status.podIP": "10.0.0.7", "metadata.name": "pod-x"}, SECRETS)
        unknown = sorted(k for k in env if k.startswith("BATON_") and k not in service_facts.env_vars(cmd))
        assert not unknown, f"{role} sets variables `baton {cmd}` does not read: {unknown}"
        assert not [k for k in env if "$(" in env[k]], f"{role}: unresolved $(VAR) in {env}"
        port = int(env["BATON_PORT"])
        assert named_port(c, "http") == port
        routes = service_facts.routes(cmd, str(tiny_qwen3))
        for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health"), ("startupProbe", "/health")):
            get = c[probe]["httpGet"]
            assert get["path"] == path and ("GET", path) in routes, f"{role} {probe}: {get}"
            assert get["port"] == "http", f"{role} {probe} must use the named port"
        ann = d["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/port"] == str(port) and ("GET", ann["prometheus.io/path"]) in routes
        # the model the init container fetches is the one served, mounted where it is read
        init = spec["initContainers"][0]
        assert init["args"][:2] == ["get-model", "smollm2"] and init["args"][2] == env["BATON_MODEL"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert env["BATON_MODEL"].startswith(mounts["models"] + "/")
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        if role == "router":
            assert gpus is None and env["BATON_HOST"] == "0.0.0.0"
        else:
            assert gpus == 1 and env["BATON_DEVICE"] == "cuda"
            # a pod binds and advertises its pod IP (downward API): reachable, and the UCX
            # address a decode pod publishes is built from the same host
            assert env["BATON_HOST"] == "10.0.0.7"
            assert env["BATON_ADVERTISE_URL"] == f"http://10.0.0.7:{port}"
        if role == "decode":
            assert env["BATON_ROLE"] == "decode"
            assert named_port(c, "ucx") == int(env["BATON_UCX_PORT"])
        if role != "router":
            assert re.fullmatch(r"\d+-\d+", env["UCX_TCP_PORT_RANGE"])


SECRETS = {"baton-secrets": {"internal-token": "t0ken", "api-keys": "k1,k2", "redis-password": "redis-pw"}}
REQUIRED_SECRETS = {"internal-token", "redis-password"}  # docs/SECURITY.md: no open default


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shared_settings_agree_and_redis_is_reachable(overlay, rendered):
    res = rendered[overlay]
    envs = {role: container_env(res, d["spec"]["template"]["spec"]["containers"][0], {"status.podIP": "x"},
                                SECRETS)
            for role, d in baton_deployments(res).items()}
    for key in ("BATON_MODEL", "BATON_REDIS_URL", "BATON_INTERNAL_TOKEN"):
        assert len({e[key] for e in envs.values()}) == 1, key
    assert envs["router"]["BATON_API_KEYS"] == "k1,k2"
    url = urlsplit(envs["router"]["BATON_REDIS_URL"])
    svc = by_kind(res, "Service")[url.hostname]
    assert [p["port"] for p in svc["spec"]["ports"]] == [url.port]
    redis = by_kind(res, "Deployment")["baton-redis"]
    assert named_port(redis["spec"]["template"]["spec"]["containers"][0], svc["spec"]["ports"][0]["targetPort"]) == 6379


def _selects(selector: dict, labels: dict) -> bool:
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        has = e["key"] in labels
        if e["operator"] == "In" and not (has and labels[e["key"]] in e["values"]):
            return False
        if e["operator"] == "NotIn" and has and labels[e["key"]] in e["values"]:
            return False
        if e["operator"] == "Exists" and not has:
            return False
        if e["operator"] == "DoesNotExist" and has:
            return False
    return True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_find_their_pods(overlay, rendered):
    res = rendered[overlay]
    pods = {n: d["spec"]["template"] for n, d in by_kind(res, "Deployment").items()}
    for n, d in by_kind(res, "Deployment").items():
        assert _selects(d["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"]), n
    for n, svc in by_kind(res, "Service").items():
        hit = [t for t in pods.values() if _selects({"matchLabels": svc["spec"]["selector"]}, t["metadata"]["labels"])]
        assert len(hit) == 1, f"Service {n} selects {len(hit)} Deployments"
        names = {p["name"] for c in hit[0]["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in names, f"Service {n}: no container port {p['targetPort']}"
        public = svc["spec"].get("type", "ClusterIP") in ("LoadBalancer", "NodePort")
        assert public == (n == "baton-router"), f"Service {n}: only the router is reachable from outside"
    for n, pdb in by_kind(res, "PodDisruptionBudget").items():
        hit = [t for t in pods.values() if _selects(pdb["spec"]["selector"], t["metadata"]["labels"])]
        assert len(hit) == 1, f"PDB {n}"
    for n, hpa in by_kind(res, "HorizontalPodAutoscaler").items():
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in pods, n
        assert "replicas" not in by_kind(res, "Deployment")[ref["name"]]["spec"], \
            f"{ref['name']}: the HPA owns its replica count; a fixed one is reset by every apply"


def test_autoscaler_metric_is_a_real_pod_metric_the_adapter_serves(rendered):
    hpa = by_kind(rendered["base"], "HorizontalPodAutoscaler")["baton-decode"]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name in service_facts.metric_names() and name.startswith("baton_pod_")
    adapter = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter.yaml").read_text())
    rules = adapter["rules"]["custom"]
    assert [r["name"]["as"] for r in rules] == [name]
    assert name in rules[0]["seriesQuery"]


# --- NetworkPolicy: who reaches what ---------------------------------------------------

NS_LABELS = {"kubernetes.io/metadata.name": "baton"}


def _peer_matches(peer: dict, src_ns_labels: dict, src_labels: dict) -> bool:
    if "ipBlock" in peer:
        raise NotImplementedError("ipBlock")
    ns_ok = _selects(peer["namespaceSelector"], src_ns_labels) if "namespaceSelector" in peer \
        else src_ns_labels == NS_LABELS
    pod_ok = _selects(peer["podSelector"], src_labels) if "podSelector" in peer else True
    return ns_ok and pod_ok


def _port_matches(rule_ports, port: int) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        assert p.get("protocol", "TCP") == "TCP"
        if p["port"] <= port <= p.get("endPort", p["port"]):
            return True
    return False


def allowed(policies, src_ns_labels, src_labels, dst_labels, port) -> bool:
    """Kubernetes' ingress semantics: a pod no policy selects takes anything; otherwise a
    connection must match a rule of some policy that selects the pod."""
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], dst_labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get("ingress", []):
            peers = rule.get("from", [])
            if (not peers or any(_peer_matches(peer, src_ns_labels, src_labels) for peer in peers)) \
                    and _port_matches(rule.get("ports"), port):
                return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy(overlay, rendered):
    res = rendered[overlay]
    policies = list(by_kind(res, "NetworkPolicy").values())
    labels = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]:
              d["spec"]["template"]["metadata"]["labels"] for d in by_kind(res, "Deployment").values()}
    deps = baton_deployments(res)
    envs = {r: container_env(res, d["spec"]["template"]["spec"]["containers"][0], {"status.podIP": "x"}, SECRETS)
            for r, d in deps.items()}
    port = {r: int(e["BATON_PORT"]) for r, e in envs.items()}
    ucx = int(envs["decode"]["BATON_UCX_PORT"])
    lo, hi = map(int, envs["decode"]["UCX_TCP_PORT_RANGE"].split("-"))
    assert envs["prefill"]["UCX_TCP_PORT_RANGE"] == envs["decode"]["UCX_TCP_PORT_RANGE"]
    sources = {
        "router": (NS_LABELS, labels["router"]), "prefill": (NS_LABELS, labels["prefill"]),
        "decode": (NS_LABELS, labels["decode"]), "redis": (NS_LABELS, labels["redis"]),
        "stranger": (NS_LABELS, {"app": "something-else"}),  # another app in the namespace
        "elsewhere": ({"kubernetes.io/metadata.name": "default"}, {"app": "x"}),
        "monitoring": ({"kubernetes.io/metadata.name": "monitoring"}, {"app": "prometheus"}),
    }
    want = {  # (destination, port) -> the sources that may connect
        ("router", port["router"]): set(sources),
        ("redis", 6379): {"router", "prefill", "decode"},
        ("decode", port["decode"]): {"router", "monitoring"},
        ("decode", ucx): {"prefill"},
        ("decode", lo): {"prefill"},
        ("decode", hi): {"prefill"},
        ("prefill", port["prefill"]): {"router", "decode", "monitoring"},
        ("prefill", lo): {"decode"},
        ("prefill", hi): {"decode"},
        ("prefill", ucx): set(),
        ("decode", hi + 1): set(),
        ("router", 22): set(),
        ("redis", port["router"]): set(),
    }
    for (dst, p), who in want.items():
        got = {s for s, (ns, lab) in sources.items() if allowed(policies, ns, lab, labels[dst], p)}
        assert got == who, f"{dst}:{p} reachable from {sorted(got)}, want {sorted(who)}"


def test_single_node_overlay(rendered):
    res = rendered["single-node"]
    assert {r["metadata"].get("namespace") for r in res if r["kind"] != "Namespace"} == {"baton"}
    deps = baton_deployments(res)
    for role in POD_ROLES:
        spec = deps[role]["spec"]["template"]["spec"]
        assert spec["hostIPC"] is True
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["UCX_POSIX_USE_PROC_LINK"] == "n"
    router_svc = by_kind(res, "Service")["baton-router"]
    assert router_svc["spec"]["type"] == "NodePort"
    assert deps["router"]["spec"]["replicas"] == 1
    assert by_kind(res, "PodDisruptionBudget")["baton-router"]["spec"] == {
        "maxUnavailable": 1, "selector": by_kind(res, "PodDisruptionBudget")["baton-router"]["spec"]["selector"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_internal_token_and_redis_password_are_required_api_keys_optional(overlay, rendered):
    """Without the Secret's token and Redis password no container starts (the kubelet refuses a
    missing required key), rather than a stack whose /internal/* and Redis are open; API keys
    stay optional. Every Baton container and Redis get the same password and token."""
    res = rendered[overlay]
    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    for role, d in baton_deployments(res).items():
        c = d["spec"]["template"]["spec"]["containers"][0]
        keys = set()
        for e in c["env"]:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                keys.add(ref["key"])
                assert ref["name"] == "baton-secrets", (role, e)
                assert ref.get("optional", False) is (ref["key"] not in REQUIRED_SECRETS), (role, e)
                assert f"{ref['key']}=" in doc, f"undocumented key {ref['key']}"
        assert REQUIRED_SECRETS <= keys, role
        for missing in REQUIRED_SECRETS:
            secrets = {"baton-secrets": {k: v for k, v in SECRETS["baton-secrets"].items() if k != missing}}
            with pytest.raises(KeyError):
                container_env(res, c, {"status.podIP": "x", "metadata.name": "p"}, secrets)
        env = container_env(res, c, {"status.podIP": "x", "metadata.name": "p"}, SECRETS)
        assert env["BATON_INTERNAL_TOKEN"] == "t0ken"
        assert urlsplit(env["BATON_REDIS_URL"]).password == "redis-pw", role
    redis = by_kind(res, "Deployment")["baton-redis"]["spec"]["template"]["spec"]["containers"][0]
    renv = container_env(res, redis, {}, SECRETS)
    assert [expand(a, renv) for a in redis["args"][:3]] == ["redis-server", "--requirepass", "redis-pw"]
    assert "REDISCLI_AUTH" in redis["readinessProbe"]["exec"]["command"][-1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_the_drain(overlay, rendered):
    for role, d in baton_deployments(rendered[overlay]).items():
        cmd = d["spec"]["template"]["spec"]["containers"][0]["args"][0]
        drain = service_facts.default(cmd, "drain_timeout_s")
        assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= drain + 10, role
