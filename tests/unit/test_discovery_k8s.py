"""Pure parts of the Kubernetes backend: service syntax, slice filtering, credentials."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from gateway.discovery.base import DiscoveryError
from gateway.discovery.kubernetes import (
    TokenSource,
    endpoints_of,
    in_cluster_access,
    kubeconfig_access,
    parse_service,
)


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("users", ("ns", "users", None)),
        ("users:http", ("ns", "users", "http")),
        ("other/users:8080", ("other", "users", "8080")),
        ("other/users", ("other", "users", "dflt")),
    ],
)
def test_parse_service(service: str, expected: tuple[str, str, str | None]) -> None:
    default_port = "dflt" if service == "other/users" else None
    assert parse_service(service, "ns", default_port) == expected


def slice_(endpoints: list[dict[str, object]], ports: list[dict[str, object]]) -> dict[str, object]:
    return {"metadata": {"name": "s1"}, "endpoints": endpoints, "ports": ports}


def ep(address: str, **conditions: bool) -> dict[str, object]:
    return {"addresses": [address, "10.9.9.9"], "conditions": conditions}


def test_conditions_decide_membership() -> None:
    endpoints = [
        ep("10.0.0.1", ready=True),
        ep("10.0.0.2"),  # unknown: interpreted as ready
        ep("10.0.0.3", ready=False),
        ep("10.0.0.4", ready=False, serving=True, terminating=True),
        ep("10.0.0.5", ready=False, serving=False, terminating=True),
    ]
    ports = [{"name": "http", "port": 80}]
    assert [i.host for i in endpoints_of(slice_(endpoints, ports), None)] == [
        "10.0.0.1",
        "10.0.0.2",
    ]
    with_terminating = endpoints_of(slice_(endpoints, ports), None, include_terminating=True)
    assert [i.host for i in with_terminating] == ["10.0.0.1", "10.0.0.2", "10.0.0.4"]
    assert with_terminating[-1].meta["terminating"] == "true"


def test_port_by_name_number_or_only_one() -> None:
    endpoints = [ep("10.0.0.1")]
    two = [{"name": "http", "port": 8080}, {"name": "metrics", "port": 9090}]
    assert [i.port for i in endpoints_of(slice_(endpoints, two), "metrics")] == [9090]
    assert [i.port for i in endpoints_of(slice_(endpoints, two), "8080")] == [8080]
    assert endpoints_of(slice_(endpoints, two), "grpc") == []  # no such port in this slice
    with pytest.raises(ValueError, match="several ports"):
        endpoints_of(slice_(endpoints, two), None)
    only = [{"port": 7000}]
    assert [i.port for i in endpoints_of(slice_(endpoints, only), None)] == [7000]


def test_malformed_endpoint_is_an_error() -> None:
    with pytest.raises(ValueError, match="no addresses"):
        endpoints_of(slice_([{"addresses": []}], [{"port": 1}]), None)


def test_in_cluster_access(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok-1\n")
    (tmp_path / "namespace").write_text("team-a")
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    access = in_cluster_access(env, tmp_path)
    assert access.server == "https://[fd00::1]:443"
    assert access.namespace == "team-a"
    assert access.token.get() == "tok-1"
    with pytest.raises(DiscoveryError, match="KUBERNETES_SERVICE_HOST"):
        in_cluster_access({}, tmp_path)


def test_token_file_is_reread_when_it_rotates(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("old")
    source = TokenSource(path=path)
    assert source.get() == "old"
    assert source.get() == "old" and source.reads == 1  # unchanged: not read again
    path.write_text("newer")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert source.get() == "newer"
    path.unlink()
    assert source.get() == "newer"  # a vanished file keeps the last token
    assert TokenSource("fixed").get() == "fixed"


def test_kubeconfig_token_file_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file")
    path = tmp_path / "config"
    path.write_text(
        yaml.safe_dump(
            {
                "current-context": "b",
                "contexts": [
                    {"name": "a", "context": {"cluster": "c", "user": "u"}},
                    {"name": "b", "context": {"cluster": "c", "user": "u", "namespace": "x"}},
                ],
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:8001/"}}],
                "users": [{"name": "u", "user": {"tokenFile": "token"}}],
            }
        )
    )
    access = kubeconfig_access(path)
    assert (access.server, access.namespace, access.ssl) == ("http://127.0.0.1:8001", "x", None)
    assert access.token.get() == "from-file"
    with pytest.raises(DiscoveryError, match="no context named 'zzz'"):
        kubeconfig_access(path, "zzz")
