"""The compiled hot path (gateway/compiled.py) gives the same results as the pure modules.

The suite runs compiled when ``make compile`` has built the modules (``make test`` does). This
file compares the compiled module with its source, loaded apart, on the tables of
test_headers.py and test_normalize.py. Without a build the comparison is skipped, unless
``GATEWAY_REQUIRE_COMPILED=1``: then a missing or stale build fails, so that a run meant to
test the compiled modules cannot pass by skipping them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gateway import compiled
from gateway.config.model import PathsConfig
from tests.unit.test_headers import _RESPONSE_HEADS
from tests.unit.test_normalize import PATHS, REWRITTEN, TARGETS

REQUIRE_ENV = "GATEWAY_REQUIRE_COMPILED"
# Listed here: a mypyc native class has no __slots__ to read them from.
_RESPONSE_HEAD_ATTRIBUTES = ("reason", "fields", "content_length", "chunked", "upgrade")


def _compiled_module(name: str) -> ModuleType:
    module = importlib.import_module(name)
    if compiled.module_modes()[name] != "compiled":
        reason = f"{name} runs pure: {compiled.report().splitlines()[-1]}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)
    return module


def _pure_module(name: str) -> ModuleType:
    """The module's source, executed under a private name (the compiled one stays loaded)."""
    source = Path(compiled.PACKAGE_DIR.parent, *name.split(".")).with_suffix(".py")
    spec = importlib.util.spec_from_file_location(f"_pure_{name.replace('.', '_')}", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """A call's result, or its exception's type and message, as comparable values."""
    try:
        result = call()
    except Exception as error:  # the same error, with the same message, is the same outcome
        return ("raises", (type(error).__name__, str(error)))
    if type(result).__name__ == "ResponseHead":  # compare what it holds
        return ("value", tuple(getattr(result, name) for name in _RESPONSE_HEAD_ATTRIBUTES))
    return ("value", result)


@pytest.fixture(scope="module")
def headers_pair() -> tuple[ModuleType, ModuleType]:
    return _compiled_module("gateway.proxy.headers"), _pure_module("gateway.proxy.headers")


@pytest.fixture(scope="module")
def normalize_pair() -> tuple[ModuleType, ModuleType]:
    return _compiled_module("gateway.proxy.normalize"), _pure_module("gateway.proxy.normalize")


@pytest.mark.parametrize("raw", _RESPONSE_HEADS)
def test_parse_response_head_compiled_is_pure(
    headers_pair: tuple[ModuleType, ModuleType], raw: bytes
) -> None:
    fast, pure = headers_pair
    got = _outcome(lambda: fast.parse_response_head(raw))
    assert got[0] == "value"
    assert got == _outcome(lambda: pure.parse_response_head(raw))
    for status, keep_alive in ((200, True), (404, False)):
        built = fast.build_response_head(
            status,
            fast.parse_response_head(raw),
            request_id=b"rid",
            framing=b"content-length: 3\r\n",
            keep_alive=keep_alive,
        )
        assert built == pure.build_response_head(
            status,
            pure.parse_response_head(raw),
            request_id=b"rid",
            framing=b"content-length: 3\r\n",
            keep_alive=keep_alive,
        )


@pytest.mark.parametrize(
    "value",
    [b"abc-123", b"", b"a b", b"x" * 200, b"x" * 201, b"caf\xc3\xa9", b"x\x7f", b"abc\n"],
)
def test_request_id_and_authority_checks_compiled_are_pure(
    headers_pair: tuple[ModuleType, ModuleType], value: bytes
) -> None:
    fast, pure = headers_pair
    assert fast.valid_request_id(value) is pure.valid_request_id(value)
    assert fast.valid_authority(value) is pure.valid_authority(value)
    assert fast.valid_token(value) is pure.valid_token(value)


@pytest.mark.parametrize("peer_trusted", [False, True])
@pytest.mark.parametrize("upgrade", [None, b"websocket"])
def test_build_request_head_compiled_is_pure(
    headers_pair: tuple[ModuleType, ModuleType], peer_trusted: bool, upgrade: bytes | None
) -> None:
    fast, pure = headers_pair
    headers = [
        (b"accept", b"*/*"),
        (b"connection", b"keep-alive, x-private"),
        (b"x-private", b"1"),
        (b"x-forwarded-for", b"203.0.113.1"),
        (b"forwarded", b"for=203.0.113.1"),
        (b"te", b"trailers"),
    ]
    options: dict[str, Any] = {
        "host": b"api.example.com:8080",
        "client_host": b"public.example",
        "conn_tokens": frozenset({b"keep-alive", b"x-private"}),
        "client_ip": "2001:db8::1",
        "peer_trusted": peer_trusted,
        "request_id": b"rid-1",
        "framing": b"content-length: 5\r\n",
        "upgrade": upgrade,
        "proto": b"https",
        "client_cert": b"Hash=abc",
    }
    assert fast.build_request_head(b"GET", b"/x", headers, **options) == (
        pure.build_request_head(b"GET", b"/x", headers, **options)
    )


@pytest.mark.parametrize(("raw", "policy", "expected"), PATHS)
def test_normalize_path_compiled_is_pure(
    normalize_pair: tuple[ModuleType, ModuleType],
    raw: bytes,
    policy: PathsConfig,
    expected: bytes | None,
) -> None:
    fast, pure = normalize_pair
    got = _outcome(lambda: fast.normalize_path(raw, policy))
    assert got == _outcome(lambda: pure.normalize_path(raw, policy))
    assert got[0] == ("raises" if expected is None else "value")


@pytest.mark.parametrize(("target", "method", "expected"), TARGETS)
def test_parse_target_compiled_is_pure(
    normalize_pair: tuple[ModuleType, ModuleType], target: bytes, method: bytes, expected: Any
) -> None:
    fast, pure = normalize_pair
    assert _outcome(lambda: fast.parse_target(target, method)) == _outcome(
        lambda: pure.parse_target(target, method)
    )


@pytest.mark.parametrize(("path", "policy", "expected"), REWRITTEN)
def test_normalize_rewritten_compiled_is_pure(
    normalize_pair: tuple[ModuleType, ModuleType],
    path: bytes,
    policy: PathsConfig,
    expected: bytes | None,
) -> None:
    fast, pure = normalize_pair
    assert _outcome(lambda: fast.normalize_rewritten(path, policy)) == _outcome(
        lambda: pure.normalize_rewritten(path, policy)
    )


# -- the switch and the guard against stale builds ---------------------------------------------


def _modes_in_subprocess(env: dict[str, str]) -> dict[str, str]:
    code = "import json; from gateway import compiled; print(json.dumps(compiled.module_modes()))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=compiled.PACKAGE_DIR.parent,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    modes: dict[str, str] = json.loads(done.stdout)
    return modes


def test_pure_python_switch_forces_the_sources() -> None:
    modes = _modes_in_subprocess({compiled.PURE_ENV: "1"})
    assert modes == dict.fromkeys(compiled.COMPILED_MODULES, "pure")


def test_a_stale_or_foreign_build_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compiled, "_inactive_reason", compiled._inactive_reason)  # restored after
    # A manifest whose digest does not match the source, or made by another interpreter, must
    # leave the pure module in place (the extension would run code that is no longer there).
    for manifest in (
        {
            "interpreter": compiled._interpreter_tag(),
            "modules": {"gateway.proxy.headers": {"file": "x.so", "sha256": "0" * 64}},
            "support": {},
        },
        {"interpreter": "cpython-27 .so", "modules": {}, "support": {}},
    ):
        (tmp_path / compiled.MANIFEST).write_text(json.dumps(manifest))
        before = list(sys.meta_path)
        assert compiled.install(tmp_path) is False
        assert sys.meta_path == before
    assert compiled.install(tmp_path / "missing") is False


def test_gateway_version_reports_the_modes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "version"],
        cwd=compiled.PACKAGE_DIR.parent,
        env={**os.environ, compiled.PURE_ENV: "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0] == __import__("gateway").__version__
    assert lines[1].startswith(f"python {sys.version.split()[0]} ")
    assert "gateway.proxy.headers: pure" in lines
    assert f"compiled modules not in use: {compiled.PURE_ENV}=1" in lines


def test_no_compiler_is_a_build_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # setup.py builds pure Python (and says why) when this is not None.
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    problem = compiled.build_problem()
    assert problem is not None and problem.startswith("no C compiler")
    with pytest.raises(RuntimeError, match="no C compiler"):
        compiled.build(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_installed_build_is_preferred_to_the_checkout_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packaged = tmp_path / "_compiled"
    monkeypatch.setattr(compiled, "PACKAGED_DIR", packaged)
    assert compiled.default_build_dir() == compiled.BUILD_DIR  # a checkout: make compile's
    packaged.mkdir()
    (packaged / compiled.MANIFEST).write_text("{}")
    assert compiled.default_build_dir() == packaged  # pip install . put one in the package
