"""Reading rendered Kubernetes objects: find them, and build a container's environment as the
kubelet does."""

from __future__ import annotations

import re


def by_kind(resources, kind):
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def baton_deployments(resources):
    """component -> Deployment, for the Deployments that run the Baton image."""
    out = {}
    for d in by_kind(resources, "Deployment").values():
        c = d["spec"]["template"]["spec"]["containers"][0]
        if c["image"].split(":")[0] == "baton":
            out[d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]] = d
    return out


def container_env(resources, container, field_values, secrets=None) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom ConfigMaps, then env in
    order, fieldRefs from `field_values`, Secrets from `secrets` (name -> data; an optional
    key that is not there leaves its variable unset), `$(VAR)` expanded from what is defined
    so far."""
    secrets = secrets or {}
    maps = by_kind(resources, "ConfigMap")
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(maps[src["configMapRef"]["name"]]["data"])
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = field_values[e["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            value = secrets.get(ref["name"], {}).get(ref["key"])
            if value is None:
                if not ref.get("optional"):
                    raise KeyError(f"{e['name']}: Secret {ref['name']} has no key {ref['key']}")
                continue
            env[e["name"]] = value
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = maps[ref["name"]]["data"][ref["key"]]
        else:
            raise NotImplementedError(e)
    return env


def expand(value: str, env: dict[str, str]) -> str:
    # $(VAR) from earlier variables; $$ is a literal $; an unknown $(VAR) stays as it is
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)
