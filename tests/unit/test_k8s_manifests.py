"""The Kubernetes manifests in config/kubernetes/ parse and refer to each other consistently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import load_config_text

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "config" / "kubernetes"


def documents() -> list[dict[str, Any]]:
    out = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and doc.get("kind"), f"{path.name}: not a manifest"
            assert doc.get("apiVersion") and doc["metadata"].get("name"), path.name
            out.append(doc)
    return out


def one(kind: str) -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    files = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_everything_lives_in_the_one_namespace() -> None:
    namespace = one("Namespace")["metadata"]["name"]
    for doc in documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, doc["kind"]


def test_rbac_allows_list_and_watch_on_endpointslices_for_the_service_account() -> None:
    account, role, binding = one("ServiceAccount"), one("Role"), one("RoleBinding")
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["discovery.k8s.io"]
    assert rule["resources"] == ["endpointslices"]
    assert set(rule["verbs"]) == {"list", "watch"}
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {
        "kind": "ServiceAccount",
        "name": account["metadata"]["name"],
        "namespace": account["metadata"]["namespace"],
    } in binding["subjects"]
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account.get("automountServiceAccountToken", True) is not False


def test_deployment_mounts_the_configmap_it_runs_and_probes_readyz() -> None:
    deployment, configmap = one("Deployment"), one("ConfigMap")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    config_path = Path(args[args.index("-c") + 1])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
    source = volumes[mount["name"]]["configMap"]
    assert source["name"] == configmap["metadata"]["name"]
    keys = {i["path"]: i["key"] for i in source.get("items", [])}
    key = keys.get(config_path.name, config_path.name)
    assert key in configmap["data"]

    # The mounted YAML is a valid gateway config that discovers through Kubernetes.
    config = load_config_text(configmap["data"][key], f"configmap:{key}")
    assert any(d.type == "kubernetes" for d in config.discovery.values())
    assert config.upstreams and all(u.discovery for u in config.upstreams.values())

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == config.listen.port and ports["admin"] == config.admin.port
    assert config.admin.host == "0.0.0.0"  # reachable by the kubelet's probes
    readiness = container["readinessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert readiness["port"] in (ports["admin"], "admin")
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("kind", ["Service", "PodDisruptionBudget"])
def test_selectors_match_the_pods(kind: str) -> None:
    deployment = one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = one(kind)["spec"]
    selector = spec["selector"].get("matchLabels", spec["selector"])
    assert selector and selector.items() <= labels.items()


def test_service_targets_a_named_container_port() -> None:
    (container,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    names = {p["name"] for p in container["ports"]}
    numbers = {p["containerPort"] for p in container["ports"]}
    for port in one("Service")["spec"]["ports"]:
        assert port["targetPort"] in names | numbers


def test_disruption_budget_leaves_room_for_evictions() -> None:
    replicas = one("Deployment")["spec"]["replicas"]
    budget = one("PodDisruptionBudget")["spec"]
    assert 0 < budget["minAvailable"] < replicas
