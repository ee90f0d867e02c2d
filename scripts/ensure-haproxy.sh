#!/usr/bin/env bash
# Make sure the `haproxy` binary (Debian package haproxy) is installed for the cluster tests
# (tests/test_cluster.py starts its own instance on 127.0.0.1; nothing is started here).
set -euo pipefail

if command -v haproxy >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  # Another install may hold the dpkg lock (CI images, parallel setup): wait for it.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq haproxy >/dev/null
  # The package's own service is not ours: the tests run haproxy with their own config.
  if command -v service >/dev/null 2>&1; then service haproxy stop >/dev/null 2>&1 || true; fi
else
  echo "ensure-haproxy: haproxy is not installed and cannot be (needs root and apt-get)" >&2
  exit 1
fi
command -v haproxy >/dev/null 2>&1 || { echo "ensure-haproxy: install failed" >&2; exit 1; }
