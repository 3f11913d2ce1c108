"""scripts/setup_system.sh: the one script `make test` and .ci/run use to install the system
servers. Run for real: a quick no-op when everything is installed, and a clear stop (exact
install command, exit 1, nothing attempted) when it cannot install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "setup_system.sh"
BASH = shutil.which("bash") or "/bin/bash"


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env
    )


def spy_bin(tmp_path: Path) -> tuple[Path, Path]:
    """A directory of fake apt-get / sudo that record being called (and do nothing)."""
    bin_dir = tmp_path / "spy"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for name in ("apt-get", "sudo"):
        fake = bin_dir / name
        fake.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nexit 1\n')
        fake.chmod(0o755)
    return bin_dir, calls


def test_everything_installed_is_a_quick_no_op(tmp_path: Path) -> None:
    bin_dir, calls = spy_bin(tmp_path)
    # VENV: this interpreter's venv exists, so the throwaway-venv probe is skipped as in make.
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": sys.prefix}
    check = run(["--check"], env)
    if check.returncode != 0:
        pytest.fail(f"this machine lacks what the suite needs:\n{check.stderr}")
    started = time.monotonic()
    result = run([], env)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert not calls.exists(), calls.read_text()  # no apt-get update, no sudo
    assert elapsed < 5.0, f"setup took {elapsed:.1f}s with nothing to install"


def test_no_root_and_no_sudo_says_what_to_install_and_stops(tmp_path: Path) -> None:
    # A PATH with the few tools the script itself runs, a fake `id` saying uid 1000, no sudo
    # and no wrk/redis-server/...: it must list the packages and the command, then exit 1.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "python3", "mktemp", "rm", "dirname", "sed", "cat"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bin_dir / "id").chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "VENV": sys.prefix}
    result = run([], env)
    assert result.returncode == 1
    assert "this is not root (and there is no sudo)" in result.stderr
    assert "redis-server: Redis rate-limit system tests" in result.stderr
    assert "as root, run:  apt-get update && apt-get install -y --no-install-recommends" in (
        result.stderr
    )
    install_line = next(line for line in result.stderr.splitlines() if "as root, run" in line)
    for package in ("wrk", "etcd-server", "zookeeper", "redis-server", "prometheus"):
        assert f" {package}" in install_line


def test_check_mode_lists_missing_without_installing(tmp_path: Path) -> None:
    bin_dir, calls = spy_bin(tmp_path)
    for tool in ("bash", "python3", "mktemp", "rm", "dirname", "sed", "cat", "id"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "VENV": sys.prefix}
    result = run(["--check"], env)
    assert result.returncode == 1
    assert "missing system packages:" in result.stderr
    assert "install them with:  sudo sh -c 'apt-get update && apt-get install" in result.stderr
    assert not calls.exists()


def test_unknown_option_is_refused() -> None:
    result = run(["--frobnicate"], dict(os.environ))
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_scripts_are_shellcheck_clean() -> None:
    # setup_system.sh installs shellcheck, so a missing one is a setup defect, not a skip.
    assert shutil.which("shellcheck"), "shellcheck is missing: run scripts/setup_system.sh"
    result = subprocess.run(
        ["shellcheck", str(SCRIPT), str(ROOT / ".ci" / "run")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout
