#!/usr/bin/env bash
# Client-side tests of `qwen-edit serve` on the CPU demo model, against real processes on localhost:
#   1. the clients (openai if installed, requests, curl) and the bad-request suite   (client_test.py)
#   2. the load test: 16 clients, 200 requests, p50/p99, server overhead            (load_test.py)
#   3. SIGTERM under load: every request answered (200 or 503 JSON), exit 0, no files left
#   4. two servers behind HAProxy (health checks on /ready, least connections), a load test through it, and one
#      backend stopped under traffic
# Needs python3 with `requests`, curl, and haproxy (step 4; skipped with a message when absent unless
# SERVE_TEST_REQUIRE_LB=1). Usage: tests/serve/run.sh [path/to/qwen-edit] (default: target/debug/qwen-edit).
# Writes the load-test results to target/serve-test/*.json. MAX_OVERHEAD_MS (default 5) bounds the server's
# median overhead per request; scripts/test.sh runs the debug build, which it gives more room.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/debug/qwen-edit}
OUT=target/serve-test
mkdir -p "$OUT"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# start_server NAME ARGS… : starts a demo server on a free port; sets $URL and $PID.
start_server() {
  local name=$1; shift
  # The files exist before the server starts: the redirections below run in the child, which may not have
  # opened them by the time the loop first reads them (this failed CI once on a slow machine).
  : >"$OUT/$name.out"; : >"$OUT/$name.log"
  "$BIN" serve --demo --port 0 "$@" >"$OUT/$name.out" 2>"$OUT/$name.log" &
  PID=$!
  PIDS+=("$PID")
  for _ in $(seq 600); do
    URL=$(sed -n 's/^listening on //p' "$OUT/$name.out" || true)
    if [ -n "$URL" ] && curl -sf "$URL/ready" >/dev/null; then return 0; fi
    kill -0 "$PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "server $name did not start:"; cat "$OUT/$name.log"; exit 1
}

echo "== 1. clients and bad requests"
start_server main
python3 tests/serve/client_test.py --url "$URL"

echo "== 2. load test: 16 clients, 200 requests"
python3 tests/serve/load_test.py --url "$URL" --clients 16 --requests 200 --json "$OUT/load.json" \
  --max-overhead-ms "${MAX_OVERHEAD_MS:-5}"
curl -sf "$URL/metrics" | grep -E '^qwen_edit_(jobs_total|reuse_hits_total|queue_depth) ' || true

echo "== 3. SIGTERM under load"
python3 tests/serve/load_test.py --url "$URL" --clients 8 --requests 24 --steps 6 --overhead-requests 0 \
  --json "$OUT/sigterm.json" >"$OUT/sigterm.txt" 2>&1 &
LOAD=$!
sleep 1
kill -TERM "$PID"
STATUS=0; wait "$PID" || STATUS=$?
[ "$STATUS" = 0 ] || { echo "the server exited with $STATUS"; cat "$OUT/main.log"; exit 1; }
wait "$LOAD" || true # requests sent after the listener closed are refused: counted as lost below
python3 - "$OUT/sigterm.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
answered = {int(k): v for k, v in r["statuses"].items() if k != "0"}
bad = {k: v for k, v in answered.items() if k not in (200, 503)}
assert not bad and r["malformed"] == 0, r
assert answered.get(200, 0) > 0, r
print(f"ok   SIGTERM: {answered} answered (200 done, 503 cancelled), {r['statuses'].get('0', 0)} refused after close")
EOF
if ls -d /tmp/qwen-edit-serve-"$PID" 2>/dev/null; then echo "files left behind"; exit 1; fi
grep -q "stopped" "$OUT/main.log" || { echo "the server did not log its shutdown:"; cat "$OUT/main.log"; exit 1; }
echo "ok   the server logged its shutdown and exited 0"

echo "== 4. two servers behind HAProxy"
if ! command -v haproxy >/dev/null; then
  if [ "${SERVE_TEST_REQUIRE_LB:-0}" = 1 ]; then echo "haproxy is not installed (apt-get install -y haproxy)"; exit 1; fi
  echo "skip: haproxy is not installed (apt-get install -y haproxy)"; exit 0
fi
start_server a; URL_A=$URL; PID_A=$PID
start_server b; URL_B=$URL; PID_B=$PID
LB_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -e "s|@LB_PORT@|$LB_PORT|" -e "s|@A@|${URL_A#http://}|" -e "s|@B@|${URL_B#http://}|" \
  tests/serve/haproxy.cfg >"$OUT/haproxy.cfg"
haproxy -f "$OUT/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 &
PIDS+=("$!")
LB=http://127.0.0.1:$LB_PORT
for i in $(seq 101); do
  curl -sf "$LB/ready" >/dev/null && break
  [ "$i" = 101 ] && { echo "HAProxy did not come up:"; cat "$OUT/haproxy.log"; exit 1; }
  sleep 0.1
done
python3 tests/serve/load_test.py --url "$LB" --clients 16 --requests 200 --overhead-requests 0 --json "$OUT/lb.json"
for u in "$URL_A" "$URL_B"; do
  n=$(curl -sf "$u/metrics" | sed -n 's/^qwen_edit_jobs_total{outcome="ok"} //p')
  echo "ok   backend $u ran ${n:-0} edits"
  [ "${n:-0}" -gt 0 ] || { echo "a backend got no traffic"; exit 1; }
done
kill -TERM "$PID_A"; wait "$PID_A" || true
sleep 1.5 # health checks every 0.5 s mark it down
python3 tests/serve/load_test.py --url "$LB" --clients 4 --requests 20 --overhead-requests 0 --json "$OUT/lb_failover.json"
echo "ok   traffic goes on with one backend stopped"
kill -TERM "$PID_B"; wait "$PID_B" || true
echo "serve tests: OK"
