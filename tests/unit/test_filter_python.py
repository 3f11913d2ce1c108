"""`python` filters: a class loaded by module path at config load (here the sample package in
examples/tenant_filter), its own validate_config errors reported at file:line, and load
failures as config errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigInvalid, load_config
from gateway.filters.chain import Chain
from gateway.filters.registry import build_filters
from tests.filters_support import header, reply_of, request

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tenant_filter"


def _load(tmp_path: Path, entry: str) -> list[object]:
    config = tmp_path / "gw.yaml"
    config.write_text(f"filters:\n  - python:\n{entry}")
    return list(load_config(config, require_routes=False).filters)


def test_the_sample_package_is_loaded_by_module_path(tmp_path: Path) -> None:
    specs = _load(
        tmp_path,
        f"      class: 'tenant_filter:TenantHeader'\n      path: {EXAMPLE}\n"
        "      config: {header: x-tenant, tenants: [acme]}\n",
    )
    (item,) = build_filters(tuple(specs))  # type: ignore[arg-type]
    assert item.name == "tenant_filter:TenantHeader"
    chain = Chain("api", [item])
    req = request(host="acme.api.example", headers=[(b"x-tenant", b"spoofed")])
    assert chain.on_request_headers(req, lambda _: None) is None
    assert header(req.headers, b"x-tenant") == b"acme"
    assert req.vars["tenant"] == "acme"
    refused = chain.on_request_headers(request(host="initech.api.example"), lambda _: None)
    assert reply_of(refused).status == 403


def test_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins" / "mine_relative"
    plugins.mkdir(parents=True)
    (plugins / "__init__.py").write_text(
        "from gateway.filters.base import Filter\nclass Mine(Filter):\n    pass\n"
    )
    (spec,) = _load(tmp_path, "      class: 'mine_relative:Mine'\n      path: plugins\n")
    assert spec.cls.__name__ == "Mine"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("entry", "line", "path", "message"),
    [
        (
            "      class: 'no_such_module_xyz:Thing'\n",
            3,
            "filters[0].python.class",
            "cannot import 'no_such_module_xyz': ModuleNotFoundError",
        ),
        (
            "      class: 'tenant_filter:Missing'\n      path: {example}\n",
            3,
            "filters[0].python.class",
            "module 'tenant_filter' has no 'Missing'",
        ),
        (
            "      class: 'collections:OrderedDict'\n",
            3,
            "filters[0].python.class",
            "is not a subclass of gateway.filters.base.Filter",
        ),
        (
            "      class: 'tenant_filter:TenantHeader'\n      path: {example}\n"
            "      config:\n        header: 12\n",
            6,
            "filters[0].python.config.header",
            "expected a header name",
        ),
        (
            "      class: 'tenant_filter:TenantHeader'\n      path: {example}\n"
            "      config:\n        colour: red\n",
            6,
            "filters[0].python.config",
            "unknown option 'colour'",
        ),
        (
            "      class: 'tests.unit.test_filter_python:Crashing'\n",
            3,  # no config key: the python entry's line
            "filters[0].python.config",
            "validate_config raised ZeroDivisionError",
        ),
        ("      class: 'not a path'\n", 3, "filters[0].python.class", "package.module:ClassName"),
    ],
)
def test_load_errors(tmp_path: Path, entry: str, line: int, path: str, message: str) -> None:
    with pytest.raises(ConfigInvalid) as info:
        _load(tmp_path, entry.replace("{example}", str(EXAMPLE)))
    (error,) = info.value.errors
    assert (error.line, error.path) == (line, path), error
    assert message in error.message


from gateway.filters.base import Filter  # noqa: E402  (the class the table above refers to)


class Crashing(Filter):
    @classmethod
    def validate_config(cls, options: object) -> list[str]:
        return [str(1 / 0)]


class FailsToBuild(Filter):
    def __init__(self, options: object) -> None:
        raise KeyError("needs a 'header' option")


def test_a_constructor_error_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalid) as info:
        _load(tmp_path, "      class: 'tests.unit.test_filter_python:FailsToBuild'\n")
    (error,) = info.value.errors
    assert error.line == 3 and "cannot build the filter: KeyError" in error.message
