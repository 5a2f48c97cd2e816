#!/usr/bin/env bash
# Capacity benchmarks of the issue's table, on one machine, each with its reference in the run:
#   1. embedded (`cascade serve all`, one worker per core, Redis store): open-loop step run,
#      --feedback 0 capacity plus the feedback figure, and the HTTP ceiling served the same way;
#   2. overload: ONE worker pinned to core 0 (Locust on the others), CASCADE_BUDGET_MS=25:
#      its capacity by a step run, then 3x that rate offered open-loop (OVERLOAD_RPS: a fixed
#      rate instead, to compare two settings, e.g. CASCADE_STAGE_NICE, at the same load);
#   3. the distributed stack (gateway + 3 stage services + the same Redis): step run.
# Needs a marketplace already in Redis (`cascade load-store --data DATA`) and its bundle.
#
#   REDIS_URL=redis://127.0.0.1:6390/0 DATA=/path/large BUNDLE=/path/bundles \
#     scripts/bench_capacity.sh OUT_DIR [embedded|overload|stack ...]
set -euo pipefail
out=${1:?usage: bench_capacity.sh OUT_DIR [embedded|overload|stack ...]}
shift
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(embedded overload stack)
: "${REDIS_URL:?set REDIS_URL (a Redis loaded with cascade load-store)}"
: "${DATA:?set DATA (the marketplace dir; users.parquet drives the traffic)}"
: "${BUNDLE:?set BUNDLE (a bundle version dir or BUNDLES root)}"
cd "$(dirname "$0")/.."
bin=.venv/bin
port=${PORT:-8200}
export CASCADE_AUTH=off REDIS_URL
mkdir -p "$out"

wait_ready() {
  for _ in $(seq 1 240); do
    curl -sf "http://127.0.0.1:$1/readyz" >/dev/null && return 0
    sleep 1
  done
  echo "server on :$1 not ready" >&2
  return 1
}

serve() {  # serve [taskset cores] [extra args...]
  local cores=$1; shift
  if [ -n "$cores" ]; then
    taskset -c "$cores" "$bin/cascade" serve all --bundle "$BUNDLE" --port "$port" "$@" \
      >"$out/serve.log" 2>&1 &
  else
    "$bin/cascade" serve all --bundle "$BUNDLE" --port "$port" "$@" >"$out/serve.log" 2>&1 &
  fi
  server=$!
  wait_ready "$port"
}

stop() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
}

bench() {  # bench NAME [taskset cores] args...
  local name=$1 cores=$2; shift 2
  local cmd=("$bin/cascade" bench e2e --url "http://127.0.0.1:$port" --data "$DATA"
             --out "$out/$name/summary.json" "$@")
  if [ -n "$cores" ]; then taskset -c "$cores" "${cmd[@]}"; else "${cmd[@]}"; fi
}

for part in "${parts[@]}"; do
  case $part in
    embedded)
      serve ""
      bench embedded "" --step --rps "${RPS:-60}" --step-factor 1.25 --max-steps "${STEPS:-8}" \
        --seconds "${SECONDS_PER_STEP:-15}" --budget-ms "${BUDGET_MS:-25}" --feedback 1 --ceiling
      stop ;;
    overload)
      CASCADE_BUDGET_MS=25 serve 0 --workers 1
      bench single "1-$(($(nproc) - 1))" --step --rps 20 --step-factor 1.25 --max-steps 8 \
        --seconds 12 --budget-ms 30 --feedback 0
      capacity=$("$bin/python" -c "import json,sys; print(json.load(open(sys.argv[1]))['achieved_rps'])" \
        "$out/single/summary.json")
      rate=${OVERLOAD_RPS:-$("$bin/python" -c "print(round(3 * $capacity, 1))")}
      echo "one worker's capacity: $capacity rps; offering $rate rps"
      bench overload "1-$(($(nproc) - 1))" --rps "$rate" --seconds 20 --feedback 0
      stop ;;
    stack)
      "$bin/cascade" stack up --bundle "$BUNDLE" --redis-url "$REDIS_URL" --free-ports \
        --run-dir "$out/stack-run" >"$out/stack.log" 2>&1
      gateway=$("$bin/python" -c "import json,sys; print(json.load(open(sys.argv[1]))['urls']['gateway'])" \
        "$out/stack-run/state.json")
      "$bin/cascade" bench e2e --url "$gateway" --stack-state "$out/stack-run/state.json" \
        --data "$DATA" --out "$out/stack/summary.json" --step --rps "${RPS_STACK:-40}" \
        --step-factor 1.25 --max-steps "${STEPS:-8}" --seconds "${SECONDS_PER_STEP:-15}" \
        --budget-ms 40 --feedback 0
      "$bin/cascade" stack down --run-dir "$out/stack-run" >>"$out/stack.log" 2>&1 ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
done
