"""`kustomize build` for the subset of kustomize that k8s/ uses, in Python, so CI needs no binary.

Supported, with kustomize's semantics: `resources` (files and kustomization directories),
`namespace`, `images`, `configMapGenerator` (literals; behavior create/merge/replace; the
content-hash name suffix, computed as kustomize computes it), `patches` holding JSON 6902
operations with a `target` (kind, name as a regular expression, labelSelector), and the
rewriting of references to generated ConfigMaps in pod templates. Anything else in a
kustomization raises, so a new feature in k8s/ fails here loudly instead of rendering wrong.
Where `kubectl` is installed, tests/deploy/test_k8s.py checks that this renders what
`kubectl kustomize` renders.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "configMapGenerator", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass", "PersistentVolume"}


def build(directory: str | Path) -> list[dict]:
    """The resources `kustomize build DIRECTORY` prints, as dicts (in no particular order)."""
    resources, generated = _build(Path(directory))
    names = {}
    out = [copy.deepcopy(r) for r in resources]
    for base, cm in generated.items():
        cm = copy.deepcopy(cm)
        cm["metadata"]["name"] = names[base] = f"{base}-{config_map_hash(cm)}"
        out.append(cm)
    for r in out:
        _rename_config_map_refs(r, names)
    return out


def _build(d: Path) -> tuple[list[dict], dict[str, str]]:
    """Resources, and the generated ConfigMaps by name. A base's generated ConfigMaps stay
    unhashed until the top level: an overlay may merge into them, and the hash is over the
    final content."""
    k = yaml.safe_load((d / "kustomization.yaml").read_text())
    unknown = set(k) - SUPPORTED
    if unknown:
        raise NotImplementedError(f"{d}: kustomization fields this renderer does not handle: {sorted(unknown)}")
    resources: list[dict] = []
    generated: dict[str, dict] = {}  # base name -> ConfigMap (unhashed)
    for r in k.get("resources", []):
        p = d / r
        if p.is_dir():
            sub, sub_gen = _build(p)
            resources += sub
            generated.update(sub_gen)
        else:
            resources += [doc for doc in yaml.safe_load_all(p.read_text()) if doc]
    for g in k.get("configMapGenerator", []):
        _generate(g, generated, d)
    for p in k.get("patches", []):
        _patch(p, resources + list(generated.values()), d)
    if "namespace" in k:
        for r in resources + list(generated.values()):
            if r["kind"] not in CLUSTER_SCOPED:
                r["metadata"]["namespace"] = k["namespace"]
    for img in k.get("images", []):
        _set_image(img, resources)
    return resources, generated


def _generate(g: dict, generated: dict, d: Path) -> None:
    unknown = set(g) - {"name", "literals", "behavior"}
    if unknown:
        raise NotImplementedError(f"{d}: configMapGenerator fields not handled: {sorted(unknown)}")
    data = {}
    for lit in g.get("literals", []):
        key, _, value = lit.partition("=")
        data[key] = value.strip("'\"") if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"" else value
    behavior = g.get("behavior", "create")
    name = g["name"]
    if behavior == "create":
        if name in generated:
            raise ValueError(f"{d}: ConfigMap {name} generated twice")
        generated[name] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
    elif behavior == "merge":
        generated[name]["data"].update(data)
    elif behavior == "replace":
        generated[name]["data"] = data
    else:
        raise ValueError(f"{d}: unknown configMapGenerator behavior {behavior!r}")


def config_map_hash(cm: dict) -> str:
    """kustomize's name suffix: sha256 over Go's json.Marshal of {data, kind, name}, 10 hex
    digits with five letters swapped so the suffix never reads as a number. The name is
    always "" there: kustomize v5 looks it up as one field called "metadata/name", which no
    ConfigMap has (api/hasher/hasher.go); `kubectl kustomize` agrees, and a test checks."""
    encoded = json.dumps({"data": cm.get("data", {}), "kind": "ConfigMap", "name": ""},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):  # Go escapes these
        encoded = encoded.replace(ch, esc)
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _matches(target: dict, r: dict) -> bool:
    unknown = set(target) - {"kind", "name", "labelSelector"}
    if unknown:
        raise NotImplementedError(f"patch target fields not handled: {sorted(unknown)}")
    if "kind" in target and target["kind"] != r["kind"]:
        return False
    if "name" in target and not re.fullmatch(target["name"], r["metadata"]["name"]):
        return False
    if "labelSelector" in target:
        labels = r["metadata"].get("labels", {})
        for term in target["labelSelector"].split(","):
            key, _, value = term.partition("=")
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def _patch(p: dict, resources: list[dict], d: Path) -> None:
    text = (d / p["path"]).read_text() if "path" in p else p["patch"]
    ops = yaml.safe_load(text)
    if not isinstance(ops, list):
        raise NotImplementedError(f"{d}: only JSON 6902 patches (a list of operations) are handled")
    hit = [r for r in resources if _matches(p["target"], r)]
    if not hit:
        raise ValueError(f"{d}: patch target {p['target']} matches no resource")
    for r in hit:
        for op in ops:
            apply_json_patch(r, op)


def _pointer(path: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in path.lstrip("/").split("/")]


def apply_json_patch(doc: dict, op: dict) -> None:
    *parents, last = _pointer(op["path"])
    node = doc
    for t in parents:
        node = node[int(t)] if isinstance(node, list) else node[t]
    kind = op["op"]
    if kind in ("add", "replace"):
        value = copy.deepcopy(op["value"])
        if isinstance(node, list):
            if kind == "add":
                node.insert(len(node) if last == "-" else int(last), value)
            else:
                node[int(last)] = value
        else:
            if kind == "replace" and last not in node:
                raise KeyError(f"replace of missing {op['path']}")
            node[last] = value
    elif kind == "remove":
        if isinstance(node, list):
            del node[int(last)]
        else:
            del node[last]
    else:
        raise NotImplementedError(f"JSON patch op {kind!r}")


def _set_image(img: dict, resources: list[dict]) -> None:
    for r in resources:
        spec = r.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            name, tag = _split_image(c["image"])
            if name != img["name"]:
                continue
            name = img.get("newName", name)
            tag = img.get("newTag", tag)
            c["image"] = f"{name}:{tag}" if tag else name


def _split_image(image: str) -> tuple[str, str | None]:
    if "@" in image:
        raise NotImplementedError("image digests")
    head, _, tail = image.rpartition(":")
    if head and "/" not in tail:
        return head, tail
    return image, None


def _rename_config_map_refs(r: dict, names: dict[str, str]) -> None:
    spec = r.get("spec", {}).get("template", {}).get("spec")
    if spec is None:
        return
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        for e in c.get("envFrom", []):
            ref = e.get("configMapRef")
            if ref and ref["name"] in names:
                ref["name"] = names[ref["name"]]
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("configMapKeyRef")
            if ref and ref["name"] in names:
                ref["name"] = names[ref["name"]]
    for v in spec.get("volumes", []):
        if "configMap" in v and v["configMap"]["name"] in names:
            v["configMap"]["name"] = names[v["configMap"]["name"]]
