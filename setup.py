"""Build hook: ``pip install .`` and ``pip wheel .`` put the compiled hot path into the package.

The metadata is in pyproject.toml; this file only adds one step to ``build_py``: after the
sources are copied, ``gateway.compiled.build`` compiles ``COMPILED_MODULES`` with mypyc into
``gateway/_compiled/`` of the build (the same format as ``make compile``'s ``build/compiled/``,
chosen at import by ``gateway.compiled.install``). Without a C compiler, the Python headers or
mypyc, or with ``GATEWAY_PURE_PYTHON=1``, the package is built pure, with a warning, and the
install still succeeds. Editable installs (``pip install -e .``) compile nothing: they run the
live sources, and ``make compile`` builds for them, checked against those sources at import.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent


def _compiled() -> ModuleType:
    # Loaded from its file: importing the gateway package would need its dependencies, which an
    # isolated build environment does not have (compiled.py itself uses only the stdlib).
    spec = importlib.util.spec_from_file_location("_gateway_compiled", ROOT / "gateway/compiled.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMPILED = _compiled()


def _skip_reason() -> str | None:
    if os.environ.get(COMPILED.PURE_ENV) == "1":
        return f"{COMPILED.PURE_ENV}=1"
    problem: str | None = COMPILED.build_problem()
    return problem


class BuildPyCompiled(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        reason = _skip_reason()
        if reason is None:
            target = Path(self.build_lib) / "gateway" / COMPILED.PACKAGED_DIR.name
            try:
                COMPILED.build(target, COMPILED.COMPILED_MODULES)
            except (RuntimeError, OSError) as error:
                reason = str(error)
        if reason is not None:
            print(f"warning: gateway builds pure Python only: {reason}", file=sys.stderr)


class CompiledDistribution(Distribution):
    # A wheel with extension files must carry the interpreter and platform tags. Decided before
    # the build runs (bdist_wheel asks first); a build that then fails leaves a pure package
    # under those tags, which still installs on the interpreter it was built with.
    def has_ext_modules(self) -> bool:
        return _skip_reason() is None


setup(cmdclass={"build_py": BuildPyCompiled}, distclass=CompiledDistribution)
