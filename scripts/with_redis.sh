#!/usr/bin/env bash
# Runs a command with a real Redis reachable at $REDIS_TEST_URL.
# Order: REDIS_URL if set; 127.0.0.1:6379 if it answers; else a private redis-server on a free
# loopback port (installed from Debian/Ubuntu packages if missing), stopped afterwards.
# The Redis Cluster tests start their own 3-master cluster with redis-server and redis-cli
# (tests/fixtures_redis.py), so both are installed when missing; a REDIS_URL of the form
# redis+cluster://... is handed to them as REDIS_TEST_CLUSTER_URL instead.
set -euo pipefail
answers() { python3 - "$1" <<'PY'
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
try:
    s = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=1)
    s.sendall(b"PING\r\n"); ok = s.recv(16).startswith(b"+PONG")
except OSError:
    ok = False
sys.exit(0 if ok else 1)
PY
}
case "${REDIS_URL:-}" in
  redis+cluster://*) export REDIS_TEST_CLUSTER_URL="$REDIS_URL"; unset REDIS_URL ;;
esac
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  echo "redis-server / redis-cli not found: installing them" >&2
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null; fi
fi
if [ -n "${REDIS_URL:-}" ]; then
  export REDIS_TEST_URL="$REDIS_URL"
elif answers redis://127.0.0.1:6379/0; then
  export REDIS_TEST_URL=redis://127.0.0.1:6379/0
else
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  dir=$(mktemp -d)
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" --daemonize yes \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
  trap 'kill "$(cat "$dir/redis.pid")" 2>/dev/null || true; rm -rf "$dir"' EXIT
  for _ in $(seq 50); do answers "redis://127.0.0.1:$port/0" && break; sleep 0.1; done
  export REDIS_TEST_URL="redis://127.0.0.1:$port/0"
fi
echo "tests use Redis at $REDIS_TEST_URL" >&2
unset REDIS_URL
"$@"
