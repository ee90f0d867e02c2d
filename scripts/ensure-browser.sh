#!/usr/bin/env bash
# Make sure Debian's chromium and chromium-driver are installed for the dashboard test
# (tests/test_admin_dashboard.py). Installs them with apt-get when missing and we are root;
# otherwise says what is missing and carries on: the test skips itself, unless CI is set.
set -euo pipefail
chromium="${VOICEGATE_CHROMIUM:-/usr/bin/chromium}"
driver="${VOICEGATE_CHROMEDRIVER:-/usr/bin/chromedriver}"

if [ -x "$chromium" ] && [ -x "$driver" ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
  if [ -x "$chromium" ] && [ -x "$driver" ]; then exit 0; fi
fi
echo "ensure-browser: $chromium or $driver is missing (apt-get install chromium chromium-driver);" \
     "the dashboard test will be skipped${CI:+, and fail because CI is set}" >&2
if [ -n "${CI:-}" ]; then exit 1; fi
exit 0
