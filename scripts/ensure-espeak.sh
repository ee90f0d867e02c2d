#!/usr/bin/env bash
# Make sure espeak-ng is installed (a second voice for bench/voice_to_voice.py, so the
# recogniser is not measured on one voice only). Installs Debian's package when root.
set -euo pipefail
if command -v espeak-ng >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null
else
  echo "ensure-espeak: espeak-ng is not installed (apt-get install espeak-ng)" >&2
  exit 1
fi
