"""``pip wheel .`` builds the compiled hot path into the wheel, and falls back to pure Python.

Each test builds a wheel from a copy of the tree (pip's own build isolation, as a user's
``pip install .`` would), unpacks it and imports the unpacked package in a fresh interpreter,
from outside the tree, to read what ``gateway version`` would print. About 15 s per build.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gateway import compiled

ROOT = compiled.PACKAGE_DIR.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)
_MODES = (
    "from gateway import compiled; import json; "
    "print(json.dumps([compiled.module_modes(), compiled.report().splitlines()[-1]]))"
)

pytestmark = pytest.mark.timeout(240)


def _wheel(
    tmp_path: Path, env: dict[str, str], without_mypy: bool = False
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCES)
    if without_mypy:  # the isolated build environment then has no mypyc
        pyproject = source / "pyproject.toml"
        text = pyproject.read_text()
        assert ', "mypy>=1.10"]' in text
        pyproject.write_text(text.replace(', "mypy>=1.10"]', "]", 1))
    out = tmp_path / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(out), "-v"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("pygateway-*.whl")
    return wheel, done


def _modes_of_unpacked(wheel: Path, into: Path, pure: bool) -> tuple[dict[str, str], str]:
    if not into.exists():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(into)
    env = {**os.environ, "PYTHONPATH": str(into)}
    env.pop(compiled.PURE_ENV, None)
    if pure:
        env[compiled.PURE_ENV] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _MODES],
        cwd=into.parent,  # not the tree: its gateway package must not be the one imported
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    modes, last_line = json.loads(done.stdout)
    return modes, last_line


def test_the_wheel_carries_the_compiled_modules(tmp_path: Path) -> None:
    wheel, _ = _wheel(tmp_path, {})
    assert not wheel.name.endswith("-none-any.whl"), wheel.name  # extensions: a platform wheel
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("gateway/_compiled/manifest.json"))
    for module in compiled.COMPILED_MODULES:
        relative = Path(*module.split("."))
        assert f"gateway/_compiled/{relative}{SUFFIX}" in names, module
        assert f"{relative}.py" in names, module  # the sources stay, for the pure mode
        source = (ROOT / relative).with_suffix(".py")
        assert (
            manifest["modules"][module]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        )
    assert manifest["support"], "mypyc's shared runtime library is missing"
    for support in manifest["support"].values():
        assert f"gateway/_compiled/{support}" in names

    unpacked = tmp_path / "site"
    modes, last_line = _modes_of_unpacked(wheel, unpacked, pure=False)
    assert modes == dict.fromkeys(compiled.COMPILED_MODULES, "compiled")
    assert last_line == f"compiled build: {unpacked / 'gateway' / '_compiled'}"
    modes, last_line = _modes_of_unpacked(wheel, unpacked, pure=True)
    assert modes == dict.fromkeys(compiled.COMPILED_MODULES, "pure")
    assert last_line == f"compiled modules not in use: {compiled.PURE_ENV}=1"


def _assert_pure_wheel(wheel: Path, tmp_path: Path) -> None:
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert not [name for name in names if name.startswith("gateway/_compiled/")]
    assert "gateway/proxy/headers.py" in names
    modes, last_line = _modes_of_unpacked(wheel, tmp_path / "site", pure=False)
    assert modes == dict.fromkeys(compiled.COMPILED_MODULES, "pure")
    assert last_line == (
        "compiled modules not in use: not built (make compile, or pip install . with a C compiler)"
    )


def test_without_a_compiler_the_wheel_is_pure_python(tmp_path: Path) -> None:
    wheel, done = _wheel(tmp_path, {"CC": str(tmp_path / "no-such-cc")})
    assert "gateway builds pure Python only: no C compiler" in done.stdout + done.stderr
    _assert_pure_wheel(wheel, tmp_path)


def test_without_mypyc_the_wheel_is_pure_python(tmp_path: Path) -> None:
    wheel, done = _wheel(tmp_path, {}, without_mypy=True)
    assert "gateway builds pure Python only: mypyc is not installed" in done.stdout + done.stderr
    _assert_pure_wheel(wheel, tmp_path)
    # What `gateway version` prints from that install: every hot-path module pure, and why.
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    env.pop(compiled.PURE_ENV, None)
    version = subprocess.run(
        [sys.executable, "-m", "gateway", "version"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert version[0] == __import__("gateway").__version__
    for module in compiled.COMPILED_MODULES:
        assert f"{module}: pure" in version
    assert version[-1] == (
        "compiled modules not in use: not built (make compile, or pip install . with a C compiler)"
    )
