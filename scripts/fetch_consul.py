"""Fetch a Consul binary for the system tests from Debian bullseye, with a private apt setup.

Debian's current release has no ``consul`` package; the previous one (bullseye) has 1.8.7. This
builds its own sources list from the machine's existing Debian mirror configuration (the same
URIs and keyring, with the suite name changed), runs ``apt-get update``/``apt-get download``
against private list and cache directories (the system's apt state is never touched), and
unpacks the package with ``dpkg-deb -x``. Everything is cached, so a second run is instant.

Usage: ``python scripts/fetch_consul.py`` prints the path of the ``consul`` binary, or exits 1
with a message saying why it could not be fetched.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

SUITE = "bullseye"
PACKAGE = "consul"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gateway-tests"


class FetchError(RuntimeError):
    pass


def _current_codename() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    match = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.M)
    return match.group(1) if match else ""


def _deb822_entries(text: str) -> list[dict[str, str]]:
    entries: list[dict[str, str]] = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        last = ""
        for line in block.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and last:  # continuation line
                fields[last] += " " + line.strip()
                continue
            key, sep, value = line.partition(":")
            if sep:
                last = key.strip()
                fields[last] = value.strip()
        if fields:
            entries.append(fields)
    return entries


def mirror_sources(codename: str, apt_dir: Path = Path("/etc/apt")) -> list[tuple[str, str]]:
    """(URI, Signed-By or '') of every Debian main-archive source for ``codename``.

    Security and updates suites are skipped: bullseye's package is in the plain suite.
    """
    found: list[tuple[str, str]] = []
    files = sorted((apt_dir / "sources.list.d").glob("*.sources"))
    for path in files:
        try:
            entries = _deb822_entries(path.read_text())
        except OSError:
            continue
        for entry in entries:
            if "deb" not in entry.get("Types", "").split():
                continue
            if entry.get("Enabled", "yes").lower() == "no":
                continue
            if codename not in entry.get("Suites", "").split():
                continue
            for uri in entry.get("URIs", "").split():
                found.append((uri, entry.get("Signed-By", "")))
    one_line = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in one_line:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            match = re.match(r"\s*deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if match and match.group(3) == codename:
                options = match.group(1) or ""
                signed = re.search(r"signed-by=(\S+?)\]?(\s|$)", options)
                found.append((match.group(2), signed.group(1) if signed else ""))
    return found


def _run(args: list[str], cwd: Path | None = None) -> None:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FetchError(
            f"{' '.join(args[:2])} failed (exit {result.returncode}):\n"
            f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )


def fetch_consul(cache: Path = DEFAULT_CACHE / "consul") -> Path:
    """Return the path of a cached ``consul`` binary, downloading it first if needed."""
    binary = cache / "root" / "usr" / "bin" / "consul"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FetchError(f"{tool} is not available: cannot fetch Consul from Debian {SUITE}")
    codename = _current_codename()
    if not codename:
        raise FetchError("cannot tell this machine's Debian release from /etc/os-release")
    sources = mirror_sources(codename)
    if not sources:
        raise FetchError(f"no Debian mirror for {codename!r} found in /etc/apt sources")
    apt = cache / "apt"
    for sub in ("lists/partial", "archives/partial", "etc/sources.list.d", "etc/preferences.d"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    stanzas = []
    for uri, signed_by in sources:
        stanza = f"Types: deb\nURIs: {uri}\nSuites: {SUITE}\nComponents: main\n"
        if signed_by:
            stanza += f"Signed-By: {signed_by}\n"
        stanzas.append(stanza)
    (apt / "etc" / "sources.list.d" / "bullseye.sources").write_text("\n".join(stanzas))
    status = apt / "status"
    status.touch()
    options = [
        "-o",
        f"Dir::Etc::SourceList={apt / 'etc' / 'sources.list'}",
        "-o",
        f"Dir::Etc::SourceParts={apt / 'etc' / 'sources.list.d'}",
        "-o",
        f"Dir::Etc::PreferencesParts={apt / 'etc' / 'preferences.d'}",
        "-o",
        f"Dir::State::Lists={apt / 'lists'}",
        "-o",
        f"Dir::State::status={status}",
        "-o",
        f"Dir::Cache={apt / 'cache'}",
        "-o",
        f"Dir::Cache::Archives={apt / 'archives'}",
        # Our directories belong to the calling user; apt's _apt sandbox user cannot write them.
        "-o",
        f"APT::Sandbox::User={pwd.getpwuid(os.geteuid()).pw_name}",
        "-o",
        "Debug::NoLocking=1",
        "-o",
        "Acquire::Languages=none",
    ]
    (apt / "etc" / "sources.list").touch()
    (apt / "cache").mkdir(exist_ok=True)
    _run(["apt-get", "update", "-q", *options])
    download = cache / "download"
    download.mkdir(exist_ok=True)
    _run(["apt-get", "download", "-q", *options, PACKAGE], cwd=download)
    debs = sorted(download.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise FetchError(f"apt-get download {PACKAGE} produced no .deb in {download}")
    root = cache / "root"
    shutil.rmtree(root, ignore_errors=True)
    _run(["dpkg-deb", "-x", str(debs[-1]), str(root)])
    if not binary.is_file():
        raise FetchError(f"{debs[-1].name} has no usr/bin/consul")
    return binary


def main() -> int:
    try:
        print(fetch_consul())
    except FetchError as error:
        print(f"cannot fetch Consul: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
