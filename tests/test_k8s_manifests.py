"""The Kubernetes manifests in cluster/k8s/ against the CRD schemas vendored beside them.

Every YAML document in cluster/k8s/*.yaml is checked. A custom resource (KubeRay's
RayCluster and RayJob, CloudNativePG's Cluster) is validated with `jsonschema` against
the openAPIV3Schema of its CRD, vendored in cluster/k8s/schemas/ (see the README there).
The API server prunes fields its schema does not know, so a misspelt field would vanish
without an error; here every object schema that lists `properties` and neither
`additionalProperties` nor `x-kubernetes-preserve-unknown-fields` is closed, so an
unknown field fails. Core kinds (Secret, Service, ConfigMap) and the Kustomization get a
basic check. CEL rules (`x-kubernetes-validations`) and formats are not checked.

Also: the Ray version of the image (cluster/k8s/Dockerfile) is the one installed here and
allowed by pyproject.toml, the RayCluster says the same, and the manifests refer to each
other by the right names. No Ray, Kubernetes or network is needed.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from functools import lru_cache
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "cluster" / "k8s"
SCHEMAS = K8S / "schemas"
DOCKERFILE = K8S / "Dockerfile"

#: Kinds with no vendored schema, and the fields they must have.
CORE_KINDS = {
    ("v1", "Secret"): ("metadata",),
    ("v1", "ConfigMap"): ("metadata",),
    ("v1", "Service"): ("metadata", "spec"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): (),
}
#: A DNS-1123 subdomain, what Kubernetes accepts as most objects' names.
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


# -- loading ---------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def documents() -> Iterator[tuple[str, dict]]:
    for path in manifest_files():
        for i, doc in enumerate(load(path)):
            name = (doc.get("metadata") or {}).get("name", "?") if isinstance(doc, dict) else "?"
            kind = doc.get("kind", "?") if isinstance(doc, dict) else "?"
            yield f"{path.name}#{i}:{kind}/{name}", doc


def find(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in cluster/k8s/, found {len(found)}"
    return found[0]


def all_docs() -> list[dict]:
    return [d for _, d in documents()]


def schema_file(api_version: str, kind: str) -> Path:
    group, _, ver = api_version.rpartition("/")
    return SCHEMAS / f"{group or 'core'}_{ver}_{kind.lower()}.json"


def is_custom(api_version: str, kind: str) -> bool:
    return (api_version, kind) not in CORE_KINDS


# -- the strict validator --------------------------------------------------------------


def closed(schema: dict) -> dict:
    """A copy of a CRD's structural schema in which unknown fields are errors.

    Kubernetes drops (prunes) fields a structural schema does not specify, unless the
    node says `x-kubernetes-preserve-unknown-fields`; `additionalProperties: false` on
    every object node that has `properties` and no `additionalProperties` of its own
    turns that silent drop into a validation error. Nodes marked
    `x-kubernetes-embedded-resource` also accept apiVersion, kind and metadata, as the
    API server does. `nullable: true` admits null (OpenAPI v3, not JSON Schema)."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if not isinstance(node, dict):
            return
        if node.get("nullable") is True and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        props = node.get("properties")
        if isinstance(props, dict):
            for sub in props.values():
                walk(sub)
            if node.get("x-kubernetes-embedded-resource"):
                props.setdefault("apiVersion", {"type": "string"})
                props.setdefault("kind", {"type": "string"})
                props.setdefault("metadata", {"type": "object"})
            if ("additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
        if isinstance(node.get("items"), dict):
            walk(node["items"])
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"])

    walk(schema)
    return schema


@lru_cache(maxsize=None)
def raw_schema(path: Path) -> dict:
    return json.loads(path.read_text())


@lru_cache(maxsize=None)
def validator(path: Path, strict: bool = True) -> jsonschema.Draft4Validator:
    # OpenAPI v3 schemas are JSON Schema draft 4 with extensions (x-kubernetes-*,
    # nullable), which a draft 4 validator ignores.
    schema = raw_schema(path)
    return jsonschema.Draft4Validator(closed(schema) if strict else schema)


def errors(doc: dict, strict: bool = True) -> list[str]:
    """Every schema error of a custom resource, as `path: message` lines."""
    path = schema_file(doc["apiVersion"], doc["kind"])
    found = validator(path, strict).iter_errors(doc)
    return sorted(
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in found
    )


def check_metadata(doc: dict) -> None:
    meta = doc.get("metadata")
    assert isinstance(meta, dict), "metadata must be a mapping"
    name = meta.get("name")
    assert isinstance(name, str) and len(name) <= 253 and DNS_SUBDOMAIN.match(name), (
        f"metadata.name {name!r} is not a DNS-1123 subdomain")
    for field in ("labels", "annotations"):
        values = meta.get(field) or {}
        assert isinstance(values, dict), f"metadata.{field} must be a mapping"
        bad = {k: v for k, v in values.items() if not isinstance(k, str) or not isinstance(v, str)}
        assert not bad, f"metadata.{field} values must be strings: {bad}"


# -- every document --------------------------------------------------------------------


def test_there_are_manifests_and_schemas() -> None:
    names = {p.name for p in manifest_files()}
    assert {"raycluster.yaml", "postgres.yaml", "service.yaml"} <= names, names
    assert names & {"rayjob.yaml", "rayservice.yaml"}, names
    kinds = {(d["apiVersion"], d["kind"]) for d in all_docs()}
    assert ("ray.io/v1", "RayCluster") in kinds
    assert ("postgresql.cnpg.io/v1", "Cluster") in kinds
    for kind in ("raycluster", "rayjob", "rayservice"):
        assert (SCHEMAS / f"ray.io_v1_{kind}.json").is_file()
    assert (SCHEMAS / "postgresql.cnpg.io_v1_cluster.json").is_file()


@pytest.mark.parametrize("path", sorted(SCHEMAS.glob("*.json")), ids=lambda p: p.name)
def test_vendored_schemas_are_valid_json_schemas(path: Path) -> None:
    schema = raw_schema(path)
    assert schema.get("type") == "object" and "spec" in schema.get("properties", {})
    jsonschema.Draft4Validator.check_schema(schema)
    jsonschema.Draft4Validator.check_schema(closed(schema))


@pytest.mark.parametrize("where,doc", list(documents()), ids=[w for w, _ in documents()])
def test_document(where: str, doc: dict) -> None:
    assert isinstance(doc, dict), f"{where}: not a mapping"
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    assert isinstance(api_version, str) and isinstance(kind, str), f"{where}: apiVersion and kind"
    if kind != "Kustomization":
        check_metadata(doc)
    if is_custom(api_version, kind):
        path = schema_file(api_version, kind)
        assert path.is_file(), (
            f"{where}: no vendored schema for {api_version} {kind} (expected {path.name}; "
            "see cluster/k8s/schemas/README.md)")
        problems = errors(doc)
        assert not problems, f"{where} does not match its CRD schema:\n" + "\n".join(problems)
    else:
        for field in CORE_KINDS[(api_version, kind)]:
            assert field in doc, f"{where}: {kind} without {field}"


# -- a typo fails ----------------------------------------------------------------------


def renamed(doc: dict, path: tuple, new: str) -> dict:
    """A copy of `doc` with the field at `path` renamed to `new` (a misspelling)."""
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    assert path[-1] in node, f"{path} not in the manifest"
    node[new] = node.pop(path[-1])
    return doc


TYPOS = [
    ("RayCluster", ("spec", "workerGroupSpecs"), "workerGroupSpec"),
    ("RayCluster", ("spec", "headGroupSpec", "template", "spec", "containers", 0,
                    "securityContext"), "securityContex"),
    ("RayCluster", ("spec", "headGroupSpec", "template", "spec", "containers", 0, "env", 0,
                    "valueFrom", "secretKeyRef"), "secretRef"),
    ("RayCluster", ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0,
                    "resources", "limits"), "limit"),
    ("RayJob", ("spec", "clusterSelector"), "clusterSelecter"),
    ("RayJob", ("spec", "entrypoint"), "entryPoint"),
    ("Cluster", ("spec", "bootstrap", "initdb"), "initDB"),
    ("Cluster", ("spec", "storage", "size"), "sise"),
]


@pytest.mark.parametrize("kind,path,new", TYPOS, ids=[f"{k}.{n}" for k, _, n in TYPOS])
def test_a_misspelt_field_fails(kind: str, path: tuple, new: str) -> None:
    original = find(all_docs(), kind)
    assert errors(original) == []
    typo = renamed(original, path, new)
    problems = errors(typo)
    assert any(repr(new) in p and "Additional properties" in p for p in problems), problems
    # The CRD's own schema accepts it: the API server would silently drop the field.
    assert errors(typo, strict=False) == []


def test_a_wrong_type_or_value_fails() -> None:
    cluster = copy.deepcopy(find(all_docs(), "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    cluster["spec"]["authOptions"]["mode"] = "tokens"
    problems = errors(cluster)
    assert any("replicas" in p for p in problems), problems
    assert any("authOptions.mode" in p for p in problems), problems


def test_embedded_and_preserved_nodes_stay_open() -> None:
    schema = closed({
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"x": {"type": "string"}},
                  "x-kubernetes-preserve-unknown-fields": True},
            "b": {"type": "object", "properties": {"spec": {"type": "object"}},
                  "x-kubernetes-embedded-resource": True},
            "c": {"type": "object", "additionalProperties": {"type": "string"}},
            "d": {"type": "string", "nullable": True},
        },
    })
    v = jsonschema.Draft4Validator(schema)
    assert not list(v.iter_errors({"a": {"x": "1", "y": 2}, "b": {"kind": "Pod", "spec": {}},
                                   "c": {"any": "thing"}, "d": None}))
    assert list(v.iter_errors({"b": {"spec": {}, "other": 1}}))
    assert list(v.iter_errors({"e": 1}))


# -- versions and names that must agree ------------------------------------------------


def dockerfile_ray_versions() -> tuple[list[str], list[str]]:
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    tags = []
    for base in bases:
        m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)(-py\d+)?(-[a-z0-9]+)*", base)
        assert m, f"Dockerfile: FROM {base} is not a rayproject/ray:X.Y.Z[-pyNNN] image"
        tags.append(m.group(1))
    pins = re.findall(r"ray(?:\[[a-z,]+\])?==(\d+\.\d+\.\d+)", text)
    return tags, pins


def test_dockerfile_ray_version_matches_installed_and_pyproject() -> None:
    tags, pins = dockerfile_ray_versions()
    installed = installed_version("ray")
    assert tags, "Dockerfile: no FROM rayproject/ray:..."
    assert set(tags) == {installed}, (
        f"Dockerfile's rayproject/ray tags {tags} != the Ray installed here ({installed})")
    assert set(pins) <= {installed}, f"Dockerfile pins ray=={pins}, installed is {installed}"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_req = next(Requirement(d) for d in deps if Requirement(d).name == "ray")
    assert Version(installed) in ray_req.specifier, (
        f"Ray {installed} is outside pyproject.toml's {ray_req}")
    py = re.findall(r"rayproject/ray:[\d.]+-py(\d)(\d+)", DOCKERFILE.read_text())
    assert py and all(tuple(map(int, v)) >= (3, 11) for v in py), (
        f"the image's Python must be >= 3.11 (tomllib): {py}")


def test_raycluster_ray_version_and_image() -> None:
    cluster = find(all_docs(), "RayCluster")
    assert cluster["spec"]["rayVersion"] == installed_version("ray")
    spec = cluster["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    images = {c["image"] for t in templates for c in t["spec"]["containers"]}
    assert len(images) == 1, f"every Ray pod must run the same image: {images}"


def test_manifests_refer_to_each_other() -> None:
    docs = all_docs()
    cluster = find(docs, "RayCluster")
    name = cluster["metadata"]["name"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]

    # The platform runs on this cluster.
    job = find(docs, "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": name}
    assert "rayClusterSpec" not in job["spec"]
    entrypoint = job["spec"]["entrypoint"]
    # `dynwf serve --host 0.0.0.0`, with `--sandbox process` or without.
    process_mode = re.search(r"--sandbox[ =]process", entrypoint) is not None
    assert "dynwf serve" in entrypoint and "--host 0.0.0.0" in entrypoint, entrypoint

    # The Service reaches the head pod's dynwf-http port.
    service = find(docs, "Service")
    assert service["spec"]["selector"] == {"ray.io/cluster": name, "ray.io/node-type": "head"}
    ports = {p.get("name"): p["containerPort"] for p in head.get("ports", [])}
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert target in ports or target in ports.values(), (target, ports)
        assert ports.get(target, target) == 8750

    # Every Ray container reads the journal from CloudNativePG's application Secret.
    pg = find(docs, "Cluster")
    app_secret = pg["metadata"]["name"] + "-app"
    containers = [head] + [g["template"]["spec"]["containers"][0]
                           for g in cluster["spec"]["workerGroupSpecs"]]
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        url = env["DYNWF_DATABASE_URL"]["value"]
        assert url.startswith("postgresql+psycopg://"), url
        for var in re.findall(r"\$\(([A-Z_]+)\)", url):
            assert var in env, f"{container['name']}: $({var}) is not defined"
            names = [e["name"] for e in container["env"]]
            assert names.index(var) < names.index("DYNWF_DATABASE_URL"), (
                f"{container['name']}: $({var}) must be defined before DYNWF_DATABASE_URL")
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == app_secret, ref
        # Strict sandboxing (the engine's default) refuses to start without root and a
        # writable cgroup hierarchy, which only privileged containers have.
        if not process_mode:
            assert container.get("securityContext", {}).get("privileged") is True, (
                f"{container['name']}: strict sandboxing needs a privileged container "
                "(or serve with --sandbox process, see cluster/README.md)")

    # The kustomization lists every manifest.
    kustomization = find(docs, "Kustomization")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in manifest_files()} - {"kustomization.yaml"}
    assert listed == on_disk, f"kustomization.yaml resources {sorted(listed)} != {sorted(on_disk)}"
