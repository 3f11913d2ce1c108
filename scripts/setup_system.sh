#!/usr/bin/env bash
# Install the system programs the test suite needs, once; a quick no-op when they are there.
#
#   bash scripts/setup_system.sh           check, install what is missing (apt-get; sudo when
#                                          not root), fetch Consul (scripts/fetch_consul.py)
#   bash scripts/setup_system.sh --check   only report: exit 1 listing what is missing
#   bash scripts/setup_system.sh --venv    only make sure `$PYTHON -m venv` works (make run)
#
# `make test` runs it before the tests, and `.ci/run` runs `make test`. The tests start their own
# servers (Redis, etcd, ZooKeeper, Prometheus, dnsmasq, Consul) on random loopback ports; the
# packages' system services are never used. When something is missing and this script cannot
# install it (no root and no sudo, or no apt-get), it prints the exact command to run and exits
# 1, so the tests never start half-equipped.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

mode="install"
case "${1:-}" in
  "") ;;
  --check) mode="check" ;;
  --venv) mode="venv" ;;
  -h | --help)
    sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "usage: $0 [--check | --venv]" >&2
    exit 2
    ;;
esac

# Debian puts some of these in /usr/sbin, which is not on every user's PATH.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

# Can $PYTHON create a virtualenv? Debian's needs python3-venv (ensurepip); a pyenv or
# python.org build already can. `-m venv --help` succeeds even without ensurepip, so create a
# real throwaway venv (about 2 s, and only while the project's venv does not exist yet).
venv_works() {
  local tmp rc=0
  tmp="$(mktemp -d)"
  "$PYTHON" -m venv "$tmp/venv" >/dev/null 2>&1 || rc=$?
  rm -rf "$tmp"
  return "$rc"
}

# Debian package -> why the suite needs it; filled by the checks below.
missing=()
reasons=()
need() { missing+=("$1"); reasons+=("$1: $2"); }

if [ ! -x "$VENV/bin/python" ] && ! venv_works; then
  need python3-venv "'$PYTHON -m venv' fails (ensurepip): make creates .venv with it"
fi

if [ "$mode" != "venv" ]; then
  have make || need make "the Makefile (make run, make test)"
  have nginx || need nginx "reference proxy and backend of the load-test harness tests"
  have wrk || need wrk "load generator of the load-test harness"
  have haproxy || need haproxy "reference proxy of the load-test harness (python -m loadtest)"
  have caddy || need caddy "reference proxy of the load-test harness (python -m loadtest)"
  have dnsmasq || need dnsmasq-base "DNS discovery system tests (tests/system/test_dns.py)"
  { have prometheus && have promtool; } \
    || need prometheus "metrics system test (tests/system/test_prometheus.py)"
  have etcd || need etcd-server "etcd discovery system tests (tests/system/test_etcd.py)"
  { have java && [ -e /usr/share/java/zookeeper.jar ]; } \
    || need zookeeper "ZooKeeper discovery system tests (tests/system/test_zookeeper.py)"
  have redis-server || need redis-server "Redis rate-limit system tests"
  # Not used by the suite yet; small, and wanted by benchmarks and TLS work.
  have curl || need curl "examples in the README, admin API checks"
  have openssl || need openssl "test certificates"
  have h2load || need nghttp2-client "HTTP/2 load and h2c checks (h2load, nghttp)"
  have valgrind || need valgrind "callgrind instruction counts of the data-plane benchmark"
  have shellcheck || need shellcheck "lint of the shell scripts (tests/unit/test_setup_system.py)"
  # make compile (mypyc) needs a C compiler and the headers of the Python it builds for; a
  # pyenv or python.org build ships its headers, Debian's python3 needs python3-dev.
  have gcc || need build-essential "C compiler for make compile (the mypyc hot path)"
  if ! "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
    need python3-dev "Python headers for make compile (the mypyc hot path)"
  fi
  # fetch_consul.py itself needs these to unpack bullseye's consul package.
  have apt-get || need apt "scripts/fetch_consul.py (apt-get download)"
  have dpkg-deb || need dpkg "scripts/fetch_consul.py (dpkg-deb -x)"
fi

install_command="apt-get update && apt-get install -y --no-install-recommends ${missing[*]:-}"

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$mode" = "check" ]; then
    echo "missing system packages:" >&2
    printf '  %s\n' "${reasons[@]}" >&2
    echo "install them with:  sudo sh -c '$install_command'" >&2
    exit 1
  fi
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if have sudo; then
      sudo=(sudo)
    else
      echo "error: these system packages are missing and this is not root (and there is no sudo):" >&2
      printf '  %s\n' "${reasons[@]}" >&2
      echo "as root, run:  $install_command" >&2
      echo "then run make test again." >&2
      exit 1
    fi
  fi
  if ! have apt-get; then
    echo "error: these Debian packages are missing and there is no apt-get to install them:" >&2
    printf '  %s\n' "${reasons[@]}" >&2
    echo "install the equivalent packages of your system, then run make test again." >&2
    exit 1
  fi
  echo "installing system packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Debian's current release has no consul package; fetch_consul.py fetches bullseye's with a
# private apt setup (the system's apt state is not touched) and caches it under
# ~/.cache/gateway-tests/consul. A cached binary makes this instant.
if [ "$mode" = "check" ]; then
  # The cache location of fetch_consul.py: report only, never download.
  cached="${XDG_CACHE_HOME:-$HOME/.cache}/gateway-tests/consul/root/usr/bin/consul"
  if [ ! -x "$cached" ]; then
    echo "missing: Consul (not yet fetched): run  $PYTHON scripts/fetch_consul.py" >&2
    exit 1
  fi
elif [ "$mode" = "install" ]; then
  if ! "$PYTHON" scripts/fetch_consul.py >/dev/null; then
    echo "error: could not fetch Consul for the Consul system tests (the reason is above)." >&2
    echo "fix it, then run make test again." >&2
    exit 1
  fi
fi
