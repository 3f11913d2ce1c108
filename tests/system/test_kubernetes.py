"""Kubernetes discovery against a fake API server that follows the documented list/watch
semantics (tests/system/fakes/kube_api.py): merged slices, port by name, readiness, watch
timeouts resumed, 410 -> relist, token rotation, API server outage and return."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config.model import DiscoveryConfig
from gateway.discovery.base import ServiceQuery
from gateway.discovery.kubernetes import KubernetesBackend
from tests.system.conftest import (
    DiscoveryGateway,
    Load,
    NamedBackends,
    expect_outage_keeps_last_set,
    route_all,
    wait_for,
)
from tests.system.fakes.kube_api import FakeKubeAPI, endpoint, endpoint_slice
from tests.system.test_etcd import Recorder, until


@pytest.fixture(scope="session")
def kube_api() -> Iterator[FakeKubeAPI]:
    api = FakeKubeAPI()
    yield api
    api.close()


def ports(backends: NamedBackends) -> list[dict[str, Any]]:
    # Every slice also has a "metrics" port that points at the spare backend: choosing the
    # wrong port would send traffic there.
    return [
        {"name": "metrics", "port": backends.ports["spare"], "protocol": "TCP"},
        {"name": "http", "port": backends.ports["b1"], "protocol": "TCP"},
    ]


def slices_for(
    backends: NamedBackends, service: str, b2: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """b1 and b2 on one port, b3 on another: EndpointSlices group endpoints by port set."""
    same_port = ports(backends)
    b3_ports = [dict(same_port[0]), {**same_port[1], "port": backends.ports["b3"]}]
    b1_b2 = [endpoint("127.0.0.1", "pod-b1")]
    if b2 is not None:
        b1_b2.append(b2)
    return [
        endpoint_slice(f"{service}-a", service, b1_b2, same_port),
        endpoint_slice(f"{service}-b", service, [endpoint("127.0.0.1", "pod-b3")], b3_ports),
    ]


def test_kubernetes_follow_slices_and_outage(
    start_discovery_gateway: Callable[..., DiscoveryGateway],
    backends: NamedBackends,
    kube_api: FakeKubeAPI,
    load_factory: Callable[[int], Load],
    tmp_path: Path,
) -> None:
    # b2 listens on its own port, so it gets its own slice: three slices, merged.
    service = "web-k8s"
    token_file = tmp_path / "token"
    token_file.write_text("token-1\n")
    kube_api.set_tokens({"token-1"})
    kube_api.max_watch_seconds = 1.0  # watch streams end often: resumes are exercised
    b2_port = [ports(backends)[0], {**ports(backends)[1], "port": backends.ports["b2"]}]

    def b2_slice(**conditions: Any) -> dict[str, Any]:
        ep = endpoint("127.0.0.1", "pod-b2", **conditions)
        return endpoint_slice(f"{service}-c", service, [ep], b2_port)

    for item in [*slices_for(backends, service), b2_slice()]:
        kube_api.put_slice(item)
    config = {
        "discovery": {
            "k8s": {
                "type": "kubernetes",
                "address": kube_api.address,
                "token_file": str(token_file),
                "namespace": "default",
                "port": "http",
                "wait": "30s",
                "timeout": "500ms",
                "retry_min": "100ms",
                "retry_max": "500ms",
            }
        },
        "upstreams": {"web": {"discovery": "k8s", "service": service}},
        "routes": route_all("web"),
    }
    gw = start_discovery_gateway(config)
    wait_for(lambda: len(gw.upstream_addresses("web")) == 3, what="three instances")
    load = load_factory(gw.port)
    wait_for(lambda: load.names_since(0) >= {"b1", "b2", "b3"}, what="all three instances")

    # b2 starts terminating (ready false, terminating true): no traffic to it within 1 s.
    kube_api.put_slice(b2_slice(ready=False, serving=True, terminating=True))
    removed_at = time.monotonic()
    b2 = f"127.0.0.1:{backends.ports['b2']}"
    wait_for(lambda: b2 not in gw.upstream_addresses("web"), what="b2 dropped")
    load.wait_more(100)
    last_b2 = load.last_seen("b2")
    assert last_b2 is not None and last_b2 - removed_at <= 1.0
    assert load.names_since(load.results[-50][0]) == {"b1", "b3"}

    # Watches that time out are resumed from their resourceVersion, not relisted.
    lists = sum(r["kind"] == "list" for r in kube_api.requests)
    watches = sum(r["kind"] == "watch" for r in kube_api.requests)
    wait_for(
        lambda: sum(r["kind"] == "watch" for r in kube_api.requests) >= watches + 2,
        what="resumed watches",
    )
    assert sum(r["kind"] == "list" for r in kube_api.requests) == lists

    # The token rotates: the file changes and the old token stops working.
    token_file.write_text("token-2\n")
    kube_api.set_tokens({"token-2"})
    wait_for(lambda: any(r["token"] == "token-2" for r in kube_api.requests), what="rotated token")
    # History compacted: the next watch gets 410 and the backend relists.
    kube_api.send_bookmarks = False
    kube_api.compact()
    wait_for(lambda: sum(r["kind"] == "list" for r in kube_api.requests) > lists, what="relist")
    kube_api.send_bookmarks = True
    kube_api.delete_slice(f"{service}-c")
    assert len(gw.upstream_addresses("web")) == 2

    # The API server goes away: last set kept, stale, errors counted, traffic unharmed.
    kube_api.stop()
    try:
        expect_outage_keeps_last_set(gw, load, "k8s", {"b1", "b3"})
    finally:
        kube_api.start()

    wait_for(lambda: not gw.discovery()["upstreams"]["web"]["stale"], what="API server back")
    kube_api.put_slice(b2_slice())
    wait_for(lambda: b2 in gw.upstream_addresses("web"), what="b2 back")
    resumed = time.monotonic()
    wait_for(lambda: "b2" in load.names_since(resumed), what="traffic to b2 again")
    assert "spare" not in load.names_since(0)  # the metrics port was never used
    assert load.failures == []
    kube_api.set_tokens(set())
    kube_api.max_watch_seconds = 300.0


async def test_kubernetes_kubeconfig_token_port_number_and_410_status(
    kube_api: FakeKubeAPI, tmp_path: Path
) -> None:
    service = "api-k8s"
    kube_api.set_tokens({"kubeconfig-token"})
    kube_api.put_slice(
        endpoint_slice(
            f"{service}-1",
            service,
            [
                endpoint("127.0.0.1", "ready"),
                endpoint("127.0.0.2", "unknown", ready=None),  # unknown counts as ready
                endpoint("127.0.0.3", "not-ready", ready=False),
                endpoint("127.0.0.4", "draining", ready=False, serving=True, terminating=True),
            ],
            [{"name": "web", "port": 8080}],
            namespace="team",
        )
    )
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "contexts": [
                    {"name": "test", "context": {"cluster": "c", "user": "u", "namespace": "team"}}
                ],
                "clusters": [{"name": "c", "cluster": {"server": kube_api.address}}],
                "users": [{"name": "u", "user": {"token": "kubeconfig-token"}}],
            }
        )
    )
    kube_api.gone_as_http = True  # this time 410 comes as the HTTP status
    sink = Recorder()
    config = DiscoveryConfig(
        name="k8s",
        type="kubernetes",
        kubeconfig=str(kubeconfig),
        include_terminating=True,
        retry_min=0.05,
        retry_max=0.2,
    )
    backend = KubernetesBackend(config, sink)
    backend.watch(ServiceQuery(f"{service}:8080"))
    await backend.start()
    try:
        await until(lambda: sink.updates, "first answer")
        hosts = {i.host for i in sink.updates[-1]}
        assert hosts == {"127.0.0.1", "127.0.0.2", "127.0.0.4"}
        draining = next(i for i in sink.updates[-1] if i.host == "127.0.0.4")
        assert draining.meta["terminating"] == "true" and draining.id == "draining"
        lists = backend.lists
        kube_api.send_bookmarks = False
        kube_api.compact()
        # Make the open watch end so the next one starts from the compacted version.
        kube_api.stop()
        kube_api.start()
        await until(lambda: backend.lists > lists, "relist after HTTP 410", limit=15)
        assert not any("410" in str(e) for e in sink.failures)
    finally:
        await backend.stop()
        kube_api.gone_as_http = False
        kube_api.send_bookmarks = True
        kube_api.set_tokens(set())


def test_kubeconfig_client_certificate_data(tmp_path: Path) -> None:
    """Inline client certificate data is loaded into the TLS context (then removed)."""
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=gw"),
            *("-keyout", str(key), "-out", str(cert), "-days", "1"),
        ],
        check=True,
        capture_output=True,
    )
    from gateway.discovery.kubernetes import kubeconfig_access

    kubeconfig = tmp_path / "kubeconfig"
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "current-context": "x",
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": "https://127.0.0.1:6443",
                            "certificate-authority-data": b64(cert),
                        },
                    }
                ],
                "users": [
                    {
                        "name": "u",
                        "user": {
                            "client-certificate-data": b64(cert),
                            "client-key-data": b64(key),
                        },
                    }
                ],
            }
        )
    )
    access = kubeconfig_access(kubeconfig)
    assert access.server == "https://127.0.0.1:6443" and access.namespace == "default"
    assert access.token.get() is None
    context = access.ssl
    assert context is not None and not isinstance(context, bool)
    assert context.get_ca_certs()  # the inline CA was loaded
