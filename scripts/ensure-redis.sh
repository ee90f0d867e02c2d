#!/usr/bin/env bash
# Make sure a Redis server listens on 127.0.0.1:${REDIS_PORT:-6379} for the tests.
# Uses the one already running; otherwise starts redis-server (installing it with
# apt-get when it is missing and we are root), keeping nothing on disk.
set -euo pipefail
port="${REDIS_PORT:-6379}"

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

if listening; then exit 0; fi
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    echo "ensure-redis: no Redis on 127.0.0.1:$port and redis-server is not installed" >&2
    exit 1
  fi
fi
dir="${TMPDIR:-/tmp}/voicegate-redis"
mkdir -p "$dir"
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
  --dir "$dir" --logfile "$dir/redis.log"
for _ in $(seq 50); do listening && exit 0; sleep 0.1; done
echo "ensure-redis: redis-server did not start; see $dir/redis.log" >&2
exit 1
