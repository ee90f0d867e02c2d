#!/usr/bin/env bash
# Make sure `node` (Debian package nodejs) is installed for the caller page's logic tests
# (tests/test_caller_page_logic.py runs gateway/static/caller.js in node against a fake DOM,
# Web Audio clock and WebSocket: deterministic, no browser).
set -euo pipefail

if command -v node >/dev/null 2>&1 || command -v nodejs >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  # Another install may hold the dpkg lock (CI images, parallel setup): wait for it.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq nodejs >/dev/null
else
  echo "ensure-node: node is not installed and cannot be (needs root and apt-get)" >&2
  exit 1
fi
command -v node >/dev/null 2>&1 || command -v nodejs >/dev/null 2>&1 || {
  echo "ensure-node: install failed" >&2; exit 1; }
