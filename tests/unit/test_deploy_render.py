"""The rendered Kubernetes package: the base and every overlay as kustomize builds them.

Every rendered object is validated: built-in kinds against the Kubernetes API schemas
(``kubernetes_validate``, strict), ServiceMonitor, PrometheusRule and KafkaTopic against the
``openAPIV3Schema`` of their CRDs (vendored in ``tests/fixtures/crds``, strict like
``kubectl --validate=strict``). Then what the overlays promise: the image override reaches
every container, the config hash rolls the pods, namespace, replicas, resources and the
public host; and the NetworkPolicies let through exactly what SPEC has the services do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tayori.services import CONSOLE, SERVICES
from tests.unit import kustomize
from tests.unit.test_deploy import CONSOLE_CALLS, K8S_VERSIONS, _has_database, _routes

if kustomize.command() is None:
    pytest.skip(kustomize.MISSING, allow_module_level=True)

CRDS = Path(__file__).resolve().parents[1] / "fixtures" / "crds"
OVERLAYS = tuple(tree for tree in kustomize.TREES if tree != "base")
CONFIG_MAP, SECRET, DASHBOARDS = "tayori-config", "tayori-secrets", "tayori-dashboards"
#: (tree, expected namespace); the base sets none.
NAMESPACES = {"base": None, "dev": "tayori-dev", "prod": "tayori"}
HTTP_PORT = 8080
#: What runs in its own Deployment: the six services and the console.
COMPONENTS = (*SERVICES, CONSOLE)


def _name(service: str) -> str:
    return f"tayori-{service.replace('_', '-')}"


def _rendered() -> list[tuple[str, dict[str, Any]]]:
    return [(tree, doc) for tree in kustomize.TREES for doc in kustomize.render(tree)]


def _rid(item: tuple[str, dict[str, Any]]) -> str:
    tree, doc = item
    return f"{tree}:{doc['kind']}/{doc['metadata']['name']}"


def _of_kind(tree: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in kustomize.render(tree) if doc["kind"] == kind]


def _one(tree: str, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _of_kind(tree, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{tree}: {len(found)} {kind} named {name}"
    return found[0]


def _generated(tree: str, kind: str, name: str) -> dict[str, Any]:
    """The generated object ``name-<hash>`` of a tree."""
    found = [
        d
        for d in _of_kind(tree, kind)
        if re.fullmatch(rf"{name}-[a-z0-9]{{10}}", d["metadata"]["name"])
    ]
    assert len(found) == 1, f"{tree}: {len(found)} generated {kind} {name}-<hash>"
    return found[0]


def _containers(deployment: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


RENDERED = _rendered()


# -- schemas ---------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """An openAPIV3Schema as JSON Schema that, like the API server's strict field
    validation, refuses fields the CRD does not declare."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    pattern = out.get("pattern")
    if isinstance(pattern, str) and "(?i)" in pattern[1:]:
        # Go's regexp takes an inline flag anywhere; Python's only at the start.
        out["pattern"] = "(?i)" + pattern.replace("(?i)", "")
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas = {}
    for path in sorted(CRDS.glob("*.json")):
        crd = json.loads(path.read_text())
        schemas[(crd["apiVersion"], crd["kind"])] = _strict(crd["openAPIV3Schema"])
    return schemas


CRD_SCHEMAS = _crd_schemas()


def _is_builtin(doc: dict[str, Any]) -> bool:
    return (doc["apiVersion"], doc["kind"]) not in CRD_SCHEMAS


def test_every_tree_renders_the_services() -> None:
    assert set(kustomize.TREES) == set(NAMESPACES), "a new overlay: add it to NAMESPACES"
    for tree in kustomize.TREES:
        deployments = {d["metadata"]["name"] for d in _of_kind(tree, "Deployment")}
        assert deployments == {_name(s) for s in COMPONENTS}, tree
    kinds = {doc["kind"] for _, doc in RENDERED if not _is_builtin(doc)}
    assert kinds == {kind for _, kind in CRD_SCHEMAS}, "a vendored CRD schema is unused"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("item", [i for i in RENDERED if _is_builtin(i[1])], ids=_rid)
def test_rendered_builtin_validates_against_kubernetes_schema(
    item: tuple[str, dict[str, Any]], version: str
) -> None:
    kubernetes_validate.validate(item[1], version, strict=True)


@pytest.mark.parametrize("item", [i for i in RENDERED if not _is_builtin(i[1])], ids=_rid)
def test_rendered_custom_resource_validates_against_its_crd(
    item: tuple[str, dict[str, Any]],
) -> None:
    doc = item[1]
    schema = CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]
    # The CRD schema describes apiVersion, kind, metadata (as an object) and spec.
    jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)


def test_crd_schema_check_refuses_what_the_api_server_would() -> None:
    (topic, *_) = _of_kind("base", "KafkaTopic")
    schema = CRD_SCHEMAS[(topic["apiVersion"], topic["kind"])]
    for broken in (
        {**topic, "spec": {**topic["spec"], "partitions": "four"}},
        {**topic, "spec": {**topic["spec"], "replica": 3}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema, cls=jsonschema.Draft7Validator)


# -- image, namespace, config hash -----------------------------------------------------


def _overlay_image(tree: str) -> str:
    path = kustomize.DEPLOY / "overlays" / tree / "kustomization.yaml"
    (image,) = [i for i in yaml.safe_load(path.read_text())["images"] if i["name"] == "tayori"]
    return f"{image['newName']}:{image['newTag']}"


@pytest.mark.parametrize("tree", kustomize.TREES)
def test_the_image_override_reaches_every_container(tree: str) -> None:
    expected = "tayori" if tree == "base" else _overlay_image(tree)
    if tree != "base":
        assert not expected.startswith("tayori"), f"{tree} does not point the image anywhere"
    images = [
        (d["metadata"]["name"], c["name"], c["image"])
        for d in _of_kind(tree, "Deployment")
        for c in _containers(d)
    ]
    # A service container and a migration initContainer per service and for the console, but
    # deliverability, which has no database (no initContainer): 15.
    assert len(images) == sum(2 if _has_database(c) else 1 for c in COMPONENTS) == 15
    wrong = [entry for entry in images if entry[2] != expected]
    assert not wrong, f"{tree}: containers not on {expected}: {wrong}"


@pytest.mark.parametrize("tree", kustomize.TREES)
def test_namespace(tree: str) -> None:
    for doc in kustomize.render(tree):
        assert doc["metadata"].get("namespace") == NAMESPACES[tree], _rid((tree, doc))


@pytest.mark.parametrize("tree", kustomize.TREES)
def test_pods_read_the_generated_config_and_secret(tree: str) -> None:
    config = _generated(tree, "ConfigMap", CONFIG_MAP)["metadata"]["name"]
    secrets = [d for d in _of_kind(tree, "Secret") if d["metadata"]["name"].startswith(SECRET)]
    if tree == "prod":
        # Created out of band (README step 1): referred to by its plain name.
        assert not secrets
        secret = SECRET
    else:
        secret = _generated(tree, "Secret", SECRET)["metadata"]["name"]
    for deployment in _of_kind(tree, "Deployment"):
        for container in _containers(deployment):
            refs = container["envFrom"]
            assert [r["configMapRef"]["name"] for r in refs if "configMapRef" in r] == [config]
            assert [r["secretRef"]["name"] for r in refs if "secretRef" in r] == [secret]


def _config_edit(root: Path) -> None:
    path = root / "base" / "config.env"
    path.write_text(path.read_text().replace("DB_POOL_SIZE=10", "DB_POOL_SIZE=12"))


@pytest.mark.parametrize("tree", kustomize.TREES)
def test_a_config_edit_rolls_every_deployment(tree: str) -> None:
    before = kustomize.render(tree)
    after = kustomize.render_copy(tree, _config_edit)

    def templates(docs: Any) -> dict[str, str]:
        return {
            d["metadata"]["name"]: json.dumps(d["spec"]["template"], sort_keys=True)
            for d in docs
            if d["kind"] == "Deployment"
        }

    old, new = templates(before), templates(after)
    assert old.keys() == new.keys()
    # A changed pod template is what makes the Deployment controller roll the pods.
    unchanged = [name for name in old if old[name] == new[name]]
    assert not unchanged, f"{tree}: a config edit leaves {unchanged} running the old pods"


@pytest.mark.parametrize("tree", OVERLAYS)
def test_overlay_config_keeps_every_key_and_points_links_at_its_ingresses(tree: str) -> None:
    base = _generated("base", "ConfigMap", CONFIG_MAP)["data"]
    data = _generated(tree, "ConfigMap", CONFIG_MAP)["data"]
    assert set(data) == set(base), sorted(set(data) ^ set(base))
    hosts = {}
    for name in ("tayori-public", "tayori-console"):
        ingress = _one(tree, "Ingress", name)
        hosts[name] = {rule["host"] for rule in ingress["spec"]["rules"]}
        tls_hosts = {h for entry in ingress["spec"]["tls"] for h in entry["hosts"]}
        base_hosts = {rule["host"] for rule in _one("base", "Ingress", name)["spec"]["rules"]}
        assert hosts[name] and hosts[name] <= tls_hosts, f"{tree}: {name} host"
        assert not hosts[name] & base_hosts, f"{tree}: {name} keeps the placeholder host"
    assert not hosts["tayori-public"] & hosts["tayori-console"], f"{tree}: one host for both"
    for key in ("TAYORI_PUBLIC_URL", "TAYORI_TRACKING_URL"):
        url = urlsplit(data[key])
        assert url.scheme == "https" and url.hostname in hosts["tayori-public"], f"{tree}: {key}"
    console_url = urlsplit(_env(tree, CONSOLE)["CONSOLE_PUBLIC_URL"])
    assert console_url.scheme == "https" and console_url.hostname in hosts["tayori-console"]
    # The export mails' download links open the console (which logs in, then downloads).
    assert urlsplit(data["EXPORTER_PUBLIC_URL"]).hostname == console_url.hostname, tree


def test_dashboard_config_map_is_for_the_grafana_sidecar() -> None:
    source = json.loads((kustomize.DEPLOY / "base" / "dashboards" / "tayori.json").read_text())
    for tree in kustomize.TREES:
        config_map = _one(tree, "ConfigMap", DASHBOARDS)
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(config_map["data"]["tayori.json"]) == source


# -- replicas and resources ------------------------------------------------------------

_UNITS = {"m": 1e-3, "": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}


def _quantity(value: str | int) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([a-zA-Z]*)", str(value)).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


@pytest.mark.parametrize("tree", kustomize.TREES)
def test_resources_requests_within_limits(tree: str) -> None:
    for deployment in _of_kind(tree, "Deployment"):
        for container in _containers(deployment):
            resources = container["resources"]
            for key in ("cpu", "memory"):
                request, limit = resources["requests"][key], resources["limits"][key]
                assert _quantity(request) <= _quantity(limit), (container["name"], key)


def _replicas(tree: str, deployment: dict[str, Any]) -> tuple[int, int]:
    name = deployment["metadata"]["name"]
    hpas = [
        h
        for h in _of_kind(tree, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == name
    ]
    if hpas:
        assert "replicas" not in deployment["spec"], f"{tree}: the HPA owns {name}'s replicas"
        return hpas[0]["spec"]["minReplicas"], hpas[0]["spec"]["maxReplicas"]
    return deployment["spec"]["replicas"], deployment["spec"]["replicas"]


@pytest.mark.parametrize("tree", kustomize.TREES)
def test_replicas_and_disruption_budgets_allow_a_drain(tree: str) -> None:
    for deployment in _of_kind(tree, "Deployment"):
        low, _ = _replicas(tree, deployment)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        (pdb,) = [
            p
            for p in _of_kind(tree, "PodDisruptionBudget")
            if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        spec = pdb["spec"]
        # A drain must be able to evict one pod at the smallest replica count.
        allowed = spec["maxUnavailable"] if "maxUnavailable" in spec else low - spec["minAvailable"]
        assert allowed >= 1, f"{tree}: {pdb['metadata']['name']} blocks every drain"


def test_overlay_replicas() -> None:
    dev = [_replicas("dev", d)[0] for d in _of_kind("dev", "Deployment")]
    assert set(dev) == {1}, "dev runs one replica of each service"
    prod = {d["metadata"]["name"]: _replicas("prod", d)[0] for d in _of_kind("prod", "Deployment")}
    # deliverability runs one replica everywhere (its tables answer for the partitions it owns)
    assert min(v for k, v in prod.items() if k != "tayori-deliverability") >= 2, prod
    assert prod["tayori-deliverability"] == 1, prod
    # The services on the public path (unsubscribe pages, tracking, inbound mail) get three.
    assert prod["tayori-suppression"] >= 3 and prod["tayori-bounce-processor"] >= 3, prod


# -- NetworkPolicies -------------------------------------------------------------------
# A small evaluator of Kubernetes NetworkPolicy semantics: a pod selected by no policy of a
# direction is open in that direction; a selected one lets through what any rule allows.

#: A peer: (namespace labels, pod labels); pod labels None = an address outside the cluster.
Peer = tuple[dict[str, str], dict[str, str] | None]
NAMESPACE = "tayori"
OWN_NAMESPACE = {"kubernetes.io/metadata.name": NAMESPACE}
OUTSIDE: Peer = ({}, None)
INGRESS_CONTROLLER: Peer = (
    {"kubernetes.io/metadata.name": "ingress-nginx"},
    {"app.kubernetes.io/name": "ingress-nginx"},
)
PROMETHEUS: Peer = (
    {"kubernetes.io/metadata.name": "monitoring"},
    {"app.kubernetes.io/name": "prometheus"},
)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        if operator in ("In", "NotIn"):
            ok = (labels.get(key) in expression["values"]) == (operator == "In")
        else:
            ok = (key in labels) == (operator == "Exists")
        if not ok:
            return False
    return True


def _peer_matches(rule_peer: dict[str, Any], peer: Peer) -> bool:
    namespace_labels, pod_labels = peer
    if "ipBlock" in rule_peer:
        return pod_labels is None and rule_peer["ipBlock"]["cidr"] in ("0.0.0.0/0", "::/0")
    if pod_labels is None:
        return False
    if "namespaceSelector" in rule_peer:
        if not _selects(rule_peer["namespaceSelector"], namespace_labels):
            return False
    elif namespace_labels != OWN_NAMESPACE:
        return False
    return _selects(rule_peer.get("podSelector", {}), pod_labels)


def _port_matches(ports: list[dict[str, Any]] | None, port: tuple[str, int, str]) -> bool:
    protocol, number, name = port
    for entry in ports or [{}]:
        if entry.get("protocol", "TCP") != protocol:
            continue
        wanted = entry.get("port")
        if wanted is None or wanted == name:
            return True
        if isinstance(wanted, int) and wanted <= number <= entry.get("endPort", wanted):
            return True
    return False


def _allowed(
    tree: str, direction: str, pod: dict[str, str], peer: Peer, port: tuple[str, int, str]
) -> bool:
    """Whether a policy lets ``pod`` (in the tayori namespace) talk with ``peer`` on ``port``
    (the destination's protocol, number and container port name) in ``direction``."""
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    policies = [
        p["spec"]
        for p in _of_kind(tree, "NetworkPolicy")
        if _selects(p["spec"]["podSelector"], pod) and direction in p["spec"]["policyTypes"]
    ]
    if not policies:
        return True
    return any(
        (peers_key not in rule or any(_peer_matches(p, peer) for p in rule[peers_key]))
        and _port_matches(rule.get("ports"), port)
        for spec in policies
        for rule in spec.get(key, [])
    )


def _pods(tree: str) -> dict[str, dict[str, str]]:
    """Service → the labels of its pods."""
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["metadata"][
            "labels"
        ]
        for d in _of_kind(tree, "Deployment")
    }


HTTP = ("TCP", HTTP_PORT, "http")


def _env(tree: str, component: str) -> dict[str, str]:
    """The environment a component's container gets in a tree: the generated ConfigMap with
    the container's own ``env`` over it (the console's CONSOLE_*_URL)."""
    env = dict(_generated(tree, "ConfigMap", CONFIG_MAP)["data"])
    (container,) = _one(tree, "Deployment", _name(component))["spec"]["template"]["spec"][
        "containers"
    ]
    env.update({entry["name"]: entry["value"] for entry in container.get("env", [])})
    return env


def _http_calls() -> set[tuple[str, str]]:
    """(caller, callee) of every setting whose value in the caller's environment (config.env,
    the Deployment's env) is the URL of another service (CONTACTS_URL, SCHEDULER_URL, the
    console's CONSOLE_*_URL): the calls SPEC's flows make over HTTP."""
    hosts = {_name(service): service for service in COMPONENTS}
    root = Path(__file__).resolve().parents[2] / "services"
    calls = set()
    for caller in COMPONENTS:
        config = _env("base", caller)
        sources = "\n".join(p.read_text() for p in sorted((root / caller).glob("*.py")))
        for env_name in re.findall(r'\benv\(\s*"([A-Z_]+_URL)"', sources):
            callee = hosts.get(urlsplit(config.get(env_name, "")).hostname or "")
            if callee and callee != caller:
                calls.add((caller, callee))
    return calls


@pytest.mark.parametrize("tree", kustomize.TREES)
def test_network_policies_close_every_pod_by_default(tree: str) -> None:
    stranger_here: Peer = (OWN_NAMESPACE, {"app": "something-else"})
    stranger_there: Peer = ({"kubernetes.io/metadata.name": "other"}, {"app": "x"})
    for service, pod in _pods(tree).items():
        for peer in (stranger_here, stranger_there):
            assert not _allowed(tree, "Ingress", pod, peer, HTTP), f"{tree}: {service} open"
        # Egress is closed too: nothing to other pods or the internet on an unlisted port.
        assert not _allowed(tree, "Egress", pod, OUTSIDE, ("TCP", 443, "https")), service
        assert not _allowed(tree, "Egress", pod, stranger_here, HTTP), service


@pytest.mark.parametrize("tree", kustomize.TREES)
def test_services_reach_each_other_only_where_they_call_over_http(tree: str) -> None:
    calls = _http_calls()
    assert ("scheduler", "contacts") in calls and ("exporter", "scheduler") in calls  # works
    assert {callee for caller, callee in calls if caller == CONSOLE} == set(CONSOLE_CALLS)
    pods = _pods(tree)
    for caller, caller_pod in pods.items():
        for callee, callee_pod in pods.items():
            if caller == callee:
                continue
            reachable = _allowed(
                tree, "Egress", caller_pod, (OWN_NAMESPACE, callee_pod), HTTP
            ) and _allowed(tree, "Ingress", callee_pod, (OWN_NAMESPACE, caller_pod), HTTP)
            assert reachable == ((caller, callee) in calls), (
                f"{tree}: {caller} → {callee} over HTTP is "
                f"{'open' if reachable else 'closed'}, calls are {sorted(calls)}"
            )


@pytest.mark.parametrize("tree", kustomize.TREES)
def test_the_ingress_controller_reaches_only_the_services_with_public_routes(tree: str) -> None:
    for service, pod in _pods(tree).items():
        # The console's screens are served on a host of their own (Ingress tayori-console).
        public = service == CONSOLE or any(is_public for _, _, is_public in _routes(service))
        reachable = _allowed(tree, "Ingress", pod, INGRESS_CONTROLLER, HTTP)
        assert reachable == public, f"{tree}: ingress controller → {service}: {reachable}"


@pytest.mark.parametrize("tree", kustomize.TREES)
def test_prometheus_scrapes_every_service(tree: str) -> None:
    not_prometheus: Peer = (PROMETHEUS[0], {"app.kubernetes.io/name": "grafana"})
    for service, pod in _pods(tree).items():
        assert _allowed(tree, "Ingress", pod, PROMETHEUS, HTTP), service
        assert not _allowed(tree, "Ingress", pod, not_prometheus, HTTP), service


@pytest.mark.parametrize("tree", kustomize.TREES)
def test_egress_to_dns_postgres_kafka_and_smtp_for_the_sender(tree: str) -> None:
    needs = [("UDP", 53, "dns"), ("TCP", 53, "dns"), ("TCP", 5432, "postgresql")]
    needs += [("TCP", port, "kafka") for port in (9092, 9093, 9094)]
    smtp = [("TCP", port, "smtp") for port in (25, 465, 587)]
    for service, pod in _pods(tree).items():
        for port in needs:
            assert _allowed(tree, "Egress", pod, OUTSIDE, port), f"{tree}: {service} {port}"
        for port in smtp:
            sends = _allowed(tree, "Egress", pod, OUTSIDE, port)
            assert sends == (service == "sender"), f"{tree}: {service} SMTP out {port}"


@pytest.mark.parametrize("tree", kustomize.TREES)
def test_only_inbound_bounce_mail_comes_from_outside(tree: str) -> None:
    for service, pod in _pods(tree).items():
        smtp_in = _allowed(tree, "Ingress", pod, OUTSIDE, ("TCP", 2525, "smtp"))
        assert smtp_in == (service == "bounce_processor"), f"{tree}: {service}"
        assert not _allowed(tree, "Ingress", pod, OUTSIDE, HTTP), f"{tree}: {service} http"


# -- deploy/k8s/README.md stays true to the files ---------------------------------------


def test_readme_lists_every_file_and_rolls_out_every_deployment() -> None:
    readme = (kustomize.DEPLOY / "README.md").read_text()
    table = set(re.findall(r"^\| `([^`]+)` \|", readme, re.MULTILINE))
    files = {
        str(path.relative_to(kustomize.DEPLOY))
        for tree in ("base", "overlays")
        for path in (kustomize.DEPLOY / tree).rglob("*")
        # overlays/*/secrets.env: an operator's own, git-ignored
        if path.is_file() and not (path.name == "secrets.env" and tree == "overlays")
    }
    # beside the trees: the runbook and the alert rules' tests
    files |= {p.name for p in kustomize.DEPLOY.iterdir() if p.is_file() and p.name != "README.md"}
    assert files <= table, f"not in the README's file table: {sorted(files - table)}"
    assert table <= files, f"in the table but not on disk: {sorted(table - files)}"
    rolled = set(re.findall(r"rollout status deployment/([\w-]+)", readme))
    deployments = {d["metadata"]["name"] for d in _of_kind("base", "Deployment")}
    assert rolled == deployments, f"rollout steps: {sorted(rolled ^ deployments)}"
