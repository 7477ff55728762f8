"""A small, strict Kustomize renderer for this repository's deploy/ tree, for machines without kubectl.

`kubectl kustomize DIR` (or `kustomize build DIR`) is the real thing and what docs/deploy.md uses. This module
exists so the tests can render every overlay where neither is installed; where kubectl is installed, the tests
render with both and require the same resources. It implements the kustomize v5 semantics of exactly the
features deploy/ uses, and raises `Unsupported` for anything else rather than render it wrongly:

- `resources`: local YAML files (inside the kustomization's directory) and local directories (kustomizations).
- `patches`: from `path` (inside the kustomization's directory) or inline `patch`, each
  - a strategic-merge patch (a mapping), applied to the resource with the patch's own apiVersion, kind and
    name, or to those `target` selects. Maps merge; `null` deletes a key; lists of the built-in kinds merge by
    their Kubernetes patch merge key (containers and env by name, volumeMounts by mountPath, ...), the patch's
    items first, then the remaining original items (kustomize's order); lists Kubernetes marks atomic are
    replaced; any other list present in both, and any `$patch`-style directive, is refused;
  - or a JSON 6902 patch (a list of operations: add, remove, replace, test), which needs a `target`.
  - `target` selects by group, version, kind, name (exact) and namespace; label and annotation selectors
    are refused.
- `images`: name, newName, newTag, digest, applied to the containers and init containers of pod templates.

Usage: `python deploy/tools/kustomize_lite.py deploy/overlays/gpu` prints the rendered YAML.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Unsupported", "render", "render_yaml", "resource_id"]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}
SUPPORTED_PATCH_FIELDS = {"path", "patch", "target"}
SUPPORTED_TARGET_FIELDS = {"group", "version", "kind", "name", "namespace"}
SUPPORTED_IMAGE_FIELDS = {"name", "newName", "newTag", "digest"}

# Kinds whose strategic-merge semantics (merge keys) this module knows; a patch's lists on other kinds
# (custom resources) are refused when they would have to merge.
BUILTIN_KINDS = {
    "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod", "Service",
    "PersistentVolumeClaim", "ConfigMap", "Secret", "PodDisruptionBudget", "HorizontalPodAutoscaler",
    "ServiceAccount", "Namespace",
}
# Lists that strategic merge patches merge by key: field name -> merge key (Kubernetes' patchMergeKey).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
}
# `ports` merges by containerPort in a container and by port in a Service spec.
# Lists Kubernetes replaces as a whole (no patch strategy, or atomic).
ATOMIC_LISTS = {
    "args", "command", "tolerations", "accessModes", "drop", "add", "policies", "metrics", "envFrom",
    "nodeSelectorTerms", "matchExpressions", "values", "endpoints",
}

Resource = dict[str, Any]


class Unsupported(ValueError):
    """A kustomization uses a feature this renderer does not implement (use kubectl kustomize)."""


def resource_id(resource: Resource) -> tuple[str, str, str, str]:
    """(apiVersion, kind, namespace, name): what kustomize keeps unique."""
    meta = resource.get("metadata") or {}
    return (resource.get("apiVersion", ""), resource.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""))


def render(directory: str | Path) -> list[Resource]:
    """The resources `kubectl kustomize DIRECTORY` would print, as dicts, in the order they were declared."""
    return _build(Path(directory).resolve(), stack=())


def render_yaml(directory: str | Path) -> str:
    return yaml.safe_dump_all(render(directory), sort_keys=False)


# --------------------------------------------------------------------------------------------- build


def _build(root: Path, stack: tuple[Path, ...]) -> list[Resource]:
    if root in stack:
        raise ValueError(f"kustomization cycle through {root}")
    kfile = next((root / n for n in KUSTOMIZATION_FILES if (root / n).is_file()), None)
    if kfile is None:
        raise ValueError(f"{root}: no kustomization file")
    k = yaml.safe_load(kfile.read_text()) or {}
    if not isinstance(k, dict):
        raise ValueError(f"{kfile}: not a mapping")
    unknown = set(k) - SUPPORTED_FIELDS
    if unknown:
        raise Unsupported(f"{kfile}: kustomization fields {sorted(unknown)} are not implemented here")
    if k.get("kind", "Kustomization") != "Kustomization":
        raise Unsupported(f"{kfile}: kind {k['kind']!r} is not implemented here")

    resources: list[Resource] = []
    for entry in k.get("resources") or []:
        if not isinstance(entry, str) or "://" in entry or entry.startswith(("github.com/", "git@")):
            raise Unsupported(f"{kfile}: remote resource {entry!r} is not implemented here")
        path = (root / entry).resolve()
        if path.is_dir():
            loaded = _build(path, stack + (root,))
        elif path.is_file():
            _require_inside(root, path, kfile)
            loaded = _load_documents(path)
        else:
            raise ValueError(f"{kfile}: resource {entry!r} not found")
        for resource in loaded:
            if any(resource_id(resource) == resource_id(r) for r in resources):
                raise ValueError(f"{kfile}: resource {resource_id(resource)} appears twice")
            resources.append(resource)

    for patch in k.get("patches") or []:
        _apply_patch_entry(root, kfile, patch, resources)
    for image in k.get("images") or []:
        _apply_image(kfile, image, resources)
    return resources


def _require_inside(root: Path, path: Path, kfile: Path) -> None:
    # kustomize's default load restrictor: files must lie inside the kustomization's own directory.
    if root != path and root not in path.parents:
        raise ValueError(f"{kfile}: {path} is outside the kustomization directory {root}")


def _load_documents(path: Path) -> list[Resource]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise ValueError(f"{path}: every document must be a Kubernetes object")
        if d["kind"].endswith("List"):
            raise Unsupported(f"{path}: List kinds are not implemented here")
    return docs


# ------------------------------------------------------------------------------------------- patches


def _apply_patch_entry(root: Path, kfile: Path, entry: Any, resources: list[Resource]) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{kfile}: a patches entry must be a mapping")
    unknown = set(entry) - SUPPORTED_PATCH_FIELDS
    if unknown:
        raise Unsupported(f"{kfile}: patch fields {sorted(unknown)} are not implemented here")
    if ("path" in entry) == ("patch" in entry):
        raise ValueError(f"{kfile}: a patch needs exactly one of path and patch")
    if "path" in entry:
        path = (root / entry["path"]).resolve()
        _require_inside(root, path, kfile)
        text = path.read_text()
    else:
        text = entry["patch"]
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(docs) != 1:
        raise Unsupported(f"{kfile}: a patch must hold exactly one document here")
    body = docs[0]
    target = entry.get("target")
    if target is not None:
        unknown = set(target) - SUPPORTED_TARGET_FIELDS
        if unknown:
            raise Unsupported(f"{kfile}: target selectors {sorted(unknown)} are not implemented here")
        if re.search(r"[\\^$.*+?()\[\]{}|]", str(target.get("name", ""))):
            raise Unsupported(f"{kfile}: regular-expression target names are not implemented here")
    if isinstance(body, list):
        if target is None:
            raise ValueError(f"{kfile}: a JSON 6902 patch needs a target")
        selected = [r for r in resources if _selected(r, target)]
        if not selected:
            raise ValueError(f"{kfile}: patch target {target} matches no resource")
        for r in selected:
            _json6902(r, body, kfile)
    elif isinstance(body, dict):
        if target is None:
            selected = [
                r for r in resources
                if r.get("apiVersion") == body.get("apiVersion") and r.get("kind") == body.get("kind")
                and (r.get("metadata") or {}).get("name") == (body.get("metadata") or {}).get("name")
            ]
        else:
            selected = [r for r in resources if _selected(r, target)]
        if not selected:
            raise ValueError(f"{kfile}: strategic merge patch matches no resource")
        for r in selected:
            kind = r["kind"]
            patch = copy.deepcopy(body)
            if target is not None:  # the patch's own identity does not rename the target
                for key in ("apiVersion", "kind"):
                    patch.pop(key, None)
                (patch.get("metadata") or {}).pop("name", None)
            merged = _smp(r, patch, kind, ())
            r.clear()
            r.update(merged)
    else:
        raise ValueError(f"{kfile}: a patch must be a mapping or a list of operations")


def _selected(resource: Resource, target: dict[str, Any]) -> bool:
    api = resource.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    meta = resource.get("metadata") or {}
    checks = {
        "group": group, "version": version, "kind": resource.get("kind"),
        "name": meta.get("name"), "namespace": meta.get("namespace", ""),
    }
    return all(checks[key] == value for key, value in target.items())


def _smp(original: Any, patch: Any, kind: str, path: tuple[str, ...]) -> Any:
    """Strategic merge of `patch` into a copy of `original` (see the module docstring for the subset)."""
    if not isinstance(patch, dict) or not isinstance(original, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(original)
    for key, value in patch.items():
        if key.startswith("$"):
            raise Unsupported(f"strategic-merge directive {key} at {'/'.join(path)} is not implemented here")
        if value is None:
            result.pop(key, None)
        elif key not in result or result[key] is None:
            _refuse_directives(value, path + (key,))
            result[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(result[key], dict):
            result[key] = _smp(result[key], value, kind, path + (key,))
        elif isinstance(value, list) and isinstance(result[key], list):
            result[key] = _merge_list(result[key], value, kind, path + (key,))
        else:
            result[key] = copy.deepcopy(value)
    return result


def _refuse_directives(value: Any, path: tuple[str, ...]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key.startswith("$"):
                raise Unsupported(f"strategic-merge directive {key} at {'/'.join(path)} is not implemented here")
            _refuse_directives(item, path + (key,))
    elif isinstance(value, list):
        for item in value:
            _refuse_directives(item, path)


def _merge_key(kind: str, path: tuple[str, ...]) -> str | None:
    field = path[-1]
    if field == "ports":
        if len(path) >= 2 and path[-2] in ("containers", "initContainers", "ephemeralContainers"):
            return "containerPort"
        if kind == "Service" and path == ("spec", "ports"):
            return "port"
        return None
    return MERGE_KEYS.get(field)


def _merge_list(original: list, patch: list, kind: str, path: tuple[str, ...]) -> list:
    where = "/".join(path)
    if kind not in BUILTIN_KINDS:
        raise Unsupported(f"merging list {where} of the custom kind {kind} is not implemented here")
    key = _merge_key(kind, path)
    if key is None:
        if path[-1] in ATOMIC_LISTS:
            _refuse_directives(patch, path)
            return copy.deepcopy(patch)
        raise Unsupported(f"the merge strategy of list {where} in {kind} is not known here")
    # kustomize (kyaml) order: the patch's items first, in patch order, merged into their originals; then
    # the originals the patch did not mention, in their order.
    by_key = {}
    for item in original:
        if not isinstance(item, dict) or key not in item:
            raise Unsupported(f"list {where} has an item without its merge key {key}")
        by_key[item[key]] = item
    merged, seen = [], set()
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise Unsupported(f"patch item of {where} without its merge key {key}")
        name = item[key]
        seen.add(name)
        merged.append(_smp(by_key[name], item, kind, path) if name in by_key else _copy_checked(item, path))
    merged.extend(copy.deepcopy(item) for item in original if item[key] not in seen)
    return merged


def _copy_checked(item: Any, path: tuple[str, ...]) -> Any:
    _refuse_directives(item, path)
    return copy.deepcopy(item)


def _json6902(resource: Resource, operations: list, kfile: Path) -> None:
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ValueError(f"{kfile}: malformed JSON 6902 operation {op!r}")
        kind = op["op"]
        if kind not in ("add", "remove", "replace", "test"):
            raise Unsupported(f"{kfile}: JSON 6902 operation {kind!r} is not implemented here")
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        if not op["path"].startswith("/") or not tokens:
            raise ValueError(f"{kfile}: JSON 6902 path {op['path']!r} must point inside the resource")
        parent: Any = resource
        for token in tokens[:-1]:
            parent = _step(parent, token, op["path"], kfile)
        last = tokens[-1]
        if kind == "test":
            if _step(parent, last, op["path"], kfile) != op.get("value"):
                raise ValueError(f"{kfile}: JSON 6902 test failed at {op['path']}")
        elif isinstance(parent, list):
            if kind == "add":
                index = len(parent) if last == "-" else _index(parent, last, op["path"], kfile, allow_end=True)
                parent.insert(index, copy.deepcopy(op["value"]))
            else:
                index = _index(parent, last, op["path"], kfile)
                if kind == "remove":
                    del parent[index]
                else:
                    parent[index] = copy.deepcopy(op["value"])
        elif isinstance(parent, dict):
            if kind in ("remove", "replace") and last not in parent:
                raise ValueError(f"{kfile}: JSON 6902 {kind} of missing {op['path']}")
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = copy.deepcopy(op["value"])
        else:
            raise ValueError(f"{kfile}: JSON 6902 path {op['path']} goes through a scalar")


def _step(node: Any, token: str, path: str, kfile: Path) -> Any:
    if isinstance(node, list):
        return node[_index(node, token, path, kfile)]
    if isinstance(node, dict) and token in node:
        return node[token]
    raise ValueError(f"{kfile}: JSON 6902 path {path} not found")


def _index(node: list, token: str, path: str, kfile: Path, allow_end: bool = False) -> int:
    if not token.isdigit() or int(token) > len(node) or (int(token) == len(node) and not allow_end):
        raise ValueError(f"{kfile}: JSON 6902 index {token!r} out of range in {path}")
    return int(token)


# -------------------------------------------------------------------------------------------- images


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    name, _, digest = image.partition("@")
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest or None


def _pod_specs(resource: Resource) -> list[dict]:
    spec = resource.get("spec") or {}
    candidates = [
        spec if resource.get("kind") == "Pod" else None,
        (spec.get("template") or {}).get("spec"),
        ((((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")) or {}).get("spec"),
    ]
    return [c for c in candidates if isinstance(c, dict)]


def _apply_image(kfile: Path, entry: Any, resources: list[Resource]) -> None:
    if not isinstance(entry, dict) or "name" not in entry:
        raise ValueError(f"{kfile}: an images entry needs a name")
    unknown = set(entry) - SUPPORTED_IMAGE_FIELDS
    if unknown:
        raise Unsupported(f"{kfile}: image fields {sorted(unknown)} are not implemented here")
    for resource in resources:
        for pod in _pod_specs(resource):
            for field in ("initContainers", "containers"):
                for container in pod.get(field) or []:
                    name, tag, digest = _split_image(str(container.get("image", "")))
                    if name != entry["name"]:
                        continue
                    name = entry.get("newName", name)
                    if "digest" in entry:
                        tag, digest = None, entry["digest"]
                    elif "newTag" in entry:
                        tag, digest = str(entry["newTag"]), None
                    container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: kustomize_lite.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    sys.stdout.write(render_yaml(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
