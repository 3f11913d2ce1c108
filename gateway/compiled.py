"""Optional compiled hot path: mypyc builds of the per-request modules (COMPILED_MODULES).

Two builds, one format: ``make compile`` (``gateway.compiled.main(["build"])``) compiles
``COMPILED_MODULES`` with mypyc into ``build/compiled/`` of a checkout; ``pip install .`` (and
``pip wheel .``) does the same into ``gateway/_compiled/`` of the installed package (setup.py).
Each holds the extension files and a manifest of the sources' sha256. At import of
``gateway``, :func:`install` puts a finder in front of the import system that loads the
compiled module instead of the source, but only when the manifest matches the source on disk
and this interpreter (a stale build is never run), and not when ``GATEWAY_PURE_PYTHON=1``.
The sources stay plain, type-annotated Python; without a build everything runs as before.
``gateway version`` shows which mode each module runs in (:func:`report`).

The extension files are kept out of the source tree on purpose: CPython prefers an extension
module to a ``.py`` of the same name in the same directory, so an in-place build would keep
running after its source changed.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["COMPILED_MODULES", "build", "build_problem", "install", "module_modes", "report"]

# The per-request modules mypyc compiles, each kept because it lowered the instructions per
# request (docs/instructions.md, "Compiled hot path: which modules pay", "The data plane
# compiled"). The data plane (listener ... connlimit, and the Exchange every phase reads and
# writes) pays only as one group: with any of it interpreted, each event crosses the boundary
# into native classes. Left out on purpose:
# - gateway/proxy/filtering.py and gateway/filters: under restructuring;
# - gateway/proxy/h2: the HTTP/2 side (h2/from_h1.TranslatedStream reaches the compiled phases
#   as an upstream.UpstreamLink, a protocol, so compiled code does not check its class);
# - gateway/resilience and gateway/health/outlier.py: not measured with the data plane
#   compiled (they cost +2.6k per request compiled under an interpreted data plane);
# - modules off the per-request path (rewrite, gcra, ...): no gain.
# The balancers come in together: an interpreted class cannot subclass a native one (Balancer).
COMPILED_MODULES: tuple[str, ...] = (
    "gateway.proxy.headers",
    "gateway.proxy.normalize",
    "gateway.proxy.body",
    "gateway.metrics",
    "gateway.routing.table",
    "gateway.balancing.base",
    "gateway.balancing.edf",
    "gateway.balancing.hash_key",
    "gateway.balancing.least_request",
    "gateway.balancing.maglev",
    "gateway.balancing.peak_ewma",
    "gateway.balancing.ring_hash",
    "gateway.balancing.round_robin",
    "gateway.balancing.slow_start",
    "gateway.balancing.weighted_random",
    "gateway.ratelimit.limiter",
    "gateway.ratelimit.local",
    "gateway.ratelimit.keys",
    # The data plane (one group: see above).
    "gateway.proxy.listener",
    "gateway.proxy.h1codec",
    "gateway.proxy.flowcontrol",
    "gateway.proxy.lifecycle",
    "gateway.proxy.relay",
    "gateway.proxy.failover",
    "gateway.proxy.attempt",
    "gateway.proxy.upstream",
    "gateway.proxy.downstream",
    "gateway.proxy.h1",
    "gateway.proxy.responses",
    "gateway.proxy.tunnel",
    "gateway.proxy.connlimit",
    "gateway.proxy.exchange",
)

PURE_ENV = "GATEWAY_PURE_PYTHON"
PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_DIR = PACKAGE_DIR.parent / "build" / "compiled"  # make compile, in a checkout
PACKAGED_DIR = PACKAGE_DIR / "_compiled"  # pip install . (setup.py), inside the package
MANIFEST = "manifest.json"

# Why the compiled modules are not in use, when they are not (for `gateway version`).
_inactive_reason: str | None = None
_active_dir: Path | None = None  # the build in use, when one is


def _source(module: str) -> Path:
    return PACKAGE_DIR.parent.joinpath(*module.split(".")).with_suffix(".py")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _interpreter_tag() -> str:
    return f"{sys.implementation.cache_tag} {importlib.machinery.EXTENSION_SUFFIXES[0]}"


class _CompiledFinder(importlib.abc.MetaPathFinder):
    """Resolves the compiled modules (and mypyc's shared runtime library) to their files."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(file))
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


def default_build_dir() -> Path:
    """The installed package's build when there is one, else the checkout's ``make compile``."""
    return PACKAGED_DIR if (PACKAGED_DIR / MANIFEST).is_file() else BUILD_DIR


def install(build_dir: Path | None = None) -> bool:
    """Use the compiled modules if a build matches the sources; True when it does."""
    global _inactive_reason, _active_dir
    if os.environ.get(PURE_ENV) == "1":
        _inactive_reason = f"{PURE_ENV}=1"
        return False
    build_dir = default_build_dir() if build_dir is None else build_dir
    try:
        manifest = json.loads((build_dir / MANIFEST).read_text())
    except FileNotFoundError:
        _inactive_reason = "not built (make compile, or pip install . with a C compiler)"
        return False
    except (OSError, ValueError) as error:
        _inactive_reason = f"unreadable build manifest: {error}"
        return False
    if manifest.get("interpreter") != _interpreter_tag():
        _inactive_reason = f"built for another interpreter ({manifest.get('interpreter')})"
        return False
    files: dict[str, Path] = {}
    for module, entry in manifest.get("modules", {}).items():
        source = _source(module)
        if not source.is_file() or _digest(source) != entry["sha256"]:
            _inactive_reason = f"stale build: {source.name} changed since (make compile)"
            return False
        files[module] = build_dir / entry["file"]
    for name, file in manifest.get("support", {}).items():
        files[name] = build_dir / file
    if not files or not all(file.is_file() for file in files.values()):
        _inactive_reason = "incomplete build (make compile)"
        return False
    sys.meta_path.insert(0, _CompiledFinder(files))
    _inactive_reason = None
    _active_dir = build_dir
    return True


def module_modes() -> dict[str, str]:
    """Each of COMPILED_MODULES -> "compiled" or "pure" (as imported now)."""
    modes: dict[str, str] = {}
    for module in COMPILED_MODULES:
        loaded = importlib.import_module(module)
        origin = getattr(loaded, "__file__", "") or ""
        modes[module] = "pure" if origin.endswith(".py") else "compiled"
    return modes


def report() -> str:
    """What `gateway version` prints after the version: interpreter and module modes."""
    import sysconfig

    build = sysconfig.get_config_var("CONFIG_ARGS") or ""
    flags = [flag for flag in ("--enable-optimizations", "--with-lto") if flag in build]
    lines = [
        f"python {sys.version.split()[0]} ({sys.implementation.name}, {sys.executable})",
        f"python build: {' '.join(flags) or 'no PGO/LTO'}",
    ]
    for module, mode in module_modes().items():
        lines.append(f"{module}: {mode}")
    if _inactive_reason is not None:
        lines.append(f"compiled modules not in use: {_inactive_reason}")
    elif _active_dir is not None:
        lines.append(f"compiled build: {_active_dir}")
    return "\n".join(lines)


def build_problem() -> str | None:
    """Why this interpreter cannot build the modules (no headers, compiler or mypyc), or None."""
    import shutil
    import sysconfig

    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not include.is_file():
        return f"no {include}: install the Python headers (Debian: python3-dev)"
    # setuptools compiles with $CC when it is set, else with the compiler Python was built with.
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler}): install gcc (Debian: build-essential)"
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc is not installed (it comes with mypy)"
    return None


def build(build_dir: Path = BUILD_DIR, modules: Sequence[str] = COMPILED_MODULES) -> Path:
    """Compile ``modules`` with mypyc into ``build_dir`` (replacing an earlier build).

    mypyc writes its output next to the sources it is given, so it runs on a copy of the
    package in a temporary directory; only the extension files and the manifest are kept.
    Raises RuntimeError with mypyc's output when the build fails (no compiler, no headers).
    """
    import shutil
    import subprocess
    import tempfile

    problem = build_problem()
    if problem is not None:
        raise RuntimeError(problem)
    with tempfile.TemporaryDirectory(prefix="gateway-mypyc-") as tmp:
        work = Path(tmp)
        shutil.copytree(
            PACKAGE_DIR, work / "gateway", ignore=shutil.ignore_patterns("__pycache__", "_compiled")
        )
        sources = [str(Path(*module.split(".")).with_suffix(".py")) for module in modules]
        # Third-party packages without stubs, or absent (an isolated wheel build has only the
        # build requirements), type as Any there; the compiled modules use none of them.
        (work / "mypy.ini").write_text("[mypy]\nignore_missing_imports = True\n")
        done = subprocess.run(
            [sys.executable, "-m", "mypyc", *sources],
            cwd=work,
            capture_output=True,
            text=True,
            env={**os.environ, "MYPYC_OPT_LEVEL": "3"},
        )
        if done.returncode != 0:
            raise RuntimeError(f"mypyc failed:\n{done.stdout}{done.stderr}")
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir(parents=True)
        manifest: dict[str, object] = {"interpreter": _interpreter_tag()}
        entries: dict[str, dict[str, str]] = {}
        for module, source in zip(modules, sources, strict=True):
            relative = Path(source).with_suffix(suffix)
            (build_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(work / relative, build_dir / relative)
            # The digest of the source that was compiled (the copy), not of today's file.
            entries[module] = {"file": str(relative), "sha256": _digest(work / source)}
        support: dict[str, str] = {}
        for library in work.glob(f"*__mypyc{suffix}"):  # mypyc's shared runtime of the group
            shutil.copy2(library, build_dir / library.name)
            support[library.name[: -len(suffix)]] = library.name
        manifest["modules"] = entries
        manifest["support"] = support
        (build_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return build_dir


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["build"]:
        print("usage: main(['build'])", file=sys.stderr)
        return 2
    try:
        out = build()
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"compiled {', '.join(COMPILED_MODULES)} into {out}")
    return 0
